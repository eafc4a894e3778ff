"""What the contrastive trainer (``clip_train.py``) and the LLaVA trainer (``llava_train.py``) share.

Process and device set-up, the optimizer and its schedule, the run's state (:class:`BaseRun`), and the
bookkeeping around the loop: resume.pt (written atomically, every process's RNG state and data position gathered
into it) and restoring from it, metrics.jsonl, the output folder, and when to evaluate and save. Each trainer adds
its model checkpoint, its loop and its evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from visinstruct.configs import ClipTrainConfig, LlavaTrainConfig, OptimConfig
from visinstruct.trainer.data import ShardStream

log = logging.getLogger(__name__)
RESUME_FILE, METRICS_FILE, CONFIG_FILE, EVAL_FILE = "resume.pt", "metrics.jsonl", "train_config.yaml", "eval.json"
TrainConfig = ClipTrainConfig | LlavaTrainConfig


@dataclass
class Processes:
    """This process among those of the run."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<local rank>"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def start_processes(cfg: TrainConfig) -> Processes:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but torch sees no CUDA device")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Processes(int(os.environ.get("RANK", 0)), world_size, device)


def autocast_dtype(cfg: TrainConfig, procs: Processes) -> torch.dtype:
    """bf16 when ``cfg.precision`` asks for it (``auto``: on CUDA), else fp32 (autocast off)."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and procs.device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def wrap_ddp(model: torch.nn.Module, procs: Processes) -> torch.nn.Module:
    """What the loop calls: the model itself in one process, else its DDP wrapper."""
    if procs.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[procs.device] if procs.device_type == "cuda" else None
    )


def train_mode(model: torch.nn.Module, locked: list[torch.nn.Module]) -> None:
    """Train mode for the model, but eval mode for the ``locked`` modules (frozen towers)."""
    model.train()
    for module in locked:
        module.eval()


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; matrices decay, gains, biases and the temperature do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def gather(obj, procs: Processes) -> list:
    """``obj`` of every process, by rank (``[obj]`` in a single process)."""
    if procs.world_size == 1:
        return [obj]
    gathered = [None] * procs.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_processes(value: torch.Tensor, procs: Processes) -> float:
    """The mean of a scalar tensor over the processes."""
    if procs.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return float(value)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(procs: Processes) -> dict:
    """This process's torch RNG state (and its CUDA device's, on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if procs.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, procs: Processes) -> None:
    """Restore what :func:`rng_state` captured (the CUDA part only on CUDA)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and procs.device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def config_yaml(cfg: TrainConfig) -> str:
    """The run's config as YAML, keys in declaration order."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def prepare_output(cfg: TrainConfig, procs: Processes, files: dict[str, str] | None = None) -> None:
    """Rank 0 creates ``cfg.out`` and writes train_config.yaml and ``files`` (name: text) there; all then wait."""
    if procs.rank == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {}).items():
            (out / name).write_text(text)
        (out / CONFIG_FILE).write_text(config_yaml(cfg))
    if procs.world_size > 1:
        dist.barrier()  # the other processes read out/ (resume.pt) next


def write_metrics(cfg: TrainConfig, record: dict) -> None:
    """Append ``record`` as one JSON line to ``out/metrics.jsonl``."""
    with open(Path(cfg.out) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class BaseRun:
    """Everything the loop, the checkpoints and the evaluation share; each trainer's ``Run`` adds its own."""

    cfg: TrainConfig
    procs: Processes
    model: torch.nn.Module  # the model itself (checkpoints, evaluation)
    ddp: torch.nn.Module  # what the loop calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    stream: ShardStream
    locked: list[torch.nn.Module]  # modules kept in eval mode

    @classmethod
    def start(cls, cfg: TrainConfig, procs: Processes, model: torch.nn.Module, stream: ShardStream, locked, **own):
        """A trainer's run, ready for its loop: this process's own draws seeded (dropout...; a resume restores
        them), ``model`` wrapped for DDP, its optimizer made; ``own`` fills the trainer's ``Run`` fields."""
        torch.manual_seed(cfg.seed + 1 + procs.rank)
        ddp = wrap_ddp(model, procs)
        return cls(cfg, procs, model, ddp, make_optimizer(model, cfg.optim), stream, locked, **own)

    def trainable(self) -> str:
        """``"T of N parameters trainable"``, for the trainer's first log line."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return f"{trainable} of {sum(p.numel() for p in self.model.parameters())} parameters trainable"


def process_states(run: BaseRun) -> list[dict]:
    """Every process's RNG state and data position, by rank (every process must call it)."""
    return gather({"rng": rng_state(run.procs), "data": run.stream.state_dict()}, run.procs)


def save_resume(run: BaseRun, step: int, states: list[dict]) -> None:
    """Write ``out/resume.pt`` atomically: the step, the optimizer state and :func:`process_states`."""
    atomic_save(
        {"step": step, "optimizer": run.optimizer.state_dict(), "processes": states}, Path(run.cfg.out) / RESUME_FILE
    )


def read_resume(run: BaseRun) -> dict | None:
    """What ``out/resume.pt`` holds when ``cfg.resume`` and it exists; None to start from step 0."""
    path = Path(run.cfg.out) / RESUME_FILE
    if not (run.cfg.resume and path.exists()):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_from(run: BaseRun, state: dict, checkpoint: str, saved_step: int, weights: Callable[[], dict]) -> int:
    """Restore the model, the optimizer, and this process's RNG state and data position; returns the step.

    Args:
        run: the run to restore.
        state: what :func:`read_resume` returned.
        checkpoint: the name of the model checkpoint in ``out`` (for the error message).
        saved_step: the checkpoint's step; it must be resume.pt's, else saving was interrupted between the two.
        weights: loads the checkpoint's state dict (called only once the steps agree).
    """
    out, procs = Path(run.cfg.out), run.procs
    if saved_step != state["step"]:
        raise RuntimeError(
            f"{out}: {checkpoint} is from step {saved_step} but {RESUME_FILE} from step "
            f"{state['step']} (interrupted while saving?): delete {RESUME_FILE} to start over"
        )
    run.model.load_state_dict(weights())
    run.optimizer.load_state_dict(state["optimizer"])
    if len(state["processes"]) == procs.world_size:
        mine = state["processes"][procs.rank]
        set_rng_state(mine["rng"], procs)
        run.stream.load_state_dict(mine["data"])
    else:
        log.warning(
            "resume.pt holds %d processes' RNG and data state, this run has %d: the data stream restarts",
            len(state["processes"]),
            procs.world_size,
        )
    log.info("resumed from %s at step %d", out, state["step"])
    return state["step"]


def after_step(
    run: BaseRun, step: int, last: int, evaluate: Callable[[Any, int], dict], save: Callable[[Any, int], None]
) -> None:
    """The end of step ``step`` in the loop: evaluate and save when due.

    Rank 0 evaluates every ``eval.every`` steps but after the run's last one (the others wait); every process calls
    ``save`` every ``save_every`` steps and at ``last``, the loop's last step.
    """
    cfg, procs = run.cfg, run.procs
    if cfg.eval.shards and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
        if procs.rank == 0:
            evaluate(run, step)
        if procs.world_size > 1:
            dist.barrier()
    if step == last or (cfg.save_every and step % cfg.save_every == 0):
        save(run, step)


def evaluate_at_end(run: BaseRun, first: int, summary: dict, evaluate: Callable[[Any, int], dict]) -> None:
    """After the loop: rank 0 evaluates once the run's last step is done (the other processes wait).

    Only when this run took that step (the loop ran from step ``first`` to ``summary["step"]``); the evaluation goes
    into ``summary["eval"]`` and ``out/eval.json``.
    """
    cfg, procs = run.cfg, run.procs
    if procs.rank == 0 and cfg.eval.shards and summary["step"] == cfg.steps and first < cfg.steps:
        summary["eval"] = evaluate(run, cfg.steps)  # the other processes wait at the barrier below
        (Path(cfg.out) / EVAL_FILE).write_text(json.dumps(summary["eval"], indent=1) + "\n")
    if procs.world_size > 1:
        dist.barrier()

"""``visinstruct train-clip``: contrastive training of an open_clip model on our shards (CLIP, LiT, LiT reversed).

It reads top to bottom, as nanoGPT's ``train.py`` does: start the processes, build the model and lock a tower,
stream batches, then an explicit loop (forward, InfoNCE, backward, clip, step, clamp the temperature). One
process, or several under ``torchrun`` (DDP; NCCL on CUDA, gloo on CPU), negatives gathered across them.

The output folder (``cfg.out``)::

    model.pt           {"state_dict", "step", "model_name", "model_config", "train_config"}: open_clip and the
                       filter load it, open_clip.create_model(name, pretrained="OUT/model.pt")
    <name>.json        the open_clip model config: open_clip.add_model_config(it) first, or the filter's
                       model.config_file, for an architecture open_clip does not ship
    resume.pt          step, optimizer state, and each process's torch RNG state and data position
    train_config.yaml  this run's config (model.pt carries it too)
    metrics.jsonl      one JSON line per log step and per evaluation
    eval.json          the last evaluation (recall@1/5 both ways, matching AUC)

A locked tower's parameters are frozen (never given to the optimizer, so they stay bit-identical) and the tower
runs in eval mode, so batch-norm statistics and dropout do not change it either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from visinstruct.configs import ClipTrainConfig, LockConfig, OptimConfig
from visinstruct.trainer.clip_eval import embed, evaluate_embeddings
from visinstruct.trainer.data import ShardStream, iterate_once, shard_list
from visinstruct.trainer.losses import clamp_logit_scale, clip_loss

log = logging.getLogger(__name__)
MODEL_FILE, RESUME_FILE, METRICS_FILE = "model.pt", "resume.pt", "metrics.jsonl"


@dataclass
class Processes:
    """This process among those of the run."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<local rank>"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def start_processes(cfg: ClipTrainConfig) -> Processes:
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


def autocast_dtype(cfg: ClipTrainConfig, procs: Processes) -> torch.dtype:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and procs.device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_model(cfg: ClipTrainConfig):
    """The open_clip model (same initial weights in every process), its config, transforms and tokenizer.

    Returns:
        ``(model, model_config, train_transform, eval_transform, tokenizer)``.
    """
    import open_clip

    if cfg.model.config is not None:  # open_clip only registers configs from files, named after the file
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{cfg.model.name}.json"
            path.write_text(json.dumps(cfg.model.config))
            open_clip.add_model_config(path)
    model_config = open_clip.get_model_config(cfg.model.name)
    if model_config is None:
        raise ValueError(f"open_clip knows no architecture {cfg.model.name!r}; give one in model.config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            cfg.model.name, pretrained=cfg.model.pretrained, output_dict=True)
    return model, model_config, train_transform, eval_transform, open_clip.get_tokenizer(cfg.model.name)


def lock_tower(model: torch.nn.Module, lock: LockConfig) -> list[torch.nn.Module]:
    """Freeze the locked tower but its last ``unlocked_groups``; returns the modules to keep in eval mode.

    open_clip's own ``lock_image_tower``/``lock_text_tower`` decide the groups (for a ViT, group 1 is ``proj``).
    Batch norm is not swapped for open_clip's frozen kind (``freeze_bn_stats``), which would change the state dict's
    keys and keep the filter from loading the checkpoint; eval mode keeps the statistics fixed instead.
    """
    if lock.tower == "image":
        model.lock_image_tower(unlocked_groups=lock.unlocked_groups, freeze_bn_stats=False)
        return [model.visual]
    if lock.tower == "text":
        model.lock_text_tower(unlocked_layers=lock.unlocked_groups)
        if hasattr(model, "text"):  # CustomTextCLIP keeps its text tower in one module
            return [model.text]
        return [model.token_embedding, model.transformer, model.ln_final]
    return []


def train_mode(model: torch.nn.Module, locked: list[torch.nn.Module]) -> None:
    model.train()
    for module in locked:
        module.eval()


def make_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; matrices decay, gains, biases and the temperature do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def lr_at(step: int, cfg: ClipTrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _gather(obj, procs: Processes) -> list:
    if procs.world_size == 1:
        return [obj]
    gathered = [None] * procs.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(procs: Processes) -> dict:
    state = {"torch": torch.get_rng_state()}
    if procs.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@dataclass
class Run:
    """Everything the loop, the checkpoints and the evaluation share."""

    cfg: ClipTrainConfig
    procs: Processes
    model: torch.nn.Module  # the model itself (checkpoints, evaluation)
    ddp: torch.nn.Module  # what the loop calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    stream: ShardStream
    locked: list[torch.nn.Module]  # modules kept in eval mode
    model_config: dict
    eval_transform: object
    tokenizer: object


def save_checkpoint(run: Run, step: int) -> None:
    """Write model.pt, then resume.pt (each atomically); every process contributes its RNG and data position."""
    states = _gather({"rng": _rng_state(run.procs), "data": run.stream.state_dict()}, run.procs)
    if run.procs.rank != 0:
        return
    out = Path(run.cfg.out)
    _atomic_save({"state_dict": run.model.state_dict(), "step": step, "model_name": run.cfg.model.name,
                  "model_config": run.model_config, "train_config": dataclasses.asdict(run.cfg)}, out / MODEL_FILE)
    _atomic_save({"step": step, "optimizer": run.optimizer.state_dict(), "processes": states}, out / RESUME_FILE)
    log.info("step %d: saved %s", step, out / MODEL_FILE)


def restore(run: Run) -> int:
    """Continue from ``out/resume.pt`` when ``cfg.resume`` and it exists; returns the step to start from."""
    out, procs = Path(run.cfg.out), run.procs
    if not (run.cfg.resume and (out / RESUME_FILE).exists()):
        return 0
    state = torch.load(out / RESUME_FILE, map_location="cpu", weights_only=True)
    weights = torch.load(out / MODEL_FILE, map_location="cpu", weights_only=True)
    if weights["step"] != state["step"]:
        raise RuntimeError(f"{out}: {MODEL_FILE} is from step {weights['step']} but {RESUME_FILE} from step "
                           f"{state['step']} (interrupted while saving?): delete {RESUME_FILE} to start over")
    run.model.load_state_dict(weights["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    if len(state["processes"]) == procs.world_size:
        mine = state["processes"][procs.rank]
        torch.set_rng_state(mine["rng"]["torch"])
        if "cuda" in mine["rng"] and procs.device_type == "cuda":
            torch.cuda.set_rng_state(mine["rng"]["cuda"])
        run.stream.load_state_dict(mine["data"])
    else:
        log.warning("resume.pt holds %d processes' RNG and data state, this run has %d: the data stream restarts",
                    len(state["processes"]), procs.world_size)
    log.info("resumed from %s at step %d", out, state["step"])
    return state["step"]


def evaluate(run: Run, step: int) -> dict:
    """Recall@1/5 both ways and the matching AUC on ``cfg.eval.shards``, logged (rank 0 calls it)."""
    cfg = run.cfg
    run.model.eval()
    batches = iterate_once(shard_list(cfg.eval.shards), cfg.eval.batch_size, run.eval_transform, run.tokenizer,
                           cfg.data.caption, limit=cfg.eval.max_samples)
    image, text, captions = embed(run.model, batches, run.procs.device, autocast_dtype(cfg, run.procs))
    metrics = evaluate_embeddings(image, text, captions, seed=cfg.seed)
    log.info("eval step %d: image->text R@1 %.3f R@5 %.3f, text->image R@1 %.3f R@5 %.3f, matching AUC %.4f "
             "(%d samples)", step, metrics["image_to_text_r1"], metrics["image_to_text_r5"],
             metrics["text_to_image_r1"], metrics["text_to_image_r5"], metrics["matching_auc"], metrics["samples"])
    _write_metrics(cfg, {"step": step, "eval": metrics})
    train_mode(run.model, run.locked)
    return metrics


def _write_metrics(cfg: ClipTrainConfig, record: dict) -> None:
    with open(Path(cfg.out) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _prepare_output(cfg: ClipTrainConfig, model_config: dict, procs: Processes) -> None:
    if procs.rank == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cfg.model.name}.json").write_text(json.dumps(model_config, indent=1) + "\n")
        (out / "train_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if procs.world_size > 1:
        dist.barrier()  # the other processes read out/ (resume.pt) next


def train(cfg: ClipTrainConfig, stop_at: int | None = None) -> dict:
    """Train (or continue training) as ``cfg`` says.

    Args:
        cfg: the run's config.
        stop_at: stop after this step, saving a resume point, as if interrupted (time-sliced jobs; tests).

    Returns:
        ``{"step", "seconds", "samples_per_second", "loss", "eval", "checkpoint", "config_file"}``: ``seconds`` is
        this run's time in the loop; ``eval`` the evaluation after the last step (None without eval shards, or when
        this run did not reach the last step).
    """
    procs = start_processes(cfg)
    run = None
    try:
        run = setup(cfg, procs)
        step = restore(run)
        summary = _loop(run, step, min(cfg.steps, stop_at) if stop_at is not None else cfg.steps)
        run.stream.close()
        if procs.rank == 0 and cfg.eval.shards and summary["step"] == cfg.steps and step < cfg.steps:
            summary["eval"] = evaluate(run, cfg.steps)  # the other processes wait at the barrier below
            (Path(cfg.out) / "eval.json").write_text(json.dumps(summary["eval"], indent=1) + "\n")
        if procs.world_size > 1:
            dist.barrier()
        return {**summary, "checkpoint": str(Path(cfg.out) / MODEL_FILE),
                "config_file": str(Path(cfg.out) / f"{cfg.model.name}.json")}
    finally:
        if run is not None:
            run.stream.close()
        if procs.world_size > 1:
            dist.destroy_process_group()


def setup(cfg: ClipTrainConfig, procs: Processes) -> Run:
    """Build the model, lock a tower, and create the optimizer and the data stream."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, model_config, train_transform, eval_transform, tokenizer = build_model(cfg)
    _prepare_output(cfg, model_config, procs)
    locked = lock_tower(model, cfg.lock)
    model.to(procs.device)
    d = cfg.data
    stream = ShardStream(shard_list(d.shards), d.batch_size, train_transform if d.augment else eval_transform,
                         tokenizer, d.caption, cfg.seed, d.shard_shuffle, d.shuffle_buffer, d.resampled,
                         d.num_workers, procs.rank, procs.world_size)
    torch.manual_seed(cfg.seed + 1 + procs.rank)  # training's own draws (dropout...); a resume restores them
    ddp = model if procs.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[procs.device] if procs.device_type == "cuda" else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("train-clip %s: %d of %d parameters trainable (lock: %s), %d process(es) x batch %d, %d steps",
             cfg.model.name, trainable, sum(p.numel() for p in model.parameters()), cfg.lock.tower,
             procs.world_size, d.batch_size, cfg.steps)
    return Run(cfg, procs, model, ddp, make_optimizer(model, cfg.optim), stream, locked, model_config,
               eval_transform, tokenizer)


def _loop(run: Run, step: int, last: int) -> dict:
    """Steps ``step + 1 .. last``: the explicit training loop. Saves at ``save_every`` and at ``last``."""
    cfg, procs, model = run.cfg, run.procs, run.model
    dtype = autocast_dtype(cfg, procs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first, started = step, time.time()
    window, window_start, loss = 0, started, None
    train_mode(model, run.locked)
    while step < last:
        lr = lr_at(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        batch = next(run.stream)
        with torch.autocast(device_type=procs.device_type, dtype=dtype, enabled=dtype != torch.float32):
            out = run.ddp(image=batch["image"].to(procs.device), text=batch["text"].to(procs.device))
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        run.optimizer.step()
        clamp_logit_scale(model)
        step, window = step + 1, window + 1
        if step % cfg.log_every == 0 or step == last:
            loss_value, now = _mean_over_processes(loss.detach(), procs), time.time()
            rate = window * cfg.data.batch_size * procs.world_size / (now - window_start)
            temperature = 1 / model.logit_scale.exp().item()
            if procs.rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s temperature %.4f", step, cfg.steps,
                         loss_value, lr, rate, temperature)
                _write_metrics(cfg, {"step": step, "loss": loss_value, "lr": lr, "samples_per_s": rate,
                                     "temperature": temperature})
            window, window_start = 0, now
        if cfg.eval.shards and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
            if procs.rank == 0:
                evaluate(run, step)
            if procs.world_size > 1:
                dist.barrier()
        if step == last or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(run, step)
    seconds = time.time() - started
    return {"step": step, "seconds": seconds, "eval": None,
            "samples_per_second": (step - first) * cfg.data.batch_size * procs.world_size / max(seconds, 1e-9),
            "loss": None if loss is None else _mean_over_processes(loss.detach(), procs)}


def _mean_over_processes(value: torch.Tensor, procs: Processes) -> float:
    if procs.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return float(value)

"""``visinstruct train``: a LLaVA-style model (transformers' ``LlavaForConditionalGeneration``) trained on our shards.

It reads top to bottom, as nanoGPT's ``train.py`` does: start the processes, build the model and freeze what the
stage does not train, stream batches, then an explicit loop (micro-batches of forward, masked next-token loss and
backward; clip; step). One process on a CPU, or several under ``torchrun`` (DDP; NCCL on CUDA, gloo on CPU); bf16
autocast on CUDA. Stage 1 trains the projector on captions; stage 2 the projector and the LM on conversations.
The process set-up, optimizer, schedule and resume bookkeeping are shared with the contrastive trainer
(``trainer/common.py``).

The output folder (``cfg.out``)::

    model/             save_pretrained of the model and its processor (model.safetensors, config.json, tokenizer,
                       processor and chat template): LlavaForConditionalGeneration.from_pretrained, AutoProcessor,
                       vLLM and ``visinstruct chat`` load it; plus train_config.yaml and trainer_state.json (step)
    resume.pt          step, optimizer state, and each process's torch RNG state and data position
    train_config.yaml  this run's config (model/ carries it too)
    metrics.jsonl      one JSON line per log step and per evaluation
    eval.json          the last evaluation (mean loss per assistant token on the held-out shards)
    tensorboard/       with ``tensorboard: true``

The learning rate is a function of the step (warm-up, then cosine), so the schedule's state is the step.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from visinstruct.configs import LlavaTrainConfig
from visinstruct.trainer import common
from visinstruct.trainer.data import skipped_over_processes
from visinstruct.trainer.llava_data import (
    IGNORE_INDEX,
    ConversationEncoder,
    encoder_for,
    held_out_batches,
    make_stream,
    model_inputs,
)
from visinstruct.trainer.llava_model import CHECKPOINT_DIR, build_llava, set_trainable

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass
class Run(common.BaseRun):
    """Everything the loop, the checkpoints and the evaluation share (``locked``: a frozen vision tower)."""

    cfg: LlavaTrainConfig
    processor: Any  # LlavaProcessor: saved with every checkpoint
    encoder: ConversationEncoder
    board: Any = None  # a TensorBoard SummaryWriter (rank 0, with cfg.tensorboard)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the labelled positions, and how many there are.

    Position ``t`` predicts token ``t + 1``; labels of -100 (human turns, image tokens, padding) add nothing.
    """
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def batch_loss(model: torch.nn.Module, batch: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_loss`` of one batch from the stream (``batch["text"]`` is the encoder's padded batch; its images,
    any number per sample or none, are ``batch["image"]``: :func:`~visinstruct.trainer.llava_data.model_inputs`)."""
    inputs = model_inputs(batch, device)
    labels = inputs.pop("labels")
    total, count = token_loss(model(**inputs).logits, labels)
    if inputs["pixel_values"] is None and torch.is_grad_enabled():
        # A batch without images leaves the projector (and a trained tower) out of the graph: DDP would wait for
        # their gradients for ever, and in stage 1 the loss would not depend on a trained weight at all (backward
        # raises). A zero term gives them a zero gradient, with one process or several alike.
        llava = getattr(model, "module", model).model  # DDP wraps the model
        vision = (llava.multi_modal_projector, llava.vision_tower)
        total = total + sum(p.sum() for m in vision for p in m.parameters() if p.requires_grad) * 0.0
    return total, count


def setup(cfg: LlavaTrainConfig, procs: common.Processes) -> Run:
    """Build the model, freeze what the stage does not train, and create the optimizer and the data stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per save and load would bury the log lines
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader workers fork after the tokenizer ran
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, processor = build_llava(cfg.model, cfg.seed)
    encoder = encoder_for(model, processor, cfg.text)
    processor.chat_template = processor.tokenizer.chat_template = encoder.template  # the checkpoint carries it
    locked = set_trainable(model, cfg.stage, cfg.model.vision.freeze)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(procs.device)
    common.prepare_output(cfg, procs)
    stream = make_stream(cfg, processor, encoder, procs.rank, procs.world_size)
    board = _tensorboard(cfg) if procs.rank == 0 else None
    run = Run.start(cfg, procs, model, stream, locked, processor=processor, encoder=encoder, board=board)
    log.info(
        "train stage %d: %s, %d image tokens, %d process(es) x %d x batch %d, %d steps",
        cfg.stage,
        run.trainable(),
        model.config.image_seq_length,
        procs.world_size,
        cfg.grad_accum,
        cfg.data.batch_size,
        cfg.steps,
    )
    return run


def _tensorboard(cfg: LlavaTrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ModuleNotFoundError("tensorboard: true needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(str(Path(cfg.out) / "tensorboard"))


def save_checkpoint(run: Run, step: int) -> None:
    """Write model/ (through a temporary folder), then resume.pt; every process contributes its RNG and position."""
    states = common.process_states(run)
    if run.procs.rank != 0:
        return
    out = Path(run.cfg.out)
    tmp, final, old = out / f"{CHECKPOINT_DIR}.tmp", out / CHECKPOINT_DIR, out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(tmp)
    run.processor.save_pretrained(tmp)
    (tmp / common.CONFIG_FILE).write_text(common.config_yaml(run.cfg))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
    if final.exists():  # a folder cannot be replaced in one rename: move the old one aside first
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    common.save_resume(run, step, states)
    log.info("step %d: saved %s", step, final)


def restore(run: Run) -> int:
    """Continue from ``out/resume.pt`` when ``cfg.resume`` and it exists; returns the step to start from."""
    from transformers import LlavaForConditionalGeneration

    state = common.read_resume(run)
    if state is None:
        return 0
    folder = Path(run.cfg.out) / CHECKPOINT_DIR
    saved = json.loads((folder / STATE_FILE).read_text())["step"]  # read first: model/ may be half-written
    weights = lambda: LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()
    return common.resume_from(run, state, f"{CHECKPOINT_DIR}/", saved, weights)


def evaluate(run: Run, step: int) -> dict:
    """Mean loss per assistant token on ``cfg.eval.shards``, logged (rank 0 calls it)."""
    cfg, procs = run.cfg, run.procs
    dtype = common.autocast_dtype(cfg, procs)
    total, tokens, samples, skipped = 0.0, 0, 0, collections.Counter()
    run.model.eval()
    with torch.no_grad():
        for batch in held_out_batches(cfg, run.processor, run.encoder, skipped):
            with torch.autocast(device_type=procs.device_type, dtype=dtype, enabled=dtype != torch.float32):
                loss, count = batch_loss(run.model, batch, procs.device)
            total, tokens, samples = total + float(loss), tokens + int(count), samples + len(batch["key"])
    common.train_mode(run.model, run.locked)
    metrics = {"loss": total / max(tokens, 1), "tokens": tokens, "samples": samples, "skipped": dict(skipped)}
    log.info(
        "eval step %d: held-out loss %.4f (%d samples, %d assistant tokens%s)",
        step,
        metrics["loss"],
        samples,
        tokens,
        _skipped_text(skipped, ", skipped "),
    )
    common.write_metrics(cfg, {"step": step, "eval": metrics})
    if run.board is not None:
        run.board.add_scalar("eval/loss", metrics["loss"], step)
    return metrics


def train(cfg: LlavaTrainConfig, stop_at: int | None = None) -> dict:
    """Train (or continue training) the LLaVA-style model as ``cfg`` says.

    Args:
        cfg: the run's config, whose keys ``visinstruct config show train`` lists.
        stop_at: stop after this step, saving a resume point, as if interrupted (time-sliced jobs; tests).

    Returns:
        ``{"step", "seconds", "samples_per_second", "tokens_per_second", "loss", "skipped", "eval", "checkpoint"}``:
        ``seconds`` is this run's time in the loop; ``skipped`` the training samples skipped by reason (all
        processes; a resumed run's include those before the interruption); ``eval`` the evaluation after the last
        step (None without eval shards, or when this run did not reach the last step).
    """
    procs = common.start_processes(cfg)
    try:
        run = setup(cfg, procs)
        step = restore(run)
        summary = _loop(run, step, min(cfg.steps, stop_at) if stop_at is not None else cfg.steps)
        common.evaluate_at_end(run, step, summary, evaluate)
        if run.board is not None:
            run.board.close()
        return {**summary, "checkpoint": str(Path(cfg.out) / CHECKPOINT_DIR)}
    finally:
        if procs.world_size > 1:
            dist.destroy_process_group()


def _loop(run: Run, step: int, last: int) -> dict:
    """Steps ``step + 1 .. last``: the explicit training loop. Saves at ``save_every`` and at ``last``."""
    cfg, procs, model = run.cfg, run.procs, run.model
    dtype = common.autocast_dtype(cfg, procs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first, started, loss = step, time.time(), None
    window, totals = torch.zeros(2), torch.zeros(2)  # samples and non-padding tokens: since the last log line, in all
    window_start = started
    common.train_mode(model, run.locked)
    while step < last:
        lr = common.lr_at(step, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=procs.device)
        for micro in range(cfg.grad_accum):
            batch = next(run.stream)
            # DDP averages gradients across processes on every backward; only the last micro-batch needs it
            syncing = micro == cfg.grad_accum - 1 or procs.world_size == 1
            with contextlib.nullcontext() if syncing else run.ddp.no_sync():
                with torch.autocast(device_type=procs.device_type, dtype=dtype, enabled=dtype != torch.float32):
                    total, count = batch_loss(run.ddp, batch, procs.device)
                micro_loss = total / count.clamp(min=1)
                (micro_loss / cfg.grad_accum).backward()
            loss += micro_loss.detach() / cfg.grad_accum
            seen = torch.tensor([len(batch["key"]), int(batch["text"]["attention_mask"].sum())])
            window, totals = window + seen, totals + seen
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
        run.optimizer.step()
        step += 1
        if step % cfg.log_every == 0 or step == last:
            window_start = _log_step(run, step, lr, loss, window, window_start, started, first)
            window.zero_()
        common.after_step(run, step, last, evaluate, save_checkpoint)
    seconds = max(time.time() - started, 1e-9)
    totals = _sum_over_processes(totals, procs)
    skipped = skipped_over_processes(run.stream.skipped, procs.world_size)
    if skipped and procs.rank == 0:
        log.warning("training samples skipped: %s", _skipped_text(skipped, ""))
    return {
        "step": step,
        "seconds": seconds,
        "eval": None,
        "samples_per_second": float(totals[0]) / seconds,
        "tokens_per_second": float(totals[1]) / seconds,
        "loss": None if loss is None else common.mean_over_processes(loss, procs),
        "skipped": skipped,
    }


def _log_step(
    run: Run,
    step: int,
    lr: float,
    loss: torch.Tensor,
    window: torch.Tensor,
    window_start: float,
    started: float,
    first: int,
) -> float:
    """One log line (and metrics.jsonl record) from rank 0: loss, lr, throughput, progress; returns the time."""
    cfg, procs = run.cfg, run.procs
    loss_value = common.mean_over_processes(loss, procs)
    samples, tokens = _sum_over_processes(window, procs).tolist()
    skipped = skipped_over_processes(run.stream.skipped, procs.world_size)
    now = time.time()
    rate, token_rate = samples / (now - window_start), tokens / (now - window_start)
    eta = (now - started) / (step - first) * (cfg.steps - step)
    if procs.rank == 0:
        log.info(
            "step %d/%d (%.0f%%) loss %.4f lr %.2e | %.1f samples/s %.0f tokens/s | elapsed %s, eta %s%s",
            step,
            cfg.steps,
            100 * step / cfg.steps,
            loss_value,
            lr,
            rate,
            token_rate,
            _clock(now - started),
            _clock(eta),
            _skipped_text(skipped, " | skipped "),
        )
        common.write_metrics(
            cfg,
            {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "samples_per_s": rate,
                "tokens_per_s": token_rate,
                "elapsed_s": now - started,
                "skipped": skipped,
            },
        )
        if run.board is not None:
            for name, value in (
                ("loss", loss_value),
                ("lr", lr),
                ("samples_per_s", rate),
                ("tokens_per_s", token_rate),
            ):
                run.board.add_scalar(f"train/{name}", value, step)
    return now


def _sum_over_processes(value: torch.Tensor, procs: common.Processes) -> torch.Tensor:
    if procs.world_size > 1:
        value = value.to(procs.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(value)
    return value.cpu()


def _skipped_text(skipped: dict[str, int], lead: str) -> str:
    """``lead`` and the counts (``image_mismatch 3, no_conversation 1``), or nothing when none was skipped."""
    if not skipped:
        return ""
    return lead + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"

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
    eval.json          the last evaluation (recall@1/5 both ways, matching AUC, a filter threshold)

A locked tower's parameters are frozen (never given to the optimizer, so they stay bit-identical) and the tower
runs in eval mode, so batch-norm statistics and dropout do not change it either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from visinstruct.configs import ClipTrainConfig, LockConfig
from visinstruct.trainer import common
from visinstruct.trainer.clip_eval import embed, evaluate_embeddings
from visinstruct.trainer.data import ShardStream, iterate_once, shard_list, skipped_over_processes, stream_sources
from visinstruct.trainer.losses import clamp_logit_scale, clip_loss

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"


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
            cfg.model.name, pretrained=cfg.model.pretrained, output_dict=True
        )
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


@dataclass
class Run(common.BaseRun):
    """Everything the loop, the checkpoints and the evaluation share."""

    cfg: ClipTrainConfig
    model_config: dict
    eval_transform: object
    tokenizer: object


def save_checkpoint(run: Run, step: int) -> None:
    """Write model.pt, then resume.pt (each atomically); every process contributes its RNG and data position."""
    states = common.process_states(run)
    if run.procs.rank != 0:
        return
    out = Path(run.cfg.out)
    common.atomic_save(
        {
            "state_dict": run.model.state_dict(),
            "step": step,
            "model_name": run.cfg.model.name,
            "model_config": run.model_config,
            "train_config": dataclasses.asdict(run.cfg),
        },
        out / MODEL_FILE,
    )
    common.save_resume(run, step, states)
    log.info("step %d: saved %s", step, out / MODEL_FILE)


def restore(run: Run) -> int:
    """Continue from ``out/resume.pt`` when ``cfg.resume`` and it exists; returns the step to start from."""
    state = common.read_resume(run)
    if state is None:
        return 0
    weights = torch.load(Path(run.cfg.out) / MODEL_FILE, map_location="cpu", weights_only=True)
    return common.resume_from(run, state, MODEL_FILE, weights["step"], lambda: weights["state_dict"])


def evaluate(run: Run, step: int) -> dict:
    """Recall@1/5 both ways and the matching AUC on ``cfg.eval.shards``, logged (rank 0 calls it)."""
    cfg = run.cfg
    run.model.eval()
    batches = iterate_once(
        shard_list(cfg.eval.shards),
        cfg.eval.batch_size,
        run.eval_transform,
        run.tokenizer,
        cfg.data.caption,
        limit=cfg.eval.max_samples,
    )
    image, text, captions = embed(run.model, batches, run.procs.device, common.autocast_dtype(cfg, run.procs))
    metrics = evaluate_embeddings(image, text, captions, seed=cfg.seed)
    log.info(
        "eval step %d: image->text R@1 %.3f R@5 %.3f, text->image R@1 %.3f R@5 %.3f, matching AUC %.4f "
        "(%d samples); threshold %.4f separates matching from shuffled pairs at %.3f balanced accuracy",
        step,
        metrics["image_to_text_r1"],
        metrics["image_to_text_r5"],
        metrics["text_to_image_r1"],
        metrics["text_to_image_r5"],
        metrics["matching_auc"],
        metrics["samples"],
        metrics["threshold"],
        metrics["threshold_balanced_accuracy"],
    )
    common.write_metrics(cfg, {"step": step, "eval": metrics})
    common.train_mode(run.model, run.locked)
    return metrics


def train(cfg: ClipTrainConfig, stop_at: int | None = None) -> dict:
    """Train (or continue training) the open_clip model as ``cfg`` says.

    Args:
        cfg: the run's config (``visinstruct config show train-clip`` lists its keys).
        stop_at: stop after this step, saving a resume point, as if interrupted (time-sliced jobs; tests).

    Returns:
        ``{"step", "seconds", "samples_per_second", "loss", "skipped", "eval", "checkpoint", "config_file"}``:
        ``seconds`` is this run's time in the loop; ``skipped`` the training samples skipped by reason (text-only
        and multi-image samples are no caption pairs); ``eval`` the evaluation after the last step (None without
        eval shards, or when this run did not reach the last step).
    """
    procs = common.start_processes(cfg)
    run = None
    try:
        run = setup(cfg, procs)
        step = restore(run)
        summary = _loop(run, step, min(cfg.steps, stop_at) if stop_at is not None else cfg.steps)
        run.stream.close()
        common.evaluate_at_end(run, step, summary, evaluate)
        return {
            **summary,
            "checkpoint": str(Path(cfg.out) / MODEL_FILE),
            "config_file": str(Path(cfg.out) / f"{cfg.model.name}.json"),
        }
    finally:
        if run is not None:
            run.stream.close()
        if procs.world_size > 1:
            dist.destroy_process_group()


def setup(cfg: ClipTrainConfig, procs: common.Processes) -> Run:
    """Build the model, lock a tower, and create the optimizer and the data stream."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, model_config, train_transform, eval_transform, tokenizer = build_model(cfg)
    common.prepare_output(cfg, procs, {f"{cfg.model.name}.json": json.dumps(model_config, indent=1) + "\n"})
    locked = lock_tower(model, cfg.lock)
    model.to(procs.device)
    d = cfg.data
    stream = ShardStream(
        stream_sources(d),
        d.batch_size,
        train_transform if d.augment else eval_transform,
        tokenizer,
        d.caption,
        cfg.seed,
        d.shard_shuffle,
        d.shuffle_buffer,
        d.resampled,
        d.num_workers,
        procs.rank,
        procs.world_size,
    )
    run = Run.start(
        cfg,
        procs,
        model,
        stream,
        locked,
        model_config=model_config,
        eval_transform=eval_transform,
        tokenizer=tokenizer,
    )
    log.info(
        "train-clip %s: %s (lock: %s), %d process(es) x batch %d, %d steps",
        cfg.model.name,
        run.trainable(),
        cfg.lock.tower,
        procs.world_size,
        d.batch_size,
        cfg.steps,
    )
    return run


def _loop(run: Run, step: int, last: int) -> dict:
    """Steps ``step + 1 .. last``: the explicit training loop. Saves at ``save_every`` and at ``last``."""
    cfg, procs, model = run.cfg, run.procs, run.model
    dtype = common.autocast_dtype(cfg, procs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first, started = step, time.time()
    window, window_start, loss = 0, started, None
    common.train_mode(model, run.locked)
    while step < last:
        lr = common.lr_at(step, cfg)
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
            loss_value, now = common.mean_over_processes(loss.detach(), procs), time.time()
            rate = window * cfg.data.batch_size * procs.world_size / (now - window_start)
            temperature = 1 / model.logit_scale.exp().item()
            if procs.rank == 0:
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f samples/s temperature %.4f",
                    step,
                    cfg.steps,
                    loss_value,
                    lr,
                    rate,
                    temperature,
                )
                common.write_metrics(
                    cfg,
                    {"step": step, "loss": loss_value, "lr": lr, "samples_per_s": rate, "temperature": temperature},
                )
            window, window_start = 0, now
        common.after_step(run, step, last, evaluate, save_checkpoint)
    seconds = time.time() - started
    skipped = skipped_over_processes(run.stream.skipped, procs.world_size)  # text-only, multi-image, uncaptioned
    if skipped and procs.rank == 0:
        log.warning("training samples skipped: %s", ", ".join(f"{r} {n}" for r, n in skipped.items()))
    return {
        "step": step,
        "seconds": seconds,
        "eval": None,
        "samples_per_second": (step - first) * cfg.data.batch_size * procs.world_size / max(seconds, 1e-9),
        "loss": None if loss is None else common.mean_over_processes(loss.detach(), procs),
        "skipped": skipped,
    }

"""What a build would cost at scale: its measured busy seconds per stage as worker hours and a price.

A build's run report says how many seconds of work each stage did (``busy_seconds``: summed over workers and
threads, from the stages' own timers) for the rows that reached it. Divided by the rows the build read, that is a
cost per input pair; scaled to any number of pairs, it is the worker hours a job of that size needs, on the
machines this run used, and a price at the rates in :class:`Prices`. Everything assumed is in the estimate, so a
reader can see what the figure rests on: it is linear in the rows (no fixed costs such as model loads), it assumes
the same images, models and devices as the measured run, and busy seconds become paid hours through
``Prices.utilization`` (workers also wait, start and shuffle).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

MILLION = 1_000_000


@dataclass(frozen=True)
class Prices:
    """The rates an estimate prices worker hours at (USD; defaults: Dataflow batch list prices, us-central1, at the
    time of writing, with n1-standard's 3.75 GB per vCPU; check yours, and set them with ``--price NAME=VALUE``)."""

    vcpu_hour: float = 0.056
    memory_gb_hour: float = 0.003557
    memory_gb_per_vcpu: float = 3.75
    gpu_hour: float = 0.35  # one NVIDIA T4 on Compute Engine; an A100 or H100 costs several times more
    utilization: float = 0.7  # the share of paid worker time that is busy
    llm_prompt_per_million: float = 0.0  # an LLM served by an API: its price per million tokens (0: self-hosted)
    llm_completion_per_million: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"price {f.name} must be a number >= 0, got {value!r}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"price utilization must be in (0, 1], got {self.utilization}")

    @classmethod
    def parse(cls, settings: list[str]) -> Prices:
        """``["gpu_hour=2.9", ...]`` over the defaults; ``ValueError`` naming an unknown or unparsable one."""
        known, values = {f.name for f in fields(cls)}, {}
        for setting in settings:
            name, sep, value = setting.partition("=")
            if not sep or name not in known:
                raise ValueError(
                    f"--price takes NAME=VALUE with NAME one of {', '.join(sorted(known))}; got {setting!r}"
                )
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"--price {name}: {value!r} is not a number") from None
        return cls(**values)


def estimate(report: dict, pairs: int = MILLION, prices: Prices | None = None, gpu_stages: frozenset = frozenset()):
    """The cost of a build of ``pairs`` input pairs at the rates ``report`` (a build's run report) measured.

    ``gpu_stages``: the stages that ran on a GPU (their busy seconds are GPU hours; the others' are vCPU hours).
    Returns a JSON-ready dict: per stage its hours and dollars, the totals, and the assumptions.
    """
    prices = prices or Prices()
    measured = report.get("inputs") or 0
    if measured <= 0:
        raise ValueError("the run report read no rows: nothing to scale from")
    scale = pairs / measured
    stages, totals = [], {"vcpu_hours": 0.0, "gpu_hours": 0.0, "dollars": 0.0}
    for stage in report.get("stages", []):
        busy = stage.get("busy_seconds") or 0.0
        hours = busy * scale / 3600 / prices.utilization
        gpu = stage["stage"] in gpu_stages
        dollars = hours * (prices.gpu_hour if gpu else vcpu_dollars_per_hour(prices))
        kind = "gpu_hours" if gpu else "vcpu_hours"
        stages.append({"stage": stage["stage"], kind: round(hours, 4), "dollars": round(dollars, 2)})
        totals[kind] += hours
        totals["dollars"] += dollars
    tokens = {
        "prompt": (report.get("prompt_tokens_spent") or 0) * scale,
        "completion": (report.get("completion_tokens_spent") or 0) * scale,
    }
    llm = (
        tokens["prompt"] * prices.llm_prompt_per_million + tokens["completion"] * prices.llm_completion_per_million
    ) / MILLION
    totals["dollars"] += llm
    return {
        "pairs": pairs,
        "measured_pairs": measured,
        "stages": stages,
        "llm_tokens": {k: round(v) for k, v in tokens.items()},
        "llm_dollars": round(llm, 2),
        "vcpu_hours": round(totals["vcpu_hours"], 4),
        "gpu_hours": round(totals["gpu_hours"], 4),
        "dollars": round(totals["dollars"], 2),
        "wall_seconds_measured": report.get("seconds"),
        "gpu_stages": sorted(gpu_stages),
        "prices": asdict(prices),
        "assumptions": [
            f"linear in rows, from {measured} measured rows (one-off costs such as model loads are spread over them)",
            "the same images, models, batch sizes and devices as the measured run",
            f"busy seconds are paid at {prices.utilization:.0%} utilization; shuffle, storage and network not priced",
            "GPU stages: " + (", ".join(sorted(gpu_stages)) or "none (every stage priced as vCPU hours)"),
        ],
    }


def parse_pairs(text: str) -> int:
    """``"400M"``, ``"1.5B"``, ``"20k"``, ``"1e6"`` or ``"1000000"`` -> pairs; ``ValueError`` for anything else."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise ValueError(f"--pairs takes a count such as 1000000, 1e6, 400M or 2B; got {text!r}") from None
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"--pairs must be at least 1, got {text!r}")
    return round(value)


def vcpu_dollars_per_hour(prices: Prices) -> float:
    """One busy vCPU hour with its share of memory."""
    return prices.vcpu_hour + prices.memory_gb_per_vcpu * prices.memory_gb_hour


def format_estimate(cost: dict) -> str:
    """A few lines: per stage hours and dollars, totals, the assumptions."""
    lines = [f"estimate for {cost['pairs']:,} input pairs (scaled from {cost['measured_pairs']:,} measured):"]
    for stage in cost["stages"]:
        hours = stage.get("vcpu_hours", stage.get("gpu_hours"))
        unit = "vCPU-h" if "vcpu_hours" in stage else "GPU-h"
        lines.append(f"  {stage['stage']:<10} {hours:>12,.2f} {unit:<6}  ${stage['dollars']:,.2f}")
    if cost["llm_dollars"]:
        lines.append(f"  LLM API    {sum(cost['llm_tokens'].values()):>12,} tokens  ${cost['llm_dollars']:,.2f}")
    lines.append(
        f"  total      {cost['vcpu_hours']:,.2f} vCPU-h, {cost['gpu_hours']:,.2f} GPU-h: ${cost['dollars']:,.2f}"
    )
    prices = cost["prices"]
    lines.append(
        f"  prices: vCPU-h ${prices['vcpu_hour']}, memory GB-h ${prices['memory_gb_hour']} "
        f"({prices['memory_gb_per_vcpu']} GB per vCPU), GPU-h ${prices['gpu_hour']} (set with --price NAME=VALUE)"
    )
    lines += [f"  assumes: {a}" for a in cost["assumptions"]]
    return "\n".join(lines)


def gpu_stages_of(cfg, cuda_available: bool | None = None) -> frozenset[str]:
    """The stages of a build config whose model runs on a GPU: a Beam accelerator hint, ``device: cuda``, ``auto``
    where CUDA is available (``cuda_available``; asked of torch when None), or the vllm backend."""

    def on_gpu(compute) -> bool:
        if compute is None:
            return False
        if getattr(compute, "accelerator", None):
            return True
        device = getattr(compute, "device", None)
        if device == "auto":
            return _cuda() if cuda_available is None else cuda_available
        return device is not None and str(device).startswith("cuda")

    stages = set()
    if cfg.filter is not None and on_gpu(cfg.filter.model):
        stages.add("filter")
    generate = cfg.generate
    if generate is not None and (generate.backend == "vllm" or on_gpu(getattr(generate, generate.backend, None))):
        stages.add("generate")
    return frozenset(stages)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()

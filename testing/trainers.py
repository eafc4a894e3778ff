"""The trainers' commands as a user runs them, for the tests of ``visinstruct train`` and ``train-clip``: the
arguments of a run on a test's shards, and a run under ``torchrun`` in processes of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_argv(command: str, config: str | Path, out: str | Path, shards: Path) -> list[str]:
    """``COMMAND --config CONFIG --out OUT``, training on ``shards/train`` and evaluating on ``shards/test``."""
    return [
        command,
        "--config",
        str(config),
        "--out",
        str(out),
        "--set",
        f"data.shards={shards / 'train'}",
        "--set",
        f"eval.shards={shards / 'test'}",
    ]


def torchrun(command: str, config: str | Path, sets: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=PROCESSES -m visinstruct.cli.main COMMAND --config CONFIG --set ...``
    with one thread a process and the Hugging Face hub offline; its output captured as text."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "visinstruct.cli.main",
        command,
        "--config",
        str(config),
    ]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)

"""A worker process freezes what it keeps for life once, at set-up (``transforms/worker.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import gc
from visinstruct.transforms import worker
before = gc.get_freeze_count()
first, second = worker.settle(), worker.settle()
print(before, first, second, gc.get_freeze_count() > before)
"""


def test_settle_freezes_the_process_once():
    # in a fresh interpreter: freezing is for the life of a process, and the test run's own heap is not ours to keep
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "True", "False", "True"]


STEPS = {
    "FetcherStep": "from visinstruct.configs import DownloadConfig\n"
    "from visinstruct.transforms.download import FetcherStep\nstep = FetcherStep(DownloadConfig())",
    "DecodeForClip": "from visinstruct.transforms.filter_stages import DecodeForClip\nstep = DecodeForClip(None, 1)",
    "FinalizeShard": "from visinstruct.transforms.write import FinalizeShard\nstep = FinalizeShard('unused')",
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_stage_settles_its_worker_at_set_up(name):
    script = f"import gc\n{STEPS[name]}\nbefore = gc.get_freeze_count()\nstep.setup()\n"
    script += "print(before == 0, gc.get_freeze_count() > 0)\nstep.teardown()"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]

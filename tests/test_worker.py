"""What a worker process does for its CPUs: it freezes what it keeps for life once, at set-up
(``transforms/worker.py``), and works on at most one image per CPU at a time (``download.IMAGE_SLOTS``)."""

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


def test_image_work_waits_for_a_slot_while_fetches_stay_in_flight(monkeypatch, tmp_path):
    """However many fetch threads there are, at most ``IMAGE_SLOTS`` images are decoded and resized at once."""
    import io
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from visinstruct.configs import IngestConfig, from_dict
    from visinstruct.schemas import ImageTextPair
    from visinstruct.transforms import download

    active, most, lock = [0], [0], threading.Lock()
    real = download.process_image

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.02)  # long enough for other threads to arrive: without the slots they would overlap
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(download, "process_image", counting)
    monkeypatch.setattr(download, "IMAGE_SLOTS", threading.BoundedSemaphore(2))
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "JPEG")
    pairs = []
    for i in range(16):
        (tmp_path / f"{i}.jpg").write_bytes(buf.getvalue())
        pairs.append(ImageTextPair(key=f"{i:09d}", path=str(tmp_path / f"{i}.jpg")))
    cfg = from_dict(IngestConfig, {"read": {"path": str(tmp_path)}})
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda p: download.fetch_and_process(p, None, cfg), pairs))
    assert all(isinstance(o, download.ProcessedImage) for o in outcomes)
    assert most[0] == 2

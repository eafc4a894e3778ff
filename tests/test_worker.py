"""What a worker process does for its CPUs: it freezes what it keeps for life once, at set-up
(``transforms/worker.py``), and works on at most one image per CPU at a time (``download.IMAGE_SLOTS``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

FREEZE = """
import gc
from visinstruct.transforms import worker
before = gc.get_freeze_count()
first, second = worker.freeze_once(), worker.freeze_once()
print(before, first, second, gc.get_freeze_count() > before)
"""


def run_python(script: str) -> list[str]:
    # a fresh interpreter: freezing is for the life of a process, and the test run's own heap must stay collectable
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()


def test_a_process_is_frozen_once():
    assert run_python(FREEZE) == ["0", "True", "False", "True"]


STEPS = {
    "FetcherStep": "from visinstruct.configs import DownloadConfig\n"
    "from visinstruct.transforms.download import FetcherStep\nstep = FetcherStep(DownloadConfig())",
    "DecodeForClip": "from visinstruct.transforms.filter_stages import DecodeForClip\nstep = DecodeForClip(None, 1)",
    "FinalizeShard": "from visinstruct.transforms.write import FinalizeShard\nstep = FinalizeShard('unused')",
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_a_stage_settles_an_sdk_worker_at_set_up_and_leaves_a_driver_alone(name):
    script = f"import gc\nfrom visinstruct.transforms import worker\n{STEPS[name]}\n"
    script += "step.setup()\ndriver = gc.get_freeze_count()\nstep.teardown()\n"
    script += "worker.in_sdk_worker = lambda: True  # as in python -m apache_beam.runners.worker.sdk_worker_main\n"
    script += "step.setup()\nprint(driver == 0, gc.get_freeze_count() > 0)\nstep.teardown()"
    assert run_python(script) == ["True", "True"]


def test_only_beams_sdk_worker_main_counts_as_an_sdk_worker():
    script = "import sys, types\nfrom visinstruct.transforms import worker\nprint(worker.in_sdk_worker())\n"
    script += "sys.modules['__main__'].__spec__ = types.SimpleNamespace(name=worker.SDK_WORKER_MAIN)\n"
    script += "print(worker.in_sdk_worker())"
    assert run_python(script) == ["False", "True"]


def test_the_local_runners_worker_processes_are_sdk_workers(tmp_path):
    """What the gate looks for is what Beam's worker processes run (else no worker would ever be settled)."""
    import apache_beam as beam

    from visinstruct.pipelines.options import pipeline_options
    from visinstruct.transforms import worker

    options = ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=1"]
    with beam.Pipeline(options=pipeline_options(options)) as p:
        _ = (
            p
            | beam.Create([0])
            | beam.Map(lambda _, ask=worker.in_sdk_worker: str(ask()))
            | beam.io.WriteToText(str(tmp_path / "out"))
        )
    assert [line for f in sorted(tmp_path.glob("out*")) for line in f.read_text().split()] == ["True"]


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

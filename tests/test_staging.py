"""Committed downloads: names per attempt, which draft a rerun reuses, and reading a remote file that is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from visinstruct.schemas import IndexRow
from visinstruct.transforms import shards
from visinstruct.transforms.layout import staging_tar
from visinstruct.transforms.shards import TarShardWriter
from visinstruct.transforms.staging import ShardDraft, commit_draft, committed_drafts, new_attempt


def committed(out: Path, attempt: str, digest: str, status: str) -> ShardDraft:
    """A one-row draft of shard 3 from download ``attempt``, committed with its staging tar."""
    tar = staging_tar(str(out), 3, attempt)
    Path(tar).parent.mkdir(parents=True, exist_ok=True)
    writer = TarShardWriter()
    members = writer.add("000003000", [("txt", b"a caption")]) if status == "success" else []
    draft = ShardDraft(3, tar, [IndexRow("000003000", status, members=members)], digest=digest, attempt=attempt)
    draft.tar_bytes = writer.finish(tar)
    commit_draft(str(out), draft)
    return draft


def test_attempt_names_sort_by_when_the_attempt_began_and_hold_no_dot():
    early, late = new_attempt(now_ns=5), new_attempt(now_ns=6)
    assert early < late and early[:16] == f"{5:016x}" and len(early) == 24
    assert "." not in early + late and new_attempt(now_ns=5) != early  # a random part besides the time


def test_a_rerun_reuses_the_newest_committed_draft_of_its_inputs_first(tmp_path):
    """A ``retry_failed`` attempt killed before its finalize leaves a draft beside the one it retried; the newer
    one holds the retried rows and must win. A draft of other inputs is not offered at all."""
    committed(tmp_path, new_attempt(now_ns=1), "d1", "http_500")
    committed(tmp_path, new_attempt(now_ns=2), "d1", "success")
    committed(tmp_path, new_attempt(now_ns=3), "other inputs", "success")
    drafts = list(committed_drafts(str(tmp_path), 3, "d1"))
    assert [(d.attempt[:16], d.rows[0].status) for d in drafts] == [
        (f"{2:016x}", "success"),
        (f"{1:016x}", "http_500"),
    ]
    assert list(committed_drafts(str(tmp_path / "nothing here"), 3, "d1")) == []


class _RemoteStore:
    """Beam's filesystems as the GCS client behaves for an object that is not there: its reader raises the
    client's own ``NotFound`` (no ``OSError``); ``exists`` says False. Records what was asked."""

    class NotFound(Exception):
        pass

    def __init__(self):
        self.asked = []

    def open(self, path, mime_type, compression_type):
        self.asked.append(("open", path))
        raise self.NotFound(f"404 GET {path}: No such object")

    def exists(self, path):
        self.asked.append(("exists", path))
        return False


def test_a_remote_file_that_is_not_there_reads_as_file_not_found(monkeypatch):
    store = _RemoteStore()
    monkeypatch.setattr(shards, "_beam_filesystems", lambda: store)
    with pytest.raises(FileNotFoundError) as caught:
        shards.read_bytes("gs://bucket/out/_staging/00003.x.draft.json")
    assert caught.value.filename == "gs://bucket/out/_staging/00003.x.draft.json"
    assert isinstance(caught.value.__cause__, _RemoteStore.NotFound)
    assert store.asked == [("open", caught.value.filename), ("exists", caught.value.filename)]


def test_a_remote_read_that_fails_for_another_reason_keeps_its_error(monkeypatch):
    store = _RemoteStore()
    store.exists = lambda path: True  # the object is there: the failure is something else, reported as it is
    monkeypatch.setattr(shards, "_beam_filesystems", lambda: store)
    with pytest.raises(_RemoteStore.NotFound):
        shards.read_bytes("gs://bucket/out/00003.tar")

"""The shard commands on local paths never import Beam (nor torch or transformers); remote paths still go through
Beam's filesystems, here an in-memory one registered by this module (scheme ``mem``, offline).

The local file functions of ``transforms/shards.py`` match globs as Beam's local filesystem did, checked here
against Beam itself.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

from visinstruct.cli.main import main
from visinstruct.configs import IngestConfig, from_dict
from visinstruct.pipelines.ingest import run as ingest
from visinstruct.testing.sample_data import llava_json_dataset
from visinstruct.transforms import shards

pytestmark = pytest.mark.timeout(300)
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "visinstruct")
HEAVY = ("apache_beam", "torch", "transformers")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two shards of LLaVA samples (three written) and a dead letter for an image that is not there."""
    root = tmp_path_factory.mktemp("llava")
    cfg = from_dict(IngestConfig, llava_json_dataset(root, entries=4, images=3, shard_size=2))
    report = ingest(cfg, ["--runner=FnApiRunner"])
    assert (report["written"], report["rejected"]) == (3, 1)
    return root / "out"


def imported(stderr: str) -> set[str]:
    """Top-level packages named by ``python -X importtime`` lines."""
    return {line.rpartition("|")[2].strip().split(".")[0] for line in stderr.splitlines() if "import time:" in line}


def test_shard_commands_on_local_paths_import_neither_beam_nor_torch(dataset, tmp_path):
    folder = Path(shutil.copytree(dataset, tmp_path / "shards"))
    (tmp_path / "urls.txt").write_text(str(dataset.parent / "images" / "0.png") + "\n")
    commands = {
        "ls": ["ls", str(folder)],
        "stats": ["stats", str(folder)],
        "show": ["show", str(folder), "--index", "1", "--save-images", str(tmp_path / "show")],
        "validate": ["validate", str(folder / "{00000..00001}.tar")],
        "export": ["export", f"{folder}/*.tar", "--out", str(tmp_path / "llava")],
        "gallery": ["gallery", str(folder), "-o", str(tmp_path / "gallery.html")],
        "remove": ["remove", str(folder), "--urls", str(tmp_path / "urls.txt")],
    }
    expected = {  # a line of each report, as a regular expression
        "ls": r"total +3 +4 +1 ",
        "stats": r"written +3 \(75.0% kept\)",
        "show": r"What shape is this\?",
        "validate": r"ok: 2 shards, 3 samples",
        "export": r"exported 3 samples from 2 shards",
        "gallery": r": 3 of 3 samples",
        "remove": r"removed 1 samples",
    }
    for name, argv in commands.items():
        done = subprocess.run(
            [sys.executable, "-X", "importtime", CONSOLE_SCRIPT, *argv], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (name, done.stdout, done.stderr[-2000:])
        assert re.search(expected[name], done.stdout), (name, done.stdout)
        assert imported(done.stderr) & set(HEAVY) == set(), name
    assert main(["validate", str(folder)]) == 0  # the removal left valid shards behind


class MemFileSystem(FileSystem):
    """Beam filesystem ``mem://`` held in a dict: an object store (no folders) that needs no network.

    Defining the class registers it: Beam finds filesystems among ``FileSystem``'s subclasses.
    """

    files: dict[str, bytes] = {}

    @classmethod
    def scheme(cls):
        return "mem"

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def has_dirs(self):
        return False

    def mkdirs(self, path):
        pass

    def _list(self, dir_or_prefix):
        for path, data in sorted(self.files.items()):
            if path.startswith(dir_or_prefix):
                yield FileMetadata(path, len(data))

    def create(self, path, mime_type=None, compression_type=None):
        files = self.files

        class Writer(io.BytesIO):
            def close(self):
                files[path] = self.getvalue()
                super().close()

        return Writer()

    def open(self, path, mime_type=None, compression_type=None):
        if path not in self.files:
            raise FileNotFoundError(path)
        return io.BytesIO(self.files[path])

    def copy(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            self.files[destination] = self.files[source]

    def rename(self, source_file_names, destination_file_names):
        for source, destination in zip(source_file_names, destination_file_names):
            self.files[destination] = self.files.pop(source)

    def exists(self, path):
        return path in self.files

    def size(self, path):
        return len(self.files[path])

    def last_updated(self, path):
        return 0.0

    def checksum(self, path):
        return str(len(self.files[path]))

    def metadata(self, path):
        return FileMetadata(path, len(self.files[path]))

    def delete(self, paths):
        for path in paths:
            del self.files[path]


def test_remote_paths_still_go_through_beams_filesystems(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(MemFileSystem, "files", {})
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            MemFileSystem.files[f"mem://bucket/{path.relative_to(dataset).as_posix()}"] = path.read_bytes()
    outputs = {}
    for where in (str(dataset), "mem://bucket"):
        assert main(["ls", where, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        outputs.setdefault("ls", []).append([{k: v for k, v in r.items() if k != "path"} for r in rows])
        for argv in (["stats", where, "--json"], ["validate", f"{where}/0000[01].tar", "--json"]):
            assert main(argv) == 0
            outputs.setdefault(argv[0], []).append(json.loads(capsys.readouterr().out))
        assert main(["show", f"{where}/*.tar", "--index", "2", "--json", "--save-images", str(tmp_path)]) == 0
        sample = json.loads(capsys.readouterr().out)
        outputs.setdefault("show", []).append({k: v for k, v in sample.items() if k not in ("image", "shard_path")})
    for name, (local, remote) in outputs.items():
        assert local == remote, name
    assert main(["ls", "mem://bucket/nope"]) == 2
    assert capsys.readouterr().err == "visinstruct ls: error: no such file or folder: mem://bucket/nope\n"
    # Writing to a URL goes through Beam too: a takedown rewrites the remote shard.
    (tmp_path / "urls.txt").write_text(str(dataset.parent / "images" / "1.png") + "\n")
    assert main(["remove", "mem://bucket", "--urls", str(tmp_path / "urls.txt")]) == 0
    assert "removed 1 samples" in capsys.readouterr().out
    assert "mem://bucket/rejected/remove-00000.parquet" in MemFileSystem.files
    assert main(["validate", "mem://bucket"]) == 0


GLOBS = [
    "d",
    "d/00000.tar",
    "d/nope.tar",
    "d/*",
    "d/",
    "d/*.tar",
    "d/00000.*",
    "d/.00002.*",
    "d/re*",
    "d/0000?.tar",
    "d/0000[01].tar",
    "d/0000[!1].tar",
    "d/[0-9]*",
    "d/**",
    "d/**.parquet",
    "d/*/*.parquet",
    "d/rejected/*",
    "./d/*.tar",
    "*/*.json",
    "*.tar",
    "nope/*",
    "d/0000[.tar",
]


@pytest.mark.parametrize("pattern", GLOBS)
def test_local_globs_match_what_beams_local_filesystem_matches(tmp_path, monkeypatch, pattern):
    monkeypatch.chdir(tmp_path)
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00000_stats.json", ".00002.tar.x.tmp", "0000[.tar"):
        Path("d", name).parent.mkdir(exist_ok=True)
        Path("d", name).write_bytes(name.encode())
    Path("d/rejected").mkdir()
    Path("d/rejected/ingest-00000.parquet").write_bytes(b"abc")
    Path("d/rejected/deeper").mkdir()
    Path("d/rejected/deeper/x.parquet").write_bytes(b"x")
    beam = sorted((m.path, m.size_in_bytes) for m in FileSystems.match([pattern])[0].metadata_list)
    assert sorted(shards.match(pattern)) == beam

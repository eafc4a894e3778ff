"""The package builds as Beam's --setup_file needs it (an sdist holding every subpackage and config), and the
console script lists the commands that exist."""

import ast
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_holds_every_subpackage_and_bundled_config(tmp_path):
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True, capture_output=True
    )
    (archive,) = tmp_path.glob("visinstruct-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(archive).getnames() if "/" in n}
    for package in ("visinstruct", "schemas", "configs", "transforms", "pipelines", "cli", "trainer", "testing"):
        assert f"{package}/__init__.py" in names
    assert "configs/ingest/example.yaml" in names and "README.md" in names and "setup.py" in names


def test_help_lists_the_commands_that_exist():
    out = subprocess.run(
        [sys.executable, "-m", "visinstruct.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("ingest", "demo", "config"):
        assert f"    {command}" in out


def test_the_test_kit_imports_nothing_above_schemas_and_configs():
    # testing/ is what tests and the demo build on: were it to import the trainer or the pipelines, a test of those
    # would test them against themselves, and the library could not ship without them.
    allowed = ("visinstruct.schemas", "visinstruct.configs", "visinstruct.testing")
    found = {}
    for path in sorted((ROOT / "testing").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("visinstruct") and not name.startswith(allowed):
                    found.setdefault(path.name, []).append(name)
    assert found == {}

"""Tars written member by member, as another tool (img2dataset, a webdataset user, a hand-made file) writes them.

Tests of the shard readers use these for what our own writer never writes: no index or stats beside the tar,
members in the order given, and whatever bytes the test chooses (a corrupt image, JSON that is no object, a sample
without an image).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path


def write_tar(path: str | Path, samples: Mapping[str, Mapping[str, bytes]]) -> str:
    """Write ``{key: {extension: bytes}}`` as members ``key.extension`` to ``path`` (its folder made if need be).

    Returns:
        ``path`` as text, as the pipelines and shard commands take it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)

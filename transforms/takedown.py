"""Takedown lists: URLs and image digests that must not be in a dataset.

``visinstruct remove`` takes samples out of existing shards; ingest (``dedup.takedown_lists``) keeps them out of
new ones: a listed URL is never downloaded, and a downloaded image whose sha256 is listed is dropped, both with
reason ``takedown``. Lists are text files (one URL or sha256 digest per line; blank lines and ``#`` comments
skipped) or parquet tables with ``url`` and/or ``sha256`` columns. A table with a ``status`` column, such as a
dataset's own index, contributes only its rows whose status is ``takedown``: so an earlier dataset's indexes carry
its removals into a rebuild.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.parquet as pq

from visinstruct.transforms.shards import exists, match, open_read, read_bytes

REASON = "takedown"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TakedownError(ValueError):
    """A takedown list that cannot be read or holds a malformed entry."""


@dataclass(frozen=True)
class Takedown:
    """What to remove: URLs (compared after stripping whitespace) and sha256 hex digests (lower case)."""

    urls: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()

    def match(self, url: str | None, sha256: str | None) -> str | None:
        """``"url"`` or ``"sha256"`` when a row matches, else ``None``."""
        if url is not None and url.strip() in self.urls:
            return "url"
        if sha256 is not None and sha256.strip().lower() in self.sha256:
            return "sha256"
        return None

    def __or__(self, other: Takedown) -> Takedown:
        return Takedown(self.urls | other.urls, self.sha256 | other.sha256)

    def __bool__(self) -> bool:
        return bool(self.urls or self.sha256)


def read_list(path: str) -> list[str]:
    """The entries of a text list: one per line, whitespace stripped; blank lines and ``#`` comments skipped."""
    if not exists(path):
        raise TakedownError(f"no such takedown list: {path}")
    try:
        text = read_bytes(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:  # Beam's filesystems raise BeamIOError, an OSError
        raise TakedownError(f"cannot read {path}: {e}".splitlines()[0]) from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_takedown(urls_file: str | None = None, sha256_file: str | None = None) -> Takedown:
    """A :class:`Takedown` from a file of URLs and/or a file of sha256 digests; refuses a malformed digest."""
    if not urls_file and not sha256_file:
        raise TakedownError("give a list of URLs or of sha256 digests (or both)")
    digests = [d.lower() for d in read_list(sha256_file)] if sha256_file else []
    bad = [d for d in digests if not _SHA256.fullmatch(d)]
    if bad:  # a URL list passed as digests would otherwise silently match nothing
        raise TakedownError(f"{sha256_file}: {bad[0]!r} is not a sha256 hex digest ({len(bad)} such lines)")
    return Takedown(frozenset(read_list(urls_file)) if urls_file else frozenset(), frozenset(digests))


def _from_table(path: str) -> Takedown:
    try:
        with open_read(path) as f:
            table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for a bad file; the message says which
        raise TakedownError(f"cannot read {path}: {e}".splitlines()[0]) from e
    columns = [c for c in ("url", "sha256") if c in table.column_names]
    if not columns:
        raise TakedownError(f"{path}: a takedown table needs a 'url' or 'sha256' column")
    more = [c for c in ("image_locations", "image_sha256s", "status") if c in table.column_names]  # our indexes
    rows = [r for r in table.select(columns + more).to_pylist() if r.get("status", REASON) == REASON]
    urls = [r.get("url") for r in rows] + [u for r in rows for u in r.get("image_locations") or []]
    digests = [r.get("sha256") for r in rows] + [d for r in rows for d in r.get("image_sha256s") or []]
    return Takedown(frozenset(u.strip() for u in urls if u), frozenset(d.strip().lower() for d in digests if d))


def load_takedown_lists(specs: list[str]) -> Takedown:
    """Every list ``specs`` name (paths or globs; text or parquet) as one :class:`Takedown`.

    A text line that is a sha256 hex digest counts as one; any other line as a URL.
    """
    takedown = Takedown()
    for spec in specs:
        matches = sorted(m.path for m in match(spec))
        if not matches:
            raise TakedownError(f"no takedown list matches {spec}")
        for path in matches:
            if path.endswith(".parquet"):
                takedown |= _from_table(path)
                continue
            entries = read_list(path)
            digests = {e.lower() for e in entries if _SHA256.fullmatch(e.lower())}
            takedown |= Takedown(frozenset(e for e in entries if e.lower() not in digests), frozenset(digests))
    return takedown

"""Benchmark decontamination: does a sample copy an evaluation benchmark's questions or images? Plain functions.

Every hit is a drop with reason ``benchmark_overlap``, the benchmark named in the message and the detail.

Text (:class:`QuestionIndex`, :func:`conversation_overlap`). Texts are compared as :func:`words` (NFKC, casefolded,
apostrophes removed, split on everything that is not a letter or digit, LLaVA's ``<image>`` token dropped), so
case, punctuation and the image token never hide a copy. A benchmark question of at least ``n`` words contributes
its ``n``-word runs (``n``-grams): a turn sharing any of them copies it. A shorter question contributes its whole
word sequence, matched as a contiguous run anywhere in a turn: this is how short templated questions (easy-VQA's
"what color is the shape?") are caught at all. Questions under :data:`MIN_QUESTION_WORDS` words ("what is
this?") are ignored: they are too generic to mark a copy. Human and gpt turns are both checked (an answer can leak
a benchmark's question just as well), each on its own: a run never spans two turns. Templated benchmarks share
their templates between splits (all 107 distinct easy-VQA questions are in both train and test), so for them a
question hit means "asks a benchmark template", not "copies a test item": images are the check that tells.

Images (:func:`reference_phashes`, :class:`PhashIndex`, :func:`phash_overlap`, :class:`ReferenceEmbeddings`,
:func:`embedding_overlap`). Benchmark images are read from a folder, glob or brace pattern of image files or our
shards, on any Beam filesystem; a reference that cannot be read or decoded is skipped with a logged warning (one
bad file in a benchmark folder must not stop a run), but a benchmark of which nothing is usable raises. pHashes
are :func:`visinstruct.transforms.images.phash` of the decoded image, as ingest computes them, so a sample's JSON
``phash`` compares directly.

Ties: when several references match, the smallest ``(benchmark, question or reference)`` is reported, so the same
inputs give the same dead-letter row on any runner.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from visinstruct.configs.curate import BenchmarkConfig, DecontaminateConfig
from visinstruct.schemas import Decision, Dropped, Turn
from visinstruct.transforms.dedup import band_keys
from visinstruct.transforms.images import decode_rgb, phash
from visinstruct.transforms.layout import (
    GLOB_CHARS,
    IMAGE_EXTENSIONS,
    TAR_SUFFIX,
    expand_braces,
    image_member,
    match_paths,
)
from visinstruct.transforms.shards import ShardReadError, UnsafeMember, is_remote, open_read, read_tar_samples

REASON = "benchmark_overlap"
BAD_PHASH = "bad_phash"
MIN_QUESTION_WORDS = 3  # shorter questions are too generic to mark a copy
MAX_QUESTION_FILE_BYTES = 1 << 30  # a question file is read whole: refuse what cannot be one
MAX_IMAGE_BYTES = 64 << 20  # a reference image file larger than this is skipped
QUOTE_CHARS = 120  # how much of a benchmark question a message quotes
QUESTION_FIELDS = ("question", "text", "prompt")  # an object's question, first present wins
HUMAN_ROLES = ("human", "user")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
EMBEDDING_MARGIN = 1e-3  # float32 candidates within this of the threshold are rechecked in float64

log = logging.getLogger(__name__)

_APOSTROPHES = re.compile("['\u2019\u02bc]")
_WORD = re.compile(r"[^\W_]+")
_IMAGE_TOKEN = "<image>"


def words(text: str) -> list[str]:
    """Normalised word tokens: NFKC, casefolded, ``<image>`` dropped, apostrophes removed ("what's" is "whats"),
    split on every run of characters that are not letters or digits."""
    text = unicodedata.normalize("NFKC", text).casefold().replace(_IMAGE_TOKEN, " ")
    return _WORD.findall(_APOSTROPHES.sub("", text))


# ---------------------------------------------------------------------------------------------------------------------
# Questions: loading


def load_questions(pattern: str, max_bytes: int = MAX_QUESTION_FILE_BYTES) -> list[str]:
    """Every question in the files a path, glob or brace pattern matches (any Beam filesystem), files sorted.

    A file holds one of: a JSON list of strings; of lists whose first element is the question (easy-VQA's
    ``[[question, answer, image_id], ...]``); of objects with ``question`` (or ``text``, ``prompt``); LLaVA JSON
    (objects with ``conversations``: their human turns, ``<image>`` removed); an object whose ``questions`` is
    such a list (VQAv2's question files); JSON lines of such items; or plain text (``.txt`` or no JSON), one
    question per line.

    Raises:
        ValueError: one line naming the pattern or file: nothing matches, a folder, a file over
            ``max_bytes`` (they are read whole), not UTF-8, not JSON where JSON is expected, an item of no known shape,
            or no question at all.
    """
    files = _matched_files(pattern)
    if not files:
        raise ValueError(f"benchmark questions: nothing matches {pattern}")
    questions = []
    for path, size in files:
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes is over the question file cap of {max_bytes} bytes")
        questions.extend(_file_questions(path, _read_capped(path, max_bytes)))
    if not questions:
        raise ValueError(f"benchmark questions: {pattern} holds no questions")
    return questions


def _matched_files(pattern: str) -> list[tuple[str, int]]:
    """``(path, size)`` of the files a path, glob or brace pattern names, sorted; a folder raises ``ValueError``."""
    found = {}
    for piece in expand_braces(pattern):
        if not is_remote(piece) and os.path.isdir(piece):
            raise ValueError(f"benchmark questions: {piece} is a folder; give a file or a glob ({piece}/*.json)")
        bare = not is_remote(piece) and "/" not in piece and any(c in piece for c in GLOB_CHARS)
        for info in match_paths(f"./{piece}" if bare else piece):  # a glob with no folder part matches nothing
            found[info.path[2:] if bare else info.path] = info.size
    return sorted(found.items())


def _read_capped(path: str, cap: int) -> bytes:
    with open_read(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{path}: over the cap of {cap} bytes")
    return data


def _file_questions(path: str, data: bytes) -> list[str]:
    """The questions of one file's bytes (see :func:`load_questions`); ``ValueError`` naming ``path`` otherwise."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so no question file") from None
    if "\0" in text:
        raise ValueError(f"{path}: binary data, so no question file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt" or (suffix not in JSON_SUFFIXES and text.lstrip()[:1] not in ("[", "{")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        items = _json_items(path, json.loads(text))
    except json.JSONDecodeError as whole:
        try:  # JSON lines (also under a .json name, which happens often)
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({whole})") from None
    return [q for i, item in enumerate(items) for q in _item_questions(path, i, item)]


def _json_items(path: str, data: object) -> list:
    if isinstance(data, dict) and isinstance(data.get("questions"), list):
        return data["questions"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions (or an object with 'questions')")
    return data


def _item_questions(path: str, i: int, item: object) -> list[str]:
    """The questions of one list item or JSON line (LLaVA records hold several)."""
    if isinstance(item, list) and item and isinstance(item[0], str):
        item = item[0]
    if isinstance(item, dict) and isinstance(item.get("conversations"), list):
        turns = [t for t in item["conversations"] if isinstance(t, dict) and t.get("from") in HUMAN_ROLES]
        return [v.replace(_IMAGE_TOKEN, "").strip() for t in turns if isinstance(v := t.get("value"), str)]
    if isinstance(item, dict):
        item = next((item[k] for k in QUESTION_FIELDS if isinstance(item.get(k), str)), item)
    if not isinstance(item, str):
        shape = f"an object with keys {sorted(item)[:5]}" if isinstance(item, dict) else type(item).__name__
        raise ValueError(
            f"{path}: item {i} is {shape}, not a question (a string, a list starting with one, an object with "
            f"{'/'.join(QUESTION_FIELDS)}, or LLaVA 'conversations')"
        )
    return [item.strip()] if item.strip() else []


# ---------------------------------------------------------------------------------------------------------------------
# Questions: matching


class QuestionIndex:
    """Word runs of benchmark questions in hash sets keyed by run length, for :meth:`match` in one pass per length.

    A question of at least ``n`` words contributes its ``n``-grams; a shorter one its whole word sequence; one
    under :data:`MIN_QUESTION_WORDS` words nothing (counted in ``ignored``). Each run maps to the smallest
    ``(benchmark, question)`` holding it.
    """

    def __init__(self, questions: Mapping[str, Iterable[str]], n: int):
        if n < MIN_QUESTION_WORDS:
            raise ValueError(f"n-gram length must be at least {MIN_QUESTION_WORDS}, got {n}")
        self.n = n
        self.runs: dict[int, dict[tuple[str, ...], tuple[str, str]]] = {}
        self.ignored: dict[str, int] = {}
        for benchmark in sorted(questions):
            self.ignored[benchmark] = 0
            for question in questions[benchmark]:
                tokens = tuple(words(question))
                if len(tokens) < MIN_QUESTION_WORDS:
                    self.ignored[benchmark] += 1
                    continue
                size = min(len(tokens), n)
                runs, hit = self.runs.setdefault(size, {}), (benchmark, question.strip())
                for i in range(len(tokens) - size + 1):
                    gram = tokens[i : i + size]
                    if gram not in runs or hit < runs[gram]:
                        runs[gram] = hit

    def __len__(self) -> int:
        """Distinct word runs indexed."""
        return sum(len(runs) for runs in self.runs.values())

    def match(self, text: str) -> tuple[str, str] | None:
        """``(benchmark, question)`` of the smallest benchmark question ``text`` copies a run of, or ``None``."""
        tokens = words(text)
        hits = [
            hit
            for size, runs in self.runs.items()
            for i in range(len(tokens) - size + 1)
            if (hit := runs.get(tuple(tokens[i : i + size]))) is not None
        ]
        return min(hits) if hits else None


def question_index(cfg: DecontaminateConfig) -> QuestionIndex | None:
    """The index of every configured benchmark's questions, or ``None`` when no benchmark gives questions."""
    questions = {b.name: load_questions(b.questions) for b in cfg.benchmarks if b.questions}
    return QuestionIndex(questions, cfg.ngram) if questions else None


def conversation_overlap(turns: Sequence[Turn], index: QuestionIndex, n: int | None = None) -> Decision:
    """Keep, or drop ``benchmark_overlap`` when any turn (human or gpt: answers leak too) copies a benchmark
    question; the smallest ``(benchmark, question)`` over all turns is reported, with the first turn holding it."""
    if n is not None and n != index.n:
        raise ValueError(f"the question index holds {index.n}-grams, not {n}-grams")
    found = [(hit, i) for i, turn in enumerate(turns) if (hit := index.match(str(turn.value or "")))]
    if not found:
        return Decision.keep()
    (benchmark, question), turn = min(found)
    quoted = question if len(question) <= QUOTE_CHARS else question[:QUOTE_CHARS] + "..."
    what = "question" if turns[turn].role in HUMAN_ROLES else "answer"
    return Decision.drop(
        REASON,
        f"{what} copies {benchmark}: {quoted!r}",
        {"benchmark": benchmark, "question": question, "method": "ngram", "ngram": index.n, "turn": turn},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Images: references


def reference_files(spec: str) -> list[str]:
    """The image files and shards a folder (its own files, not subfolders), glob or brace pattern names, sorted.

    Raises:
        ValueError: nothing matches, or what matches holds no image (``IMAGE_EXTENSIONS``) and no ``.tar``.
    """
    suffixes = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS) + (TAR_SUFFIX,)
    paths = set()
    for piece in expand_braces(spec):
        bare = not is_remote(piece) and "/" not in piece
        matches = [m.path for m in match_paths(f"./{piece}" if bare else piece)]
        if not any(c in piece for c in GLOB_CHARS) and _folder(piece, matches):
            matches = [m.path for m in match_paths(piece.rstrip("/") + "/*")]
        if not matches:
            raise ValueError(f"benchmark images: nothing matches {piece}")
        paths.update(p[2:] if bare else p for p in matches)
    found = sorted(p for p in paths if p.lower().endswith(suffixes))
    if not found:
        raise ValueError(f"benchmark images: {spec} names {len(paths)} files but no images or shards ({suffixes})")
    return found


def _folder(piece: str, matches: list[str]) -> bool:
    if not is_remote(piece):
        return os.path.isdir(piece)
    return piece.endswith("/") or not matches  # object stores: a prefix with no file of its own name


def read_reference(path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, image bytes)`` of one reference file: an image (named by its path) or a shard (each sample's
    image member, named ``<shard>/<key>``). What cannot be read is skipped with a warning."""
    if not path.endswith(TAR_SUFFIX):
        try:
            yield path, _read_capped(path, MAX_IMAGE_BYTES)
        except (OSError, ValueError) as e:
            log.warning("benchmark image %s skipped: %s", path, str(e).splitlines()[0] if str(e) else type(e))
        return
    try:
        for key, sample in read_tar_samples(path):
            ext = image_member(sample)
            if ext is not None:
                yield f"{path}/{key}", sample[ext]
    except (ShardReadError, UnsafeMember, OSError) as e:  # the whole samples before the problem were yielded
        log.warning("benchmark shard %s: the rest skipped: %s", path, str(e).splitlines()[0] if str(e) else type(e))


def reference_images(benchmark: BenchmarkConfig) -> list[tuple[str, bytes]]:
    """Every ``(name, image bytes)`` of a benchmark's ``images`` (see :func:`reference_files`, :func:`read_reference`).

    Holds all bytes in memory: for large benchmarks iterate :func:`read_reference` over :func:`reference_files`.
    """
    if not benchmark.images:
        return []
    return [ref for path in reference_files(benchmark.images) for ref in read_reference(path)]


def reference_phashes(benchmarks: Iterable[BenchmarkConfig]) -> list[tuple[str, str, str]]:
    """``(benchmark, reference name, phash hex)`` of every decodable image of the benchmarks that give images.

    Images that do not decode are skipped with a warning; a benchmark with images of which none decodes raises
    ``ValueError`` (its references would silently check nothing).
    """
    rows = []
    for benchmark in benchmarks:
        if not benchmark.images:
            continue
        hashes, skipped = [], 0
        for path in reference_files(benchmark.images):
            for name, data in read_reference(path):
                try:
                    hashes.append((benchmark.name, name, phash(decode_rgb(data))))
                except Dropped as e:
                    skipped += 1
                    log.warning("benchmark %s: image %s skipped (%s: %s)", benchmark.name, name, e.reason, e.message)
        if not hashes:
            raise ValueError(f"benchmark {benchmark.name!r}: no image of {benchmark.images} could be read")
        if skipped:
            log.warning("benchmark %s: %d of %d images skipped", benchmark.name, skipped, skipped + len(hashes))
        rows.extend(sorted(hashes))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Images: matching


class PhashIndex:
    """Reference pHashes cut into ``max_distance + 1`` bands (see :func:`~visinstruct.transforms.dedup.band_keys`):
    any hash within ``max_distance`` bits of a reference shares a band with it, so a lookup compares only the
    references sharing a band, not all of them (large distances make bands narrow and degrade towards linear)."""

    def __init__(self, rows: Iterable[tuple[str, str, str]], max_distance: int):
        by_hash: dict[int, tuple[str, str]] = {}  # distinct hash -> its smallest (benchmark, reference)
        for benchmark, name, h in rows:
            value = int(h, 16)
            if value not in by_hash or (benchmark, name) < by_hash[value]:
                by_hash[value] = (benchmark, name)
        self.max_distance = max_distance
        self.values = np.array(sorted(by_hash), dtype=np.uint64)
        self.owners = [by_hash[int(v)] for v in self.values]
        bands: dict[tuple[int, int], list[int]] = {}
        for i, v in enumerate(self.values):
            for band in band_keys(f"{int(v):016x}", max_distance):
                bands.setdefault(band, []).append(i)
        self.bands = {band: np.array(ids, dtype=np.int64) for band, ids in bands.items()}

    def __len__(self) -> int:
        return len(self.values)

    def match(self, h: str, max_distance: int | None = None) -> tuple[str, str, int] | None:
        """``(benchmark, reference, distance)`` of the smallest ``(benchmark, reference)`` within ``max_distance``
        (at most the index's) bits of ``h``, or ``None``."""
        d = self.max_distance if max_distance is None else max_distance
        if d > self.max_distance:
            raise ValueError(f"this index finds hashes within {self.max_distance} bits, not {d}")
        found = [self.bands[b] for b in band_keys(h, self.max_distance) if b in self.bands]
        if not found:
            return None
        ids = np.unique(np.concatenate(found))
        distances = np.bitwise_count(self.values[ids] ^ np.uint64(int(h, 16)))
        near = [(*self.owners[i], int(dist)) for i, dist in zip(ids, distances) if dist <= d]
        return min(near) if near else None


def phash_overlap(h: str, refs: PhashIndex | Sequence[tuple[str, str, str]], max_distance: int) -> Decision:
    """Keep, or drop ``benchmark_overlap`` when ``h`` lies within ``max_distance`` bits of a reference pHash.

    ``refs`` is a :class:`PhashIndex` (build it once: its lookup does not scan every reference) or the rows of
    :func:`reference_phashes` (indexed on every call: for a few references only). A hash that is not 16 hex digits
    (a sample without one) is dropped ``bad_phash``: it cannot be checked.
    """
    if not isinstance(h, str) or not re.fullmatch(r"[0-9a-fA-F]{16}", h):
        return Decision.drop(BAD_PHASH, f"cannot check the image against benchmarks: pHash {h!r} is not 16 hex digits")
    index = refs if isinstance(refs, PhashIndex) else PhashIndex(refs, max_distance)
    hit = index.match(h, max_distance)
    if hit is None:
        return Decision.keep()
    benchmark, reference, distance = hit
    return Decision.drop(
        REASON,
        f"image is {distance} bits from {benchmark} image {reference}",
        {"benchmark": benchmark, "reference": reference, "method": "phash", "distance": distance},
    )


@dataclass(frozen=True, eq=False)
class ReferenceEmbeddings:
    """Benchmark image embeddings: row ``i`` of ``matrix`` (float32, unit length) is ``references[i]`` of
    ``benchmarks[i]``; rows sorted by ``(benchmark, reference)``."""

    benchmarks: tuple[str, ...]
    references: tuple[str, ...]
    matrix: np.ndarray

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, np.ndarray]]) -> ReferenceEmbeddings:
        """From ``(benchmark, reference, vector)`` rows in any order; vectors are normalised here.

        Raises:
            ValueError: no rows, vectors of different lengths, or a vector that is zero or not finite.
        """
        rows = sorted(rows, key=lambda r: (r[0], r[1]))
        if not rows:
            raise ValueError("no reference embeddings")
        vectors = [np.asarray(r[2], dtype=np.float64) for r in rows]
        if len({v.shape for v in vectors}) != 1 or vectors[0].ndim != 1:
            raise ValueError(
                f"reference embeddings must be vectors of one length, got {sorted({v.shape for v in vectors})}"
            )
        matrix = np.stack(vectors)
        norms = np.linalg.norm(matrix, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if bad.size:
            raise ValueError(f"reference embedding {rows[bad[0]][0]}/{rows[bad[0]][1]} is zero or not finite")
        return cls(tuple(r[0] for r in rows), tuple(r[1] for r in rows), (matrix / norms[:, None]).astype(np.float32))


def embedding_overlaps(embeddings: np.ndarray, refs: ReferenceEmbeddings, threshold: float) -> list[Decision]:
    """:func:`embedding_overlap` for a batch (rows of ``embeddings``), the same decisions whatever the batch.

    One float32 product finds candidates within :data:`EMBEDDING_MARGIN` of the threshold; each candidate's cosine
    is then recomputed in float64 row by row, so a batched product's rounding never decides a hit.
    """
    batch = np.asarray(embeddings, dtype=np.float64)
    if batch.ndim != 2 or batch.shape[1] != refs.matrix.shape[1]:
        raise ValueError(f"embeddings of shape {batch.shape} do not match references of {refs.matrix.shape[1]}")
    norms = np.linalg.norm(batch, axis=1)
    if not np.all(np.isfinite(norms) & (norms > 0)):
        raise ValueError("an embedding is zero or not finite")
    unit = batch / norms[:, None]
    rough = unit.astype(np.float32) @ refs.matrix.T
    return [
        _embedding_decision(unit[i], np.flatnonzero(rough[i] >= threshold - EMBEDDING_MARGIN), refs, threshold)
        for i in range(len(unit))
    ]


def _embedding_decision(unit: np.ndarray, candidates: np.ndarray, refs: ReferenceEmbeddings, threshold: float):
    cosines = np.sum(refs.matrix[candidates].astype(np.float64) * unit, axis=1)
    hits = candidates[cosines >= threshold]
    if not hits.size:
        return Decision.keep()
    i = int(hits[0])  # rows are sorted by (benchmark, reference): the first hit is the smallest
    cosine = float(cosines[np.searchsorted(candidates, i)])
    benchmark, reference = refs.benchmarks[i], refs.references[i]
    return Decision.drop(
        REASON,
        f"image is {cosine:.3f} cosine-similar to {benchmark} image {reference}",
        {"benchmark": benchmark, "reference": reference, "method": "embedding", "cosine": round(cosine, 6)},
    )


def embedding_overlap(embedding: np.ndarray, refs: ReferenceEmbeddings, threshold: float) -> Decision:
    """Keep, or drop ``benchmark_overlap`` when ``embedding`` is at least ``threshold`` cosine-similar to a
    reference (the smallest ``(benchmark, reference)`` among those is reported).

    Raises:
        ValueError: an embedding of the wrong length, zero or not finite (a model bug, not a property of data).
    """
    return embedding_overlaps(np.asarray(embedding)[None, :], refs, threshold)[0]

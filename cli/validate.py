"""``validate``: check shards against FORMAT.md and report every problem found, never extracting anything.

Each shard's tar is streamed once: members are checked for safe names before any data is read, each sample's
JSON is parsed against :class:`SampleMeta` and its image decoded; then the parquet index and ``_stats.json`` are
compared with what the tar holds. Problem codes (stable, for scripts and tests):

=======================  ===================================================================================
tar_missing              the index or stats name a shard whose tar is gone
bad_tar                  the tar cannot be read (corrupt header, garbage after the last member)
truncated                the tar ends early: inside a member, or without the end-of-archive blocks
unsafe_name              a member name that could escape a folder (``../x``, ``/x``); never extracted
link_member              a symlink, hard link, device or folder member; never extracted
members_not_adjacent     a sample's members are split by another sample's
duplicate_member         a sample has the same member twice
missing_member           a sample lacks its image, ``.txt`` or ``.json`` (a text-only sample, JSON ``image_count``
                         0, needs no image)
image_count_mismatch     the JSON's ``image_count`` and the sample's image members disagree in kind: image
                         members on a text-only sample, numbered members on a single-image one, a plain or
                         no image member on a multi-image one, a negative count
missing_image_member     a multi-image sample lacks the numbered member of an image (``KEY.2.jpg``)
unexpected_image_member  a multi-image sample's numbered member past its ``image_count``, numbered oddly
                         (``KEY.01.jpg``), or a second member for the same image
mixed_image_members      a plain ``KEY.jpg`` next to numbered members (``KEY.0.jpg``...)
image_list_mismatch      the JSON's ``images`` does not list the numbered members in order (one entry per image,
                         ``member`` the member's name), or lists images for a sample that is not multi-image
bad_json                 the ``.json`` member is not JSON
bad_metadata             the JSON does not fit :class:`SampleMeta` (wrong types, bad boxes, no key)
key_mismatch             the JSON's ``key`` is not the members' key
bad_conversation         a conversation that is not valid training data (``conversation_problems``)
bad_image                an image does not decode
image_size_mismatch      the decoded size is not the JSON's ``width`` x ``height`` (a multi-image sample's: its
                         ``images`` entry's)
duplicate_key            a key appears twice, in one index or across shards
index_missing            no parquet index beside the tar
bad_index                the index cannot be read
key_not_in_tar           the index says written, the tar has no such sample
key_not_in_index         the tar holds a sample the index does not list as written
index_offset_mismatch    the index's member names, offsets or sizes do not point at the member data
incomplete               no ``_stats.json``: the shard was never finished
bad_stats                ``_stats.json`` cannot be read or its counts do not add up
stats_mismatch           ``_stats.json`` disagrees with the tar or the index
=======================  ===================================================================================

Sample shapes (FORMAT.md): a single image ``KEY.jpg`` (or ``jpeg``, ``png``, ``webp``) with no ``image_count`` (or
1); a text-only sample, ``image_count`` 0 and no image member; a multi-image sample, ``image_count`` n >= 2 and the
members ``KEY.0.EXT`` ... ``KEY.(n-1).EXT``, each decoded and checked against its ``images`` entry. Each shape's
conversation is checked for its number of ``<image>`` placeholders. A sample whose JSON cannot be read is checked
as its members suggest.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from visinstruct.cli.shards import Progress, file_size, read_index
from visinstruct.schemas import IndexRow, Member, SampleMeta, conversation_problems, from_table
from visinstruct.transforms.layout import (
    IMAGE_EXTENSIONS,
    IMG2DATASET_STAGE,
    ShardError,
    ShardFiles,
    image_member,
    read_stats,
    shard_files,
)
from visinstruct.transforms.shards import (
    UnsafeMember,
    check_member,
    exists,
    filled_columns,
    open_read,
    tar_end_problem,
)

TarSamples = dict[str, list[Member]]  # key -> where its members' data lie, in tar order


class Problem(NamedTuple):
    """One thing wrong with a shard; ``key`` is ``None`` when the problem is not about one sample."""

    shard: str
    key: str | None
    code: str
    message: str


@dataclass
class Report:
    """What ``validate`` checked and the problems it found."""

    shards: int = 0
    samples: int = 0
    images: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, shard: str, key: str | None, code: str, message: str) -> None:
        self.problems.append(Problem(shard, key, code, message))

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "shards": self.shards,
            "samples": self.samples,
            "images": self.images,
            "problems": [p._asdict() for p in self.problems],
            "problems_by_code": dict(Counter(p.code for p in self.problems).most_common()),
        }


def validate(paths: list[str], progress: Progress | None = None) -> Report:
    """Check every shard of ``paths`` (tar paths from :func:`~visinstruct.transforms.layout.resolve_shards`)."""
    report, seen_keys = Report(), {}
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        samples = _check_tar(files, report)
        rows = _check_index(files, samples, report)
        _check_stats(files, samples, rows, report)
        for key in samples or ([r.key for r in rows if r.status == "success"] if rows else []):
            if key in seen_keys:
                report.add(files.name, key, "duplicate_key", f"key {key} is also in shard {seen_keys[key]}")
            seen_keys.setdefault(key, files.name)
        report.shards += 1
        if progress:
            progress(done, len(paths))
    return report


def _check_tar(files: ShardFiles, report: Report) -> TarSamples | None:
    """Stream the tar, checking each sample; ``None`` when it is missing or unreadable to the end."""
    size = file_size(files.tar)
    if size is None:
        report.add(files.name, None, "tar_missing", f"{files.tar} does not exist")
        return None
    samples: TarSamples = {}
    key, current = None, {}
    try:
        with (
            open_read(files.tar, "application/x-tar") as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
        ):
            for info in tar:
                try:
                    check_member(info)
                except UnsafeMember as e:  # skipped before its data is read: nothing unsafe is ever opened
                    report.add(files.name, None, "link_member" if not info.isfile() else "unsafe_name", str(e))
                    continue
                stem, _, ext = posixpath.basename(info.name).partition(".")
                if stem != key:
                    if key is not None:
                        _check_sample(files.name, key, current, report)
                    if stem in samples:
                        report.add(
                            files.name,
                            stem,
                            "members_not_adjacent",
                            f"{info.name} comes after members of another sample",
                        )
                    key, current = stem, {}
                    samples.setdefault(key, [])
                if ext in current:
                    report.add(files.name, key, "duplicate_member", f"{info.name} appears twice")
                current[ext] = tar.extractfile(info).read()
                samples[key].append(Member(info.name, info.offset_data, info.size))
            end = tar.offset  # where the end-of-archive blocks must start
    except tarfile.TarError as e:  # stream mode turns every header and data error into ReadError
        code = "truncated" if "unexpected end" in str(e) else "bad_tar"
        report.add(files.name, key, code, f"{files.tar}: {e}")
        return None
    if not _check_end(files, end, report):
        return None  # the last sample may be cut short: reporting its missing members would only repeat that
    if key is not None:
        _check_sample(files.name, key, current, report)
    return samples


def _check_end(files: ShardFiles, end: int, report: Report) -> bool:
    """tarfile stops quietly at a bad or cut header; only the end-of-archive blocks prove the tar is whole."""
    problem = tar_end_problem(files.tar, end)
    if problem is not None:
        report.add(files.name, None, problem.code, problem.message)
    return problem is None


def _check_sample(shard: str, key: str, sample: dict[str, bytes], report: Report) -> None:
    report.samples += 1
    meta = _check_meta(shard, key, sample["json"], report) if "json" in sample else None
    plain, numbered = image_member(sample), _numbered_members(sample)
    count = meta.n_images if meta is not None else len(numbered) if numbered and not plain else 1
    missing = [f"an image ({'/'.join(IMAGE_EXTENSIONS)})"] * (count == 1 and plain is None and not numbered)
    missing += [f".{e}" for e in ("txt", "json") if e not in sample]
    if missing:
        report.add(shard, key, "missing_member", f"sample {key} has no {' and no '.join(missing)}")
    if plain is not None and numbered:
        names = ", ".join(f"{key}.{name}" for _, name in numbered)
        report.add(shard, key, "mixed_image_members", f"sample {key} has {key}.{plain} and numbered images {names}")
    if meta is not None:
        _check_shape(shard, key, meta, plain, numbered, report)
    if numbered and (count >= 2 or plain is None):
        # A JSON that disagrees in kind is reported above: the members are then checked as they are.
        multi = count >= 2 and meta is not None
        _check_numbered(
            shard, key, sample, numbered, count if multi else len(numbered), meta if multi else None, report
        )
    elif plain is not None:
        size = meta and meta.width is not None and (meta.width, meta.height)
        _check_image(shard, key, f"image of {key}", sample[plain], size or None, report)


def _numbered_members(sample: dict[str, bytes]) -> list[tuple[str, str]]:
    """``(index as written, member)`` of every numbered image member (``0.jpg``, ``01.png``...), sorted by index."""
    found = []
    for name in sample:
        index, _, ext = name.partition(".")
        if index.isascii() and index.isdigit() and ext in IMAGE_EXTENSIONS:
            found.append((index, name))
    return sorted(found, key=lambda item: (int(item[0]), item[1]))


def _check_shape(
    shard: str, key: str, meta: SampleMeta, plain: str | None, numbered: list[tuple[str, str]], report: Report
) -> None:
    """The JSON's ``image_count`` and ``images`` against the kind of image members the sample has."""
    count, members = meta.n_images, [f"{key}.{name}" for name in [plain] * bool(plain) + [n for _, n in numbered]]
    problem = None
    if count < 0:
        problem = f"{key}.json says image_count {count}"
    elif count == 0 and members:
        problem = f"{key}.json says image_count 0 (text-only), the sample has {', '.join(members)}"
    elif count == 1 and numbered and plain is None:
        problem = f"{key}.json describes one image (no image_count), the sample has numbered {', '.join(members)}"
    elif count >= 2 and not numbered:
        problem = f"{key}.json says image_count {count}, the sample has " + (members[0] if plain else "no image")
    if problem:
        report.add(shard, key, "image_count_mismatch", problem)
    if count < 2 and meta.images:
        report.add(
            shard, key, "image_list_mismatch", f"{key}.json lists {len(meta.images)} images for a {count}-image sample"
        )


def _check_numbered(
    shard: str,
    key: str,
    sample: dict[str, bytes],
    numbered: list[tuple[str, str]],
    count: int,
    meta: SampleMeta | None,
    report: Report,
) -> None:
    """A multi-image sample's members ``0.EXT`` .. ``(count-1).EXT``: each present once, decoding, of its size."""
    by_index: dict[int, list[str]] = {}
    for index, name in numbered:
        if str(int(index)) != index or int(index) >= count:
            why = "numbered oddly" if str(int(index)) != index else f"past image_count {count}"
            report.add(shard, key, "unexpected_image_member", f"{key}.{name} is {why}")
        else:
            by_index.setdefault(int(index), []).append(name)
    for names in by_index.values():
        if len(names) > 1:
            shown = " and ".join(f"{key}.{n}" for n in names)
            report.add(
                shard, key, "unexpected_image_member", f"image {names[0].partition('.')[0]} is stored twice: {shown}"
            )
    # at most len(numbered) + 1 indexes are looked at: a hostile image_count (10**12) costs nothing more
    absent = [i for i in range(min(count, len(numbered) + 11)) if i not in by_index]
    if absent:
        missing = count - len(by_index)
        shown = ", ".join(f"{key}.{i}.*" for i in absent[:10]) + (f" ({missing} in all)" if missing > 10 else "")
        report.add(shard, key, "missing_image_member", f"sample {key} has {count} images but no {shown}")
    listed = [image.member for image in meta.images] if meta is not None else []
    # Each image's member: the one the JSON lists when it is there (a second member for it is reported above).
    order = [listed[i] if i < len(listed) and listed[i] in by_index[i] else by_index[i][0] for i in sorted(by_index)]
    if listed and not absent and listed != order:  # with members missing, the list cannot match: said above
        report.add(
            shard,
            key,
            "image_list_mismatch",
            f"{key}.json lists images {listed}, the sample has members {order}"[:500],
        )
    elif meta is not None and not meta.images and count >= 2:
        report.add(shard, key, "image_list_mismatch", f"{key}.json has image_count {count} and no images list")
    infos = {image.member: image for image in meta.images} if meta is not None else {}
    for i, name in zip(sorted(by_index), order):
        info = infos.get(name)
        size = (info.width, info.height) if info is not None and info.width is not None else None
        _check_image(shard, key, f"image {i} of {key} ({key}.{name})", sample[name], size, report)


def _check_meta(shard: str, key: str, data: bytes, report: Report) -> SampleMeta | None:
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting past the stack
        report.add(shard, key, "bad_json", f"{key}.json: {type(e).__name__}: {e}"[:500])
        return None
    try:
        meta = SampleMeta.from_dict(parsed)  # ValueError for every shape that is not a sample's
    except ValueError as e:
        report.add(shard, key, "bad_metadata", f"{key}.json: {e}")
        return None
    if meta.key != key:
        report.add(shard, key, "key_mismatch", f"{key}.json says key {meta.key!r}")
    if meta.conversations:
        problems = conversation_problems(meta.conversations, images=max(meta.n_images, 0))
        if problems:
            report.add(shard, key, "bad_conversation", f"{key}.json: {'; '.join(problems)}")
    return meta


def _check_image(shard: str, key: str, what: str, data: bytes, size: tuple[int, int] | None, report: Report) -> None:
    """One image member decodes, at the ``size`` its JSON records (when it records one)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            decoded = image.size
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError...)
        report.add(shard, key, "bad_image", f"{what} does not decode: {type(e).__name__}: {e}"[:500])
        return
    report.images += 1
    if size is not None and size != decoded:
        report.add(
            shard,
            key,
            "image_size_mismatch",
            f"{what} is {decoded[0]}x{decoded[1]}, its JSON says {size[0]}x{size[1]}",
        )


def _check_index(files: ShardFiles, samples: TarSamples | None, report: Report) -> list[IndexRow] | None:
    """The index rows, after comparing written keys and member offsets with the tar (when it was readable)."""
    try:
        table = read_index(files.index)
        rows = None if table is None else from_table(IndexRow, table)
    except (ShardError, ValueError, TypeError) as e:
        report.add(files.name, None, "bad_index", str(e))
        return None
    if rows is None:
        report.add(files.name, None, "index_missing", f"{files.index} does not exist")
        return None
    for key, n in Counter(r.key for r in rows).items():
        if n > 1:
            report.add(files.name, key, "duplicate_key", f"key {key} has {n} rows in the index")
    if samples is None:  # nothing trustworthy to compare with: the tar problem is already reported
        return rows
    offsets_known = "members" not in filled_columns(table)  # img2dataset's index records no member offsets
    written = {r.key: r for r in rows if r.status == "success"}
    for key in sorted(written.keys() - samples.keys()):
        report.add(files.name, key, "key_not_in_tar", f"the index lists {key} as written; the tar has no such sample")
    for key in sorted(samples.keys() - written.keys()):
        status = next((r.status for r in rows if r.key == key), None)
        why = f"has it as {status}" if status else "has no row for it"
        report.add(files.name, key, "key_not_in_index", f"the tar holds {key}; the index {why}")
    for key in sorted(written.keys() & samples.keys()) if offsets_known else []:
        indexed = sorted((m.name, m.offset, m.size) for m in written[key].members)
        actual = sorted((m.name, m.offset, m.size) for m in samples[key])
        if indexed != actual:
            wrong = next(
                (a, b) for a, b in zip(indexed + [None] * len(actual), actual + [None] * len(indexed)) if a != b
            )
            report.add(
                files.name,
                key,
                "index_offset_mismatch",
                f"index has {_member(wrong[0])}, the tar has {_member(wrong[1])}",
            )
    return rows


def _member(member: tuple[str, int, int] | None) -> str:
    return "nothing" if member is None else f"{member[0]} at byte {member[1]} ({member[2]} bytes)"


def _check_stats(files: ShardFiles, samples: TarSamples | None, rows: list[IndexRow] | None, report: Report) -> None:
    if not exists(files.stats):
        report.add(files.name, None, "incomplete", f"no {files.stats}: the shard was never finished")
        return
    try:
        stats = read_stats(files.stats)
    except (ValueError, TypeError, KeyError) as e:  # ShardStats refuses counts that do not add up
        report.add(files.name, None, "bad_stats", f"{files.stats}: {e}")
        return
    checks = []
    if samples is not None:
        checks += [("written", stats.written, len(samples), "samples in the tar")]
        if stats.stage != IMG2DATASET_STAGE:  # img2dataset's stats record no tar size
            checks.append(("tar_bytes", stats.tar_bytes, file_size(files.tar), "bytes in the tar"))
    if rows is not None:
        reasons = dict(Counter(r.status for r in rows if r.status != "success"))
        checks += [
            ("inputs", stats.inputs, len(rows), "rows in the index"),
            ("rejected_by_reason", dict(stats.rejected_by_reason), reasons, "rejected rows in the index"),
        ]
    for name, claimed, actual, what in checks:
        if claimed != actual:
            report.add(
                files.name,
                None,
                "stats_mismatch",
                f"{posixpath.basename(files.stats)} says {name} {claimed}; {what}: {actual}",
            )


def format_report(report: Report, limit: int | None = 200) -> str:
    """The problems one per line (the first ``limit`` of them), then a summary line with counts by code."""
    lines = []
    for p in report.problems[:limit]:
        lines.append(f"{p.shard}  {p.key or '-':<12} {p.code:<22} {p.message}")
    if limit is not None and len(report.problems) > limit:
        lines.append(f"... and {len(report.problems) - limit} more (use --json for all)")
    checked = f"{report.shards} shards, {report.samples} samples, {report.images} images checked"
    if report.ok:
        return "\n".join(lines + [f"ok: {checked}, no problems"])
    by_code = ", ".join(f"{code} {n}" for code, n in Counter(p.code for p in report.problems).most_common())
    return "\n".join(lines + [f"FAILED: {checked}, {len(report.problems)} problems ({by_code})"])

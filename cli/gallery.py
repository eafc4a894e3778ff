"""``gallery``: a static HTML page of sample thumbnails, and a PNG contact sheet, to look at a dataset.

The page shows each picked sample's thumbnail, key, size, CLIP score, what curation found (NSFW score, faces, and
whether they are blurred: the thumbnail shows them as written), caption, URL and conversation, then a section of
rejected rows, every reason in turn: key, stage, reason, URL and message, from the parquet index (every input row
has its status there) and the dead-letter tables ``rejected/*-NNNNN.parquet`` (which name the stage). A rejected
row has no image in the tar, so none is shown (nor should an image dropped as ``nsfw`` be). A multi-image sample's
card shows its first image with a ``+N`` badge for the others; a text-only sample's card says so in place of an
image.

The page is one self-contained file: thumbnails are embedded as ``data:`` URIs, and a Content-Security-Policy
allows nothing else to load (captions and URLs come from the web; they are escaped too). One small inline
script, allowed by its hash, records on ``<body>`` how many images there are (``data-images``) and how many
loaded (``data-loaded``), so a headless browser can check the page.

Samples are picked by the parquet index, spread evenly over the dataset (or at random with a seed), and read at
their byte offsets: a gallery of a large dataset reads a few hundred kilobytes of its tars.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import random
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from visinstruct.cli.shards import Progress, read_index
from visinstruct.cli.show import _read_sample, _written_keys
from visinstruct.schemas import IndexRow, Rejection, SampleMeta, from_table
from visinstruct.transforms.layout import ShardError, ShardFiles, image_members, match_paths, shard_files
from visinstruct.transforms.shards import atomic_write, read_table

SHEET_COLUMNS = 8
LABEL_HEIGHT = 14
STATUS_SCRIPT = (
    "addEventListener('load', () => { const images = Array.from(document.images); "
    "document.body.dataset.images = images.length; document.body.dataset.loaded = "
    "images.filter(i => i.complete && i.naturalWidth > 0).length; });"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(STATUS_SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
figure{margin:0;padding:8px;border:1px solid #ddd;border-radius:6px;background:#fafafa}
figure img{display:block;margin:0 auto 6px;max-width:100%;height:auto;image-rendering:auto}
.key{font-family:monospace;font-weight:bold}.meta,.url{color:#666;font-size:12px;word-break:break-all}
.turn{white-space:pre-wrap;margin:2px 0}.turn b{color:#064}.broken{color:#a00}
.pic{position:relative}.badge{position:absolute;top:4px;right:4px;padding:1px 6px;border-radius:9px;
background:#064;color:#fff;font-size:12px;font-weight:bold}.textonly{color:#555;font-style:italic;text-align:center;
padding:2em 0;margin:0 0 6px;border:1px dashed #bbb}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}td.url{max-width:420px}"""


@dataclass(frozen=True)
class Card:
    """One picked sample: its thumbnail (``None`` when the image does not decode) and what the card shows."""

    key: str
    shard: str
    meta: SampleMeta | None
    caption: str | None
    thumbnail: object  # PIL.Image.Image, or None
    unread: str | None = None  # why the sample could not be read from its tar (cut short...), or None
    images: int = 1  # image members the sample has: 0 for a text-only sample, the thumbnail is the first's

    @property
    def text_only(self) -> bool:
        return self.images == 0 and self.unread is None


def gallery(
    paths: list[str],
    html_path: str,
    sheet_path: str | None = None,
    limit: int = 48,
    seed: int | None = None,
    thumb: int = 160,
    progress: Progress | None = None,
) -> dict:
    """Write the gallery page (and the contact sheet, when ``sheet_path`` is given).

    Args:
        paths: tar paths from :func:`~visinstruct.transforms.layout.resolve_shards`.
        html_path: where the page goes.
        sheet_path: where the PNG contact sheet goes, or ``None`` for none.
        limit: at most this many samples, and this many rejected rows, are shown.
        seed: pick samples at random with this seed; by default they are spread evenly over the dataset.
        thumb: the longest side of a thumbnail, in pixels.
        progress: called with ``(shards done, shards)`` while the indexes are read.

    Returns:
        html, sheet, shards, written, shown, rejected (total), rejected_shown, rejected_by_reason, broken_images,
        text_only (cards of text-only samples), unread and unread_reason.
    """
    written, rejected = [], []
    for done, tar in enumerate(paths, 1):
        files = shard_files(tar)
        table = read_index(files.index)
        rows = from_table(IndexRow, table) if table is not None else None
        keys = [r for r in rows if r.status == "success"] if rows is not None else _written_keys(files)
        written += [(files, row) for row in keys]
        rejected += [(files, r) for r in rows or [] if r.status != "success"]
        if progress:
            progress(done, len(paths))
    picked = _pick(len(written), limit, seed)
    cards = [_card(*written[i], thumb) for i in picked]
    shown = _rejected_examples(rejected, limit)
    stages = _dead_letters({files for files, _ in shown})
    page = render_page(
        paths,
        cards,
        [(files, row, stages.get((files.name, row.key))) for files, row in shown],
        len(written),
        Counter(row.status for _, row in rejected),
    )
    with atomic_write(html_path) as f:
        f.write(page.encode("utf-8"))
    thumbnails = [card.thumbnail for card in cards if card.thumbnail is not None]
    if sheet_path and thumbnails:
        with atomic_write(sheet_path) as f:
            contact_sheet(thumbnails, [c.key for c in cards if c.thumbnail is not None], thumb).save(f, "PNG")
    unread = [card.unread for card in cards if card.unread]
    return {
        "html": html_path,
        "sheet": sheet_path if sheet_path and thumbnails else None,
        "shards": len(paths),
        "written": len(written),
        "shown": len(cards),
        "rejected": len(rejected),
        "rejected_shown": len(shown),
        "rejected_by_reason": dict(Counter(row.status for _, row in rejected).most_common()),
        "broken_images": len(cards) - len(thumbnails) - len(unread) - sum(card.text_only for card in cards),
        "text_only": sum(card.text_only for card in cards),
        "unread": len(unread),
        "unread_reason": unread[0] if unread else None,
    }


def _pick(total: int, limit: int, seed: int | None) -> list[int]:
    """Positions of the samples to show, in dataset order: all, evenly spread, or a seeded random choice."""
    if total <= limit:
        return list(range(total))
    if seed is not None:
        return sorted(random.Random(seed).sample(range(total), limit))
    return [i * total // limit for i in range(limit)]


def _card(files: ShardFiles, row: IndexRow | str, thumb: int) -> Card:
    key = row.key if isinstance(row, IndexRow) else row
    try:
        sample = _read_sample(files, key, row)
    except (ShardError, OSError) as e:  # indexed but not readable (a tar cut short, or gone): said, not hidden
        return Card(
            key,
            files.name,
            None,
            row.caption if isinstance(row, IndexRow) else None,
            None,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
    try:
        meta = SampleMeta.from_json(sample["json"]) if "json" in sample else None
    except ValueError:  # validate reports it; the card still shows the image
        meta = None
    caption = meta.caption if meta and meta.caption else sample.get("txt", b"").decode("utf-8", "replace") or None
    names = image_members(sample)
    return Card(
        key, files.name, meta, caption, thumbnail(sample[names[0]], thumb) if names else None, None, len(names)
    )


def thumbnail(data: bytes, size: int):
    """An RGB thumbnail whose longest side is at most ``size``, or ``None`` when the image does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: much faster for big images
            small = image.convert("RGB")
    except Exception:  # Pillow raises many types for bad data; the card says it does not decode
        return None
    small.thumbnail((size, size))
    return small


def _rejected_examples(rejected: list[tuple[ShardFiles, IndexRow]], limit: int) -> list[tuple[ShardFiles, IndexRow]]:
    """Up to ``limit`` rejected rows, taking each reason in turn so that rare reasons are shown too."""
    by_reason: dict[str, list] = {}
    for item in rejected:
        by_reason.setdefault(item[1].status, []).append(item)
    queues = [items[::-1] for _, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
    shown = []
    while len(shown) < limit and any(queues):
        for queue in queues:
            if queue and len(shown) < limit:
                shown.append(queue.pop())
    return shown


def _dead_letters(shards: set[ShardFiles]) -> dict[tuple[str, str], Rejection]:
    """``{(shard, key): Rejection}`` from the dead-letter tables of ``shards`` (``rejected/STAGE-NNNNN.parquet``)."""
    out = {}
    for files in sorted(shards, key=lambda f: f.tar):
        for found in match_paths(files.rejected_pattern()):
            try:
                rejections = from_table(Rejection, read_table(found.path, Rejection))
            except (pa.ArrowException, ValueError, OSError) as e:
                raise ShardError(f"unreadable dead-letter table {found.path}: {e}".splitlines()[0]) from e
            out.update(((files.name, r.key), r) for r in rejections)
    return out


def data_uri(image) -> str:
    """A PIL image as a JPEG ``data:`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _link(url: str | None) -> str:
    """A URL as an escaped link when it is http(s), else as text (``javascript:`` never becomes a link)."""
    if not url:
        return "-"
    text = html.escape(url)
    return f'<a href="{text}" rel="noreferrer">{text}</a>' if url.startswith(("http://", "https://")) else text


def _curation_facts(curation) -> list[str]:
    """What curation found, for a card: the NSFW score and the faces (blurred in the thumbnail when written so)."""
    if curation is None:
        return []
    facts = [] if curation.nsfw is None else [f"NSFW {curation.nsfw:.3f}"]
    if curation.faces:
        count = len(curation.faces)
        facts.append(f"{count} face{'s' if count > 1 else ''}" + (" blurred" if curation.faces_blurred else ""))
    return facts


def _card_html(card: Card) -> str:
    esc = html.escape
    meta = card.meta
    badge = f'<span class="badge" title="{card.images} images">+{card.images - 1}</span>' if card.images > 1 else ""
    image = (
        f'<div class="pic"><img src="{data_uri(card.thumbnail)}" width="{card.thumbnail.width}" '
        f'height="{card.thumbnail.height}" alt="{esc(card.key)}">{badge}</div>'
        if card.thumbnail is not None
        else f'<p class="broken">not read from the tar: {esc(card.unread)}</p>'
        if card.unread
        else '<p class="textonly">text-only</p>'
        if card.text_only
        else f'<p class="broken">image does not decode{f" (first of {card.images})" if card.images > 1 else ""}</p>'
    )
    facts = [f"shard {esc(card.shard)}"]
    if meta and meta.width:
        facts.append(f"{meta.width}×{meta.height}")
    if meta and meta.clip:
        facts.append(f"CLIP {meta.clip.score:.3f}")
    facts += _curation_facts(meta.curation if meta else None)
    turns = "".join(
        f'<p class="turn"><b>{esc(t.role)}</b> {esc(t.value)}</p>' for t in (meta.conversations if meta else [])
    )
    return (
        f'<figure>{image}<figcaption><span class="key">{esc(card.key)}</span> '
        f'<span class="meta">{" · ".join(facts)}</span><p>{esc(card.caption or "(no caption)")}</p>'
        f'<p class="url">{_link(meta.url or meta.path if meta else None)}</p>{turns}</figcaption></figure>'
    )


def render_page(
    paths: list[str],
    cards: list[Card],
    rejected: list[tuple[ShardFiles, IndexRow, Rejection | None]],
    written: int,
    reasons: Counter,
) -> str:
    """The gallery page as HTML text."""
    esc = html.escape
    total_rejected = sum(reasons.values())
    unread = sum(card.unread is not None for card in cards)
    summary = (
        f"{written} written and {total_rejected} rejected in {len(paths)} shards; showing {len(cards)} "
        f"samples and {len(rejected)} rejected rows."
        + (f" {unread} of the samples shown could not be read from their tars: run validate." if unread else "")
    )
    rows_in = written + total_rejected
    reason_text = ", ".join(f"{esc(reason)} {n} ({n / rows_in:.1%})" for reason, n in reasons.most_common()) or "none"
    rows = "".join(
        f'<tr><td>{esc(files.name)}</td><td class="key">{esc(row.key)}</td><td>{esc(r.stage if r else "-")}'
        f'</td><td>{esc(row.status)}</td><td class="url">{_link(row.url or row.path)}</td>'
        f"<td>{esc(row.error_message or (r.message if r else ''))}</td></tr>"
        for files, row, r in rejected
    )
    table = (
        f"<table><tr><th>shard</th><th>key</th><th>stage</th><th>reason</th><th>url</th><th>message</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>No rejected rows.</p>"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>visinstruct gallery</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>visinstruct gallery</h1><p>{esc(summary)}</p><p>Rejected by reason: {reason_text}</p>"
        f'<h2>Samples</h2><div class="grid">{"".join(_card_html(c) for c in cards)}</div>'
        f"<h2>Rejected</h2>{table}<script>{STATUS_SCRIPT}</script></body></html>\n"
    )


def contact_sheet(thumbnails: list, keys: list[str], size: int):
    """A grid of thumbnails, each centred in a ``size`` square with its key below."""
    from PIL import Image, ImageDraw

    columns = min(SHEET_COLUMNS, len(thumbnails))
    rows = -(-len(thumbnails) // columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, key) in enumerate(zip(thumbnails, keys)):
        left, top = (i % columns) * size, (i // columns) * (size + LABEL_HEIGHT)
        sheet.paste(image, (left + (size - image.width) // 2, top + (size - image.height) // 2))
        draw.text((left + 3, top + size + 1), key, fill="black")
    return sheet

"""What ``visinstruct eval`` prints and writes: the table, ``eval.json``, ``answers.jsonl`` and ``errors.html``.

The table has one row per condition (the image, then each ablation) and one column per question type and ``all``:
the headline metric's mean and its bootstrap interval. Below it, the difference the image makes against each
ablation (paired over the same questions, with its interval) and the majority-answer floor. ``errors.html`` is
the gallery's kind of page (self-contained, the same Content-Security-Policy): the questions answered wrongly with
the image, each with its thumbnail, the references and every condition's answer.
"""

from __future__ import annotations

import html
import json
from typing import Any

from visinstruct.cli.gallery import CSP, STATUS_SCRIPT, STYLE, data_uri, thumbnail
from visinstruct.transforms.shards import atomic_write

ALL = "all"
CELL = 22


def _cell(stat: dict[str, float], signed: bool = False) -> str:
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    low, high = (f"{stat[k]:+.2f}" if signed else f"{stat[k]:.2f}" for k in ("low", "high"))
    return f"{mean} [{low}, {high}]"


def format_report(report: dict[str, Any], out: str | None = None) -> str:
    """The report as text: a VLM's table (see the module docstring) or a CLIP's retrieval and zero-shot lines."""
    if report["kind"] == "clip":
        return format_clip(report, out)
    groups = [*report["types"], ALL]
    skipped = ", ".join(f"{r} {n}" for r, n in report["skipped"].items()) or "none"
    types = ", ".join(f"{t} {n} ({report['headline'][t]})" for t, n in report["types"].items())
    lines = [
        f"eval {report['checkpoint']} on {report['data']}: {report['questions']} questions about "
        f"{report['images']} images ({report['samples']} samples read; skipped: {skipped}"
        + (f"; {report['not_asked']} more questions not asked (max_questions)" if report["not_asked"] else "")
        + ")",
        f"types (metric): {types}; cells: mean [{report['interval']['confidence']:.0%} bootstrap interval]",
        f"{'condition':<16}" + "".join(f"{g:>{CELL}}" for g in groups),
    ]
    for condition, per in report["conditions"].items():
        lines.append(f"{condition:<16}" + "".join(f"{_cell(per[g]['score']):>{CELL}}" for g in groups))
    for condition, per in report["image_minus"].items():
        lines.append(f"{'image - ' + condition:<16}" + "".join(f"{_cell(per[g], True):>{CELL}}" for g in groups))
    majority = report["majority"]
    lines.append(f"{'majority answer':<16}" + "".join(f"{majority[g]:>{CELL}.3f}" for g in groups))
    both = "; ".join(
        f"{c} {per[ALL]['exact']['mean']:.3f} / {per[ALL]['f1']['mean']:.3f}"
        for c, per in report["conditions"].items()
    )
    lines.append(f"all questions, exact match / token F1: {both}")
    lines.append(
        "(majority answer: each type's most common answer among these questions; intervals resample images, each "
        "with all its questions)"
    )
    if report["unaskable"]:
        lines.append("not asked: " + ", ".join(f"{r} {n}" for r, n in report["unaskable"].items()))
    seconds = report["seconds"]
    lines.append(f"asked in {seconds['total'] - seconds['load']:.1f} s (model loaded in {seconds['load']:.1f} s)")
    if out:
        lines.append(f"written: {out}/eval.json, {out}/answers.jsonl, {out}/errors.html")
    return "\n".join(lines)


def format_clip(report: dict[str, Any], out: str | None = None) -> str:
    r = report["retrieval"]
    recalls = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in r.items() if "_r" in k and "to" in k)
    lines = [
        f"eval {report['checkpoint']} (CLIP) on {report['data']}: {r['samples']} image-caption pairs",
        f"retrieval: {recalls}",
        f"matching AUC {r['matching_auc']:.4f}; threshold {r['threshold']} separates matching from shuffled pairs "
        f"at {r['threshold_balanced_accuracy']:.3f} balanced accuracy",
    ]
    for name, z in report["zero_shot"].items():
        if not z["samples"]:
            lines.append(f"zero-shot {name}: no caption names exactly one class ({z['unlabelled']} samples)")
            continue
        per = ", ".join(f"{c} {a:.2f}" for c, a in z["per_class"].items())
        lines.append(
            f"zero-shot {name}: {z['accuracy']:.3f} on {z['samples']} samples (chance {z['chance']:.3f}; {per}; "
            f"{z['unlabelled']} unlabelled)"
        )
    if out:
        lines.append(f"written: {out}/eval.json")
    return "\n".join(lines)


def write_outputs(cfg, report: dict[str, Any], records: list[dict[str, Any]], found) -> None:
    """``eval.json``, and for a VLM ``answers.jsonl`` and ``errors.html``, each written whole or not at all."""
    out = cfg.out.rstrip("/")
    with atomic_write(f"{out}/eval.json") as f:
        f.write((json.dumps(report, indent=1) + "\n").encode())
    if found is None:
        return
    with atomic_write(f"{out}/answers.jsonl") as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    with atomic_write(f"{out}/errors.html") as f:
        f.write(errors_page(report, records, found, cfg.errors).encode())


def errors_page(report: dict[str, Any], records: list[dict[str, Any]], found, limit: int) -> str:
    """The questions answered wrongly with the image (headline score below 1), up to ``limit``, each type in turn."""
    metric = report["headline"]
    wrong = [r for r in records if r["scores"]["image"][metric[r["type"]]] < 1]
    by_type: dict[str, list] = {}
    for record in wrong:
        by_type.setdefault(record["type"], []).append(record)
    queues, shown = [list(reversed(v)) for _, v in sorted(by_type.items())], []
    while len(shown) < limit and any(queues):
        for queue in queues:
            if queue and len(shown) < limit:
                shown.append(queue.pop())
    esc = html.escape
    cards = []
    for record in shown:
        small = thumbnail(found.images[record["image"]], 160)
        picture = f'<img src="{data_uri(small)}" alt="">' if small is not None else "<p>(no image)</p>"
        said = "".join(f'<p class="turn"><b>{esc(c)}:</b> {esc(a)}</p>' for c, a in record["answers"].items())
        cards.append(
            f'<figure>{picture}<p class="key">{esc(record["id"])} ({esc(record["type"])})</p>'
            f'<p class="turn"><b>question:</b> {esc(record["question"])}</p>'
            f'<p class="turn"><b>reference:</b> {esc(" | ".join(record["references"]))}</p>{said}</figure>'
        )
    summary = (
        f"{len(wrong)} of {len(records)} questions answered wrongly with the image; showing {len(shown)}, each type "
        f"in turn. Checkpoint {report['checkpoint']}, data {report['data']}."
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>visinstruct eval errors</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>visinstruct eval: errors</h1><p>{esc(summary)}</p>"
        f'<div class="grid">{"".join(cards)}</div><script>{STATUS_SCRIPT}</script></body></html>\n'
    )

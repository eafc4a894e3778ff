"""What the pipeline commands print at the end of a run: the run report (``pipelines/report.py``) as a short table.

Display only: the reports are data the pipelines return and write beside the shards; whether a run failed is
:func:`visinstruct.pipelines.report.failure_summary`'s call.
"""

from __future__ import annotations

from visinstruct.transforms.layout import report_path


def format_report(report: dict) -> str:
    """A short table a person reads at the end of an ingest, filter or generate run."""
    lines = [
        f"{report['stage']}: {report['inputs']} rows in {report['shards']} shards -> "
        f"{report['written']} written, {report['rejected']} rejected"
    ]
    if "rows_read" in report:
        state = "ok" if report["accounted"] else "MISMATCH"
        lines.append(f"  accounting: {report['rows_read']} rows read = written + rejected: {state}")
    width = max([len(r) for r in report["rejected_by_reason"]] + [6])
    for reason, count in report["rejected_by_reason"].items():
        lines.append(f"  {reason:<{width}}  {count:>8}")
    lines.append(f"  output: {report['output']} ({report['tar_bytes'] / 1e6:.1f} MB of tars)")
    return "\n".join(lines)


def format_llm_usage(report: dict) -> str:
    """The LLM calls of a generation run and the tokens they spent."""
    return (
        f"  LLM calls: {report['backend_calls']}, tokens spent: {report['prompt_tokens_spent']} prompt + "
        f"{report['completion_tokens_spent']} completion ({report['completion_tokens']} completion tokens in "
        "written samples)"
    )


def curation_lines(report: dict) -> list[str]:
    """What curation found, for the terminal: repairs, NSFW score quantiles, faces, near-copy comparisons."""
    lines = []
    if report.get("fixed_mojibake"):
        lines.append(f"  captions repaired (mojibake): {report['fixed_mojibake']}")
    if nsfw := report.get("nsfw"):
        lines.append(
            f"  NSFW scores of {nsfw['count']} images: p50 {nsfw['p50']}, p90 {nsfw['p90']}, p99 {nsfw['p99']}, "
            f"max {nsfw['max']}"
        )
    faces = report.get("faces") or {}
    if faces.get("images_checked"):
        lines.append(
            f"  faces: {faces['faces']} in {faces['images_with_faces']} of {faces['images_checked']} images"
            + (f", blurred in {report['faces_blurred']}" if report.get("faces_blurred") else "")
        )
    if report.get("semdedup_comparisons"):
        lines.append(
            f"  semantic dedup: {report['semdedup_clusters']} clusters, {report['semdedup_comparisons']} comparisons"
        )
    return lines


def format_build_report(report: dict) -> str:
    """The short table printed at the end of a build: rows into and out of each stage, and why they dropped."""
    carried = report.get("carried_rejections")
    lines = [
        f"build: {report['inputs']} rows -> {report['written']} samples in {report['shards']} shards "
        f"({report['seconds']} s, {report['rows_per_second']} rows/s)"
        + (f"; {carried} rows were rejected before this build" if carried else ""),
        f"  {'stage':<10} {'in':>7} {'out':>7} {'busy s':>8} {'rows/s':>8}  dropped",
    ]
    for s in report["stages"]:
        reasons = ", ".join(f"{r} {n}" for r, n in s["dropped_by_reason"].items()) or "-"
        rate = "-" if s.get("rows_per_busy_second") is None else s["rows_per_busy_second"]
        lines.append(
            f"  {s['stage']:<10} {s['in']:>7} {s['out']:>7} {s.get('busy_seconds', '-'):>8} {rate:>8}  {reasons}"
        )
    if report.get("clip"):
        c = report["clip"]
        lines.append(f"  CLIP scores: min {c['min']}, median {c['p50']}, max {c['max']} over {c['pairs']} pairs")
    lines += curation_lines(report)
    if report.get("backend_calls"):
        lines.append(
            f"  LLM: {report['backend_calls']} calls spent {report['prompt_tokens_spent']} prompt + "
            f"{report['completion_tokens_spent']} completion tokens; the written samples hold "
            f"{report['completion_tokens']} of those completion tokens"
        )
    lines.append("  (busy s: seconds of work per stage summed over workers and threads; stages overlap in one graph)")
    if report.get("cost"):
        from visinstruct.pipelines.cost import format_estimate

        lines += ["  " + line for line in format_estimate(report["cost"]).splitlines()]
    state = "ok" if report["accounted"] and report["stages_add_up"] else "MISMATCH"
    lines.append(f"  accounting: {state}; report {report_path(report['output'])}")
    return "\n".join(lines)

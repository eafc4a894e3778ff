"""Run reports: counts into and out of a stage, per reason, read back from the shards' stats files.

The per-shard ``_stats.json`` files are the ground truth (each one checks ``inputs == written + rejected``);
the report adds them up and checks them against the rows the pipeline read.
"""

from __future__ import annotations

import json
from collections import Counter

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from visinstruct.schemas import to_row
from visinstruct.transforms.shards import join, read_stats, write_bytes

REPORT_NAME = "run_report.json"


def counter_value(result, namespace: str, name: str) -> int | None:
    """A Beam counter's committed (or, where the runner has none, attempted) value, or ``None``."""
    if result is None:
        return None
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    if not found:
        return None
    return sum((c.committed if c.committed is not None else c.attempted) for c in found)


def summarize(out_dir: str, stage: str, result=None) -> dict:
    """Totals over every ``*_stats.json`` in ``out_dir`` for ``stage``, with a per-shard list."""
    pattern = join(out_dir, "*_stats.json")
    paths = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    shards = [read_stats(p) for p in paths]
    shards = [s for s in shards if s.stage == stage]
    reasons: Counter = Counter()
    for s in shards:
        reasons.update(s.rejected_by_reason)
    report = {
        "stage": stage,
        "output": out_dir,
        "shards": len(shards),
        "inputs": sum(s.inputs for s in shards),
        "written": sum(s.written for s in shards),
        "rejected": sum(s.rejected for s in shards),
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "tar_bytes": sum(s.tar_bytes for s in shards),
        "shard_stats": [to_row(s) | {"rejected_by_reason": s.rejected_by_reason} for s in shards],
    }
    rows_read = counter_value(result, stage, "rows_read")
    if rows_read is not None:
        report["rows_read"] = rows_read
        report["accounted"] = rows_read == report["inputs"]
    return report


def input_rows(tars: list[str]) -> int | None:
    """Input rows of shards a stage reads, from their ``_stats.json``; ``None`` when any is missing or foreign.

    A stage that rewrites shards must end with as many input rows as it started from (earlier stages' drops are
    carried in the index), which is the accounting check of filter and generate.
    """
    total = 0
    for tar in tars:
        stats = tar[: -len(".tar")] + "_stats.json"
        try:
            total += read_stats(stats).inputs
        except (OSError, ValueError, TypeError, KeyError):  # absent, or img2dataset's own stats format
            return None
    return total


def check_inputs(report: dict, rows_before: int | None) -> dict:
    """Account a rewriting stage: its output keeps every input row (or, for foreign shards, every sample read)."""
    if rows_before is not None:
        report["inputs_before"] = rows_before
        report["accounted"] = rows_before == report["inputs"]
    return report


def write_report(out_dir: str, report: dict) -> str:
    path = join(out_dir, REPORT_NAME)
    write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())
    return path


def format_report(report: dict) -> str:
    """A short table a person reads at the end of a run."""
    lines = [f"{report['stage']}: {report['inputs']} rows in {report['shards']} shards -> "
             f"{report['written']} written, {report['rejected']} rejected"]
    if "rows_read" in report:
        state = "ok" if report["accounted"] else "MISMATCH"
        lines.append(f"  accounting: {report['rows_read']} rows read = written + rejected: {state}")
    width = max([len(r) for r in report["rejected_by_reason"]] + [6])
    for reason, count in report["rejected_by_reason"].items():
        lines.append(f"  {reason:<{width}}  {count:>8}")
    lines.append(f"  output: {report['output']} ({report['tar_bytes'] / 1e6:.1f} MB of tars)")
    return "\n".join(lines)

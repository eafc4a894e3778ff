"""Run reports: counts into and out of a stage, per reason, read back from the shards' stats files.

The per-shard stats files are the ground truth (each one checks ``inputs == written + rejected``);
the report adds them up and checks them against the rows the pipeline read.
"""

from __future__ import annotations

import collections
import json
from collections import Counter

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from visinstruct.schemas import to_row
from visinstruct.transforms.layout import (
    REJECTED_DIR,
    REPORT_NAME,
    read_stats,
    report_path,
    shard_files,
    stats_pattern,
)
from visinstruct.transforms.shards import write_bytes


def counter_value(result, namespace: str, name: str) -> int | None:
    """A Beam counter's committed (or, where the runner has none, attempted) value, or ``None``."""
    if result is None:
        return None
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    if not found:
        return None
    return sum((c.committed if c.committed is not None else c.attempted) for c in found)


def summarize(out_dir: str, stage: str, result=None) -> dict:
    """Totals over every shard's stats file in ``out_dir`` for ``stage``, with a per-shard list."""
    paths = sorted(m.path for m in FileSystems.match([stats_pattern(out_dir)])[0].metadata_list)
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


def dead_letter_reasons(out_dir: str) -> dict[str, Counter]:
    """Dead letters by the stage that wrote them (its table's ``stage`` column) and reason, over ``out_dir``."""
    import pyarrow.parquet as pq

    from visinstruct.transforms.layout import rejected_pattern

    found: dict[str, Counter] = {}
    for meta in FileSystems.match([rejected_pattern(out_dir)])[0].metadata_list:
        table = pq.read_table(FileSystems.open(meta.path), columns=["stage", "reason"])
        for row in table.to_pylist():
            found.setdefault(row["stage"], Counter())[row["reason"]] += 1
    return collections.defaultdict(Counter, found)


def column_values(out_dir: str, column: str) -> list:
    """One index column over every shard of ``out_dir`` (rows in shard order)."""
    from visinstruct.schemas import IndexRow
    from visinstruct.transforms.layout import index_pattern, shard_stem
    from visinstruct.transforms.shards import read_table

    values = []
    for meta in sorted(FileSystems.match([index_pattern(out_dir)])[0].metadata_list, key=lambda m: m.path):
        if shard_stem(meta.path) is not None:
            values += read_table(meta.path, IndexRow, [column]).column(0).to_pylist()
    return values


QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "p99": 0.99, "max": 1.0}


def quantiles(values: list[float]) -> dict | None:
    """How many values, and their quantiles (rounded to 4 digits); ``None`` for none."""
    if not values:
        return None
    import numpy as np

    q = np.quantile(np.asarray(values, dtype=np.float64), list(QUANTILES.values()))
    return {"count": len(values), **{name: round(float(v), 4) for name, v in zip(QUANTILES, q)}}


def input_rows(tars: list[str]) -> int | None:
    """Input rows of shards a stage reads, from their stats files; ``None`` when any is missing or foreign.

    A stage that rewrites shards must end with as many input rows as it started from (earlier stages' drops are
    carried in the index), which is the accounting check of filter and generate.
    """
    total = 0
    for tar in tars:
        try:
            total += read_stats(shard_files(tar).stats).inputs
        except (OSError, ValueError, TypeError, KeyError):  # absent, or img2dataset's own stats format
            return None
    return total


def check_inputs(report: dict, rows_before: int | None, shards_before: int | None = None) -> dict:
    """Account a rewriting stage: its output keeps every input row (or, for foreign shards, every sample read),
    and every input shard (one it could not read at all is a dead letter, ``unreadable_shard``, and no output)."""
    if rows_before is not None:
        report["inputs_before"] = rows_before
        report["accounted"] = rows_before == report["inputs"]
    if shards_before is not None and report["shards"] < shards_before:
        report["shards_unwritten"] = shards_before - report["shards"]
        report["accounted"] = False
    return report


def write_report(out_dir: str, report: dict) -> str:
    path = report_path(out_dir)
    write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())
    return path


# What a person changes when a reason drops every row. ``{ingest}``/``{filter}``/``{generate}`` become the key prefix
# of that stage's section: empty in a standalone stage's config, ``ingest.``/``filter.``/``generate.`` in a build's.
REASON_HINTS = {
    "blocked_address": "the URLs resolve to loopback or private addresses, refused by default: set "
    "{ingest}download.allow_loopback: true (tests, demos) or {ingest}download.allow_private: true if intended",
    "missing_url": "no URL in those rows: check that {ingest}read.url_col names the input's URL column",
    "missing_column": "the input has no such column: check {ingest}read.url_col and {ingest}read.caption_col",
    "bad_url": "that column holds no URL text: check that {ingest}read.url_col names the input's URL column",
    "field_too_long": "rows or URLs too long to be real: check {ingest}read.format and {ingest}read.url_col",
    "unreadable_file": "the input file cannot be read: check {ingest}read.path and {ingest}read.format",
    "robots_unreachable": "the hosts' robots.txt did not answer, which RFC 9309 reads as disallow: check the "
    "hosts ({ingest}download.check_robots_txt: false only where you may crawl anyway)",
    "bad_aspect_ratio": "images more elongated than {ingest}resize.max_aspect_ratio: raise it (or null)",
    "decompression_bomb": "images with more pixels than {ingest}resize.max_pixels",
    "invalid_url": "not http(s) URLs: check that {ingest}read.url_col names the input's URL column",
    "file_error": "local image files could not be read: check the paths and {ingest}read.image_root",
    "malformed_row": "rows the reader cannot parse: check {ingest}read.format and the file",
    "dns_error": "host names do not resolve: check the URLs and this machine's DNS",
    "connection_error": "hosts refused the connection: check the URLs and the network",
    "ssl_error": "TLS with the hosts failed (a certificate that does not verify, https to a plain-http port): "
    "check the URLs; a rerun with {ingest}write.retry_failed: true tries them again",
    "timeout": "hosts did not answer in time: raise {ingest}download.timeout or lower {ingest}download.threads",
    "http_403": "the hosts refuse access: check the URLs and {ingest}download.user_agent",
    "http_404": "the URLs no longer exist",
    "http_429": "rate-limited: lower {ingest}download.per_host_rps",
    "robots_txt": "robots.txt disallows these paths",
    "optout": "the images opt out of AI use (X-Robots-Tag), honoured by {ingest}download.respect_optout",
    "not_an_image": "the URLs do not serve images: check that {ingest}read.url_col names the image URL column",
    "too_small": "images smaller than {ingest}resize.min_image_size: lower it",
    "too_large": "bodies over {ingest}download.max_bytes: raise it",
    "nsfw": "images scored at least {curate}safety.nsfw_threshold by the NSFW model: raise it if that is too strict",
    "wrong_language": "captions in languages outside {curate}text.languages: add them, or null for any",
    "near_duplicate": "images near-identical to others (pHash at ingest, embeddings in curate): check "
    "{ingest}dedup.phash_max_distance and {curate}semdedup.threshold",
    "benchmark_overlap": "rows that copy a benchmark of {curate}decontaminate.benchmarks: check those files",
    "clip_below_threshold": "every pair scored under {filter}threshold: lower it (see `visinstruct filter "
    "--dry-run`) or use {filter}top_fraction",
    "inference_error": f"the model failed on whole batches: see the messages in {REJECTED_DIR}/",
    "internal_error": f"a bug in visinstruct: the exception of each row is in {REJECTED_DIR}/ (please report it)",
}
GENERATE_HINTS = {  # reasons the LLM stage gives, which mean something else there than in a download
    "connection_error": "the LLM server did not answer: check {generate}openai.endpoint and that the server is up",
    "ssl_error": "TLS with the LLM server failed: check the scheme of {generate}openai.endpoint and its certificate",
    "truncated": "the LLM server cut its answers off: check the server (or a proxy in between); a rerun retries",
    "invalid_url": "the client cannot send to {generate}openai.endpoint: check it",
    "timeout": "the LLM server did not answer in time: raise {generate}openai.timeout or check the server",
    "http_404": "the LLM server has no such route or model: check {generate}openai.endpoint and {generate}model",
    "http_401": "the LLM server refused the key: check the variable {generate}openai.api_key_env names",
    "empty_completion": "the LLM returned empty replies: check {generate}model and {generate}max_new_tokens",
    "truncated_reply": "replies cut at the token limit: raise {generate}max_new_tokens",
    "inference_error": "the LLM backend failed on whole batches: check {generate}backend and {generate}model",
}
TOP_REASONS = 3
# a build's stage sections
BUILD_PREFIXES = {"ingest": "ingest.", "curate": "curate.", "filter": "filter.", "generate": "generate."}


def reason_hint(reason: str, stage: str, prefixes: dict[str, str] | None = None) -> str | None:
    """What to change when ``reason`` (given by ``stage``) dropped rows, with config keys spelled for the config."""
    hint = (GENERATE_HINTS.get(reason) if stage == "generate" else None) or REASON_HINTS.get(reason)
    if hint is None and reason.startswith("http_5"):
        hint = (
            "the LLM server fails: check its log and {generate}model"
            if stage == "generate"
            else "the hosts answer with server errors: retry later ({ingest}write.retry_failed: true)"
        )
    if hint is None:
        return None
    prefixes = dict.fromkeys(("ingest", "curate", "filter", "generate"), "") | (prefixes or {})
    return hint.format(**prefixes)


def llm_unanswered(report: dict, stage: str) -> int:
    """Rows the LLM failed for a reason a rerun or a config change fixes, when no written sample holds a reply.

    A generation run whose LLM was down for its whole length still writes its caption-only share; it failed all
    the same.
    """
    if not report.get("backend_calls") or report.get("completion_tokens"):  # no LLM asked, or some reply written
        return 0
    from visinstruct.transforms.llm import CONFIG_REASONS, RETRYABLE_REASONS  # lazy: loads Beam's ML modules

    drops = next((s["dropped_by_reason"] for s in report.get("stages", []) if s["stage"] == "generate"), None)
    if drops is None:
        drops = report["rejected_by_reason"] if stage == "generate" else {}
    return sum(n for reason, n in drops.items() if reason in RETRYABLE_REASONS | CONFIG_REASONS)


def failure_summary(report: dict, stage: str, prefixes: dict[str, str] | None = None) -> str | None:
    """One line saying why a run failed, or ``None`` when it wrote samples and its accounting adds up.

    A run fails when it wrote nothing (every row rejected, or no row at all) or when its rows do not add up. The
    line names the top reasons, each with what to change; a build's ``stages`` say which stage gave each reason.

    Args:
        report: a run report (``summarize``'s keys; ``accounted``, ``stages_add_up``, ``stages`` when present).
        stage: the stage that gave the report's reasons (a build's per-stage counts take precedence).
        prefixes: config key prefixes of the stages' sections, e.g. ``BUILD_PREFIXES`` in a build.
    """
    problems = []
    if report.get("shards_unwritten"):
        problems.append(
            f"{report['shards_unwritten']} input shards could not be read and were not written "
            f"(their dead letters in {REJECTED_DIR}/ say why; `visinstruct validate` checks the input)"
        )
    elif not report.get("accounted", True) or not report.get("stages_add_up", True):
        read = report.get("rows_read", report.get("inputs_before"))
        problems.append(
            f"rows do not add up ({read if read is not None else '?'} in, {report['written']} written "
            f"+ {report['rejected']} rejected; see {REPORT_NAME})"
        )
    unanswered = llm_unanswered(report, stage)
    if unanswered and report["written"]:
        problems.append(f"the LLM answered none of the {unanswered} samples sent to it (the rest are caption-only)")
    if report["written"] == 0:
        problems.append(
            f"no sample written: all {report['inputs']} rows rejected"
            if report["inputs"]
            else "no input row reached the output"
        )
    if not problems:
        return None
    if report.get("stages"):
        ranked = [(s["stage"], r, n) for s in report["stages"] for r, n in s["dropped_by_reason"].items()]
    else:
        ranked = [(stage, r, n) for r, n in report["rejected_by_reason"].items()]
    ranked.sort(key=lambda x: (-x[2], x[1]))
    parts = []
    for by, reason, count in ranked[:TOP_REASONS]:
        hint = reason_hint(reason, by, prefixes)
        parts.append(f"{reason} {count}" + (f" ({hint})" if hint else ""))
    return "; ".join(problems) + (" - top reasons: " + ", ".join(parts) if parts else "")

"""Scale simulation of ``visinstruct ingest``: N synthetic rows through the real ingest graph, no network.

The network is replaced by the in-memory responder (``visinstruct.testing.responder``): mode ``refuse`` drops every
URL ``blocked_address`` (pure bookkeeping: no image is touched), mode ``image`` answers a 32x32 JPEG per URL. Each
(size, mode) runs in a subprocess on the FnApiRunner in ``multi_processing`` mode; this process samples the
subprocess's tree with psutil every 0.2 s (peak RSS of the controller and of each worker, CPU of each process) and
takes ``RUSAGE_CHILDREN`` around it (the CPU of every process it and its workers waited for).

    .venv/bin/python benchmarks/ingest_scale.py --sizes 10000,100000 --modes refuse,image --json scale.json

Per-row CPU is CPU / N, and also (CPU - CPU of a ``--base``-row run of the same mode) / (N - base), which takes out
the fixed cost of starting the runner and its workers. Results: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_MARK = "sdk_worker_main"  # in the command line of each FnApiRunner multi_processing worker


def write_url_list(path: str, n: int) -> None:
    """``n`` distinct URLs over 1,000 hosts, with captions, as a parquet URL list (written in slices)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 100_000):
            ids = range(start, min(n, start + 100_000))
            urls = [f"https://img{i % 1000}.host{i % 997}.example/photos/{i}/image.jpg" for i in ids]
            captions = [f"a synthetic photo number {i} of something worth a caption" for i in ids]
            writer.write_table(pa.table({"url": urls, "caption": captions}, schema=schema))


def child(args: argparse.Namespace) -> None:
    """Run the ingest graph once (this is the measured subprocess) and write its report to ``args.report``."""
    import functools
    import logging

    import apache_beam as beam

    from visinstruct.configs import IngestConfig, from_dict
    from visinstruct.pipelines.ingest import Ingest
    from visinstruct.pipelines.options import pipeline_options
    from visinstruct.pipelines.report import summarize
    from visinstruct.testing.responder import Responder

    logging.getLogger().setLevel(logging.WARNING)
    if args.trace_file:  # when each stage's bundle starts, to line up with the RSS samples
        bundles = logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner.run_bundle")
        handler = logging.FileHandler(args.trace_file)
        handler.setFormatter(logging.Formatter("%(created).2f %(message)s"))
        bundles.addHandler(handler)
        bundles.setLevel(logging.DEBUG)
        bundles.propagate = False
    settings = {
        "read": {"path": args.url_list},
        "write": {"path": args.out, "shard_size": args.shard_size},
        "download": {"per_host_rps": None, "check_robots_txt": False, "threads": args.threads},
        "resize": {"image_size": args.image_size, "resize_mode": "center_crop"},
    }
    for item in args.set or []:  # SECTION.KEY=VALUE, the value read as JSON when it parses (true, 3, null)
        name, _, text = item.partition("=")
        section, _, key = name.partition(".")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        settings.setdefault(section, {})[key] = value
    cfg = from_dict(IngestConfig, settings)
    beam_args = ["--runner=FnApiRunner"]
    if args.workers > 1:
        beam_args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Ingest" >> Ingest(cfg, fetcher_factory=functools.partial(Responder, mode=args.mode))
    result = p.run()
    result.wait_until_finish()
    report = summarize(args.out, stage="ingest", result=result)
    report.pop("shard_stats")
    Path(args.report).write_text(json.dumps(report))


def profile(args: argparse.Namespace, n: int, work: str) -> None:
    """Run ``n`` rows in this process (FnApiRunner ``in_memory``) under cProfile, every thread profiled (the
    fetch pool's too), and print the functions with the most cumulative and own seconds."""
    import cProfile
    import pstats
    import threading

    profiles = []
    thread_run = threading.Thread.run

    def profiled_run(self):
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            thread_run(self)
        finally:
            prof.disable()

    url_list = os.path.join(work, f"urls-{n}.parquet")
    if not os.path.exists(url_list):
        write_url_list(url_list, n)
    args.url_list, args.out, args.report, args.workers = url_list, os.path.join(work, f"prof-{n}"), os.devnull, 1
    shutil.rmtree(args.out, ignore_errors=True)
    threading.Thread.run = profiled_run
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        child(args)
    finally:
        main_prof.disable()
        threading.Thread.run = thread_run
    stats = pstats.Stats(main_prof)
    for prof in profiles:
        try:
            stats.add(prof)
        except (TypeError, ValueError):  # a profiler still running on a live thread has no stats to add
            continue
    stats.dump_stats(os.path.join(work, f"profile-{args.mode}-{n}.pstats"))
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(40)


def _sample(root, seen: dict, trace: list | None = None) -> None:
    """One look at ``root``'s process tree: per pid, its role, peak RSS and last CPU seconds (user + system)."""
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            with proc.oneshot():
                rss, cpu = proc.memory_info().rss, proc.cpu_times()
                cmdline = " ".join(proc.cmdline()) if proc.pid not in seen else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        entry = seen.setdefault(proc.pid, {"role": _role(proc, root, cmdline), "peak_rss": 0, "cpu_s": 0.0})
        entry["peak_rss"] = max(entry["peak_rss"], rss)
        if trace is not None:
            trace.append((round(time.time(), 2), proc.pid, entry["role"], rss >> 20))
        entry["cpu_s"] = max(entry["cpu_s"], cpu.user + cpu.system)


def _role(proc, root, cmdline: str) -> str:
    if proc.pid == root.pid:
        return "controller"
    python = "python" in proc.name().lower()  # not the shell Beam starts each worker through
    return "worker" if WORKER_MARK in cmdline and python else "other"


def measure(n: int, mode: str, url_list: str, work: str, args: argparse.Namespace) -> dict:
    """Run one (size, mode) in a subprocess and measure it."""
    import psutil

    out, report = os.path.join(work, f"out-{mode}-{n}"), os.path.join(work, f"report-{mode}-{n}.json")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", "--mode", mode, "--url-list", url_list, "--out", out]
    command += ["--report", report, "--shard-size", str(args.shard_size), "--workers", str(args.workers)]
    command += ["--threads", str(args.threads), "--image-size", str(args.image_size)]
    command += [f"--set={item}" for item in args.set or []]
    trace = [] if args.trace else None
    if args.trace:
        command += ["--trace-file", os.path.join(work, f"stages-{mode}-{n}.txt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    with open(os.path.join(work, f"log-{mode}-{n}.txt"), "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        root, seen = psutil.Process(proc.pid), {}
        while proc.poll() is None:
            _sample(root, seen, trace)
            time.sleep(0.2)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {n}: the run failed (exit {proc.returncode}); see {log.name}")
    rep = json.loads(Path(report).read_text())
    cpu_rusage = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    workers = sorted((p for p in seen.values() if p["role"] == "worker"), key=lambda p: -p["peak_rss"])
    controller = next(p for p in seen.values() if p["role"] == "controller")
    row = {
        "rows": n,
        "mode": mode,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu_rusage, 2),
        "cpu_s_sampled": round(sum(p["cpu_s"] for p in seen.values()), 2),
        "controller_cpu_s": round(controller["cpu_s"], 2),
        "worker_cpu_s": [round(p["cpu_s"], 2) for p in workers],
        "controller_peak_mb": round(controller["peak_rss"] / 2**20),
        "worker_peak_mb": [round(p["peak_rss"] / 2**20) for p in workers],
        "inputs": rep["inputs"],
        "written": rep["written"],
        "rejected": rep["rejected"],
        "rejected_by_reason": rep["rejected_by_reason"],
        "accounted": rep.get("accounted") and rep["inputs"] == n and rep["written"] + rep["rejected"] == n,
    }
    if trace is not None:
        Path(work, f"rss-{mode}-{n}.json").write_text(json.dumps(trace))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def per_row(rows: list[dict], base: dict[str, dict]) -> None:
    """Add CPU ms per row, raw and over a base run of the same mode (its fixed cost taken out)."""
    for row in rows:
        row["cpu_ms_per_row"] = round(1000 * row["cpu_s"] / row["rows"], 3)
        b = base.get(row["mode"])
        if b and row["rows"] > b["rows"]:
            row["cpu_ms_per_row_net"] = round(1000 * (row["cpu_s"] - b["cpu_s"]) / (row["rows"] - b["rows"]), 3)


def print_table(rows: list[dict]) -> None:
    head = f"{'rows':>9} {'mode':>6} {'wall s':>8} {'cpu s':>8} {'ms/row':>7} {'net':>7} {'ctrl MB':>8}  workers MB"
    print(head)
    for r in rows:
        net = r.get("cpu_ms_per_row_net")
        print(
            f"{r['rows']:>9} {r['mode']:>6} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['cpu_ms_per_row']:>7.3f} "
            f"{'' if net is None else f'{net:.3f}':>7} {r['controller_peak_mb']:>8}  {r['worker_peak_mb']}"
            f"{'' if r['accounted'] else '  ACCOUNTING FAILED'}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated row counts")
    parser.add_argument("--modes", default="refuse,image", help="responder modes: refuse, image")
    parser.add_argument("--base", type=int, default=1000, help="rows of the run whose cost is the fixed cost; 0: none")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64, help="download.threads per worker")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--set", action="append", help="SECTION.KEY=VALUE of the ingest config (repeatable)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the output folders")
    parser.add_argument("--work", default=None, help="folder for URL lists and outputs (default: a temp folder)")
    parser.add_argument("--profile", type=int, default=0, help="profile N rows of the first mode instead")
    parser.add_argument("--trace", action="store_true", help="record RSS over time and when each stage starts")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--mode", "--url-list", "--out", "--report", "--trace-file"):  # the child's
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return []
    work = args.work or tempfile.mkdtemp(prefix="ingest_scale_")
    os.makedirs(work, exist_ok=True)
    if args.profile:
        args.mode = args.modes.split(",")[0]
        profile(args, args.profile, work)
        return []
    print(f"load average at start: {os.getloadavg()}; cores: {os.cpu_count()}; work: {work}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, base = [], {}
    for mode in args.modes.split(","):
        for n in ([args.base] if args.base else []) + sizes:
            url_list = os.path.join(work, f"urls-{n}.parquet")
            if not os.path.exists(url_list):
                write_url_list(url_list, n)
            row = measure(n, mode, url_list, work, args)
            if n == args.base and mode not in base:
                base[mode] = row
            rows.append(row)
            print(json.dumps(row), flush=True)
    per_row(rows, base)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

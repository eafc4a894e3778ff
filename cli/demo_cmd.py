"""``visinstruct demo --out DIR [beam options]``: every stage on bundled data, offline (what `make demo` runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole product on bundled data from a loopback server",
        description="Serve bundled images (easy-VQA, shapes, photos, wrong captions, broken "
        "URLs) on 127.0.0.1, train a small CLIP on the spot, build (ingest, CLIP "
        "filter, SmolLM2 conversations), train a tiny LLaVA on the result and write "
        "a gallery. Offline; a few minutes on 2 cores.",
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pathlib import Path

    from visinstruct.cli.demo import print_layout, run_demo  # needs the dev extra (easy-vqa, scikit-image)
    from visinstruct.cli.gallery import gallery
    from visinstruct.cli.jobs import finish
    from visinstruct.cli.report import format_build_report
    from visinstruct.pipelines.report import BUILD_PREFIXES
    from visinstruct.transforms.layout import resolve_shards

    out = Path(args.out)
    reports = run_demo(out, beam_args)
    gallery(resolve_shards(str(out / "dataset")), str(out / "gallery.html"), str(out / "gallery.png"), limit=48)
    print_layout(out)
    print()
    print(format_build_report(reports["build"]))
    build = reports["build"]
    return finish("demo", build, build["stages"][-1]["stage"], BUILD_PREFIXES)

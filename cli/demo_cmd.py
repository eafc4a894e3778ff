"""``visinstruct demo --out DIR [beam options]``: every stage on bundled data, offline (what `make demo` runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the stages end to end on bundled data from a loopback server")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.set_defaults(run=run, accepts_beam_args=True)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pathlib import Path

    from visinstruct.cli.gallery import gallery
    from visinstruct.pipelines.demo import run_demo  # needs the dev extra (easy-vqa, scikit-image)

    reports = run_demo(args.out, beam_args)
    out = Path(args.out)
    gallery(sorted(str(p) for p in (out / "instruct").glob("*.tar")), str(out / "gallery.html"),
            str(out / "gallery.png"), limit=48)
    print(f"demo: gallery {out / 'gallery.html'} (contact sheet {out / 'gallery.png'})")
    return 0 if all(r.get("accounted", True) for r in reports.values()) else 1

"""Beam pipeline options shared by every entry point.

Beam 2.77's DirectRunner first tries the Prism runner, which downloads a binary; offline (a laptop on a plane,
a locked-down cluster, our CI) that costs a failed download before it falls back. Local runs therefore default
to the FnApiRunner, the engine DirectRunner falls back to for batch pipelines, unless ``--runner`` is given.
Every other option passes through to ``PipelineOptions`` untouched.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

DEFAULT_RUNNER = "FnApiRunner"


def has_runner(beam_args: list[str]) -> bool:
    """Whether the arguments name a runner (``--runner X`` or ``--runner=X``)."""
    return any(a == "--runner" or a.startswith("--runner=") for a in beam_args)


def pipeline_options(beam_args: list[str] | None = None, default_runner: str = DEFAULT_RUNNER) -> PipelineOptions:
    """``PipelineOptions`` from command-line style arguments, naming ``default_runner`` when none is given.

    ``save_main_session`` stays off: our DoFns live in importable modules, which is what Dataflow workers
    (installed with ``--setup_file``) need anyway.
    """
    args = list(beam_args or [])
    if not has_runner(args):
        args.append(f"--runner={default_runner}")
    return PipelineOptions(args)


def _option_classes(cls: type) -> list[type]:
    """``cls`` and every subclass registered so far (each runner and IO module adds its own)."""
    found = [cls]
    for sub in cls.__subclasses__():
        found += [c for c in _option_classes(sub) if c not in found]
    return found


def beam_parser():
    """An argument parser that knows every registered Beam pipeline option, as ``PipelineOptions`` builds it.

    Beam parses its flags with such a parser and only logs the rest ("Discarding unparseable args"); we use the
    same parser to refuse them instead.
    """
    import argparse

    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in _option_classes(PipelineOptions):
        try:
            cls._add_argparse_args(parser)  # Beam's own registration hook, as Beam calls it
        except argparse.ArgumentError:  # two classes declaring one flag: the first declaration serves
            continue
    return parser


def unknown_options(beam_args: list[str]) -> list[str]:
    """The arguments Beam would discard: flags no registered ``PipelineOptions`` declares, and stray values."""
    _, unknown = beam_parser().parse_known_args(list(beam_args))
    return unknown


def known_beam_flags() -> list[str]:
    """Every Beam flag, e.g. ``--runner`` (for "did you mean")."""
    return sorted({s for a in beam_parser()._actions for s in a.option_strings if s.startswith("--")})


LOCAL_RUNNERS = {
    "fnapirunner",
    "directrunner",
    "prismrunner",
    "interactiverunner",
    "bundlebasedrunner",
    "switchingdirectrunner",
}


def is_local(beam_args: list[str]) -> bool:
    """Whether the run executes on this machine (so its files and model caches are the workers' too)."""
    runner = DEFAULT_RUNNER
    for i, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            runner = arg.split("=", 1)[1]
        elif arg == "--runner" and i + 1 < len(beam_args):
            runner = beam_args[i + 1]
    return runner.rsplit(".", 1)[-1].lower() in LOCAL_RUNNERS

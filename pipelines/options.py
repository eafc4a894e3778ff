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

"""Checks a run's config before anything runs: inputs exist, models are known, checkpoints and caches present.

A wrong path or model name found here costs one line and exit status 2 instead of a Beam traceback minutes into a
run (or, on Dataflow, after workers start). What cannot be known before the run (a server down, a URL refused)
is the run report's business (:func:`visinstruct.pipelines.report.failure_summary`). The checks only read local
files and the local model caches: they never touch the network, so remote paths (``gs://...``) and, when the hub is
reachable, hub ids pass unchecked.

:func:`problems` is what ``visinstruct config check`` prints; :func:`preflight` is what the commands call;
:func:`expected_errors` turns the errors model loading and input reading are known to raise into one line.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from visinstruct.cli.errors import UserError
from visinstruct.configs import (
    BuildConfig,
    ClipModelConfig,
    CurateConfig,
    FilterConfig,
    GenerateConfig,
    IngestConfig,
    ReadConfig,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".gguf")
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """Whether the Hugging Face hub may not be reached (``HF_HUB_OFFLINE``, or transformers' own switch)."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _where(path: str) -> str:
    """``path``, saying what a relative one was resolved against (the usual surprise under a scheduler)."""
    return path if os.path.isabs(path) else f"{path} (relative to {os.getcwd()})"


def _missing(path: str) -> bool:
    """Whether a local path (or glob) names nothing; remote paths are never reported missing here."""
    if "://" in path:
        return False
    path = os.path.expanduser(path)
    if any(c in path for c in "*?[{"):
        return not glob.glob(re.sub(r"{[^}]*}", "*", path))
    return not os.path.exists(path)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(CHECKPOINT_SUFFIXES)
        or os.path.exists(name)
        or name.count("/") > 1
    )


def _hub_problem(key: str, repo_id: str, local: bool, filename: str = "config.json") -> str | None:
    """A hub id that cannot load offline because it is not cached; ``None`` when cached or the hub is reachable.

    ``local``: whether the model loads on this machine; remote workers (Dataflow) have caches of their own.
    """
    if not (local and offline()):
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return None
    return (
        f"{key}: model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set: download it where "
        f"the hub is reachable (`hf download {repo_id}`) or name a local folder"
    )


def read_problems(read: ReadConfig, key: str = "read") -> list[str]:
    """The input file, glob or folder of an ingest exists and has the columns ``read`` names (local inputs)."""
    found = []
    if _missing(read.path):
        found.append(f"{key}.path: no such file or folder: {_where(read.path)}")
    elif "://" not in read.path:  # the reader's own plan: formats, and the named columns in the file
        from visinstruct.transforms.read import plan_units
        from visinstruct.transforms.read_bounds import InputError

        try:
            plan_units(read)
        except InputError as e:  # the reader names read.<key>; in a build that section is ingest.read
            text = str(e)
            found.append(key + text[len("read") :] if text.startswith("read.") else f"{key}.path: {text}")
    if read.image_root and _missing(read.image_root):
        found.append(f"{key}.image_root: no such folder: {_where(read.image_root)}")
    return found


def clip_problems(model: ClipModelConfig, key: str, local: bool = True) -> list[str]:
    """Whether the filter's CLIP can load: name known, pretrained tag valid or checkpoint present, cache offline."""
    if model.backend == "transformers":
        if _looks_like_path(model.name):
            return [f"{key}.name: no model folder {_where(model.name)}"] if _missing(model.name) else []
        return [p for p in [_hub_problem(f"{key}.name", model.name, local)] if p]
    import open_clip

    if model.config_file:
        if _missing(model.config_file):
            return [f"{key}.config_file: no such file: {_where(model.config_file)}"]
        stem = os.path.splitext(os.path.basename(model.config_file))[0]
        if stem != model.name:
            return [
                f"{key}.config_file must be named {model.name}.json (open_clip names a model after its file), "
                f"got {model.config_file}"
            ]
    elif model.name.startswith("hf-hub:"):
        return [
            p for p in [_hub_problem(f"{key}.name", model.name[len("hf-hub:") :], local, "open_clip_config.json")] if p
        ]
    elif model.name not in open_clip.list_models():
        close = difflib.get_close_matches(model.name, open_clip.list_models(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return [
            f"{key}.name: open_clip knows no model {model.name!r} ({hint}see open_clip.list_models(); a custom "
            f"architecture needs {key}.config_file)"
        ]
    return _pretrained_problems(model, key, local)


def _pretrained_problems(model: ClipModelConfig, key: str, local: bool) -> list[str]:
    import open_clip

    tag = model.pretrained
    if not tag:
        return []
    if _looks_like_path(tag):
        return [f"{key}.pretrained: no checkpoint file {_where(tag)}"] if _missing(tag) else []
    if model.config_file:  # a custom architecture has no published weights to pick by tag
        return [f"{key}.pretrained: a model from config_file needs a checkpoint path, got tag {tag!r}"]
    tags = open_clip.list_pretrained_tags_by_model(model.name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none: give a checkpoint path or null for random weights"
        return [f"{key}.pretrained: {tag!r} is not a pretrained tag of {model.name} (open_clip has: {known})"]
    if local and offline() and not _weights_cached(open_clip.get_pretrained_cfg(model.name, tag)):
        return [
            f"{key}.pretrained: the weights of {model.name} {tag} are not in the local cache and HF_HUB_OFFLINE "
            "is set: download them where the hub is reachable, or give a checkpoint path"
        ]
    return []


def _weights_cached(pretrained_cfg: dict) -> bool:
    """Whether open_clip finds these pretrained weights without the network (where ``download_pretrained`` looks)."""
    from huggingface_hub import try_to_load_from_cache

    hub, url = pretrained_cfg.get("hf_hub", ""), pretrained_cfg.get("url", "")
    if hub:  # 'org/model/' (default file names) or 'org/model/file.bin'; open_clip prefers a .safetensors twin
        repo_id, filename = os.path.split(hub)
        stem = os.path.splitext(filename or "open_clip_pytorch_model.bin")[0]
        names = [filename or "open_clip_pytorch_model.bin", f"{stem}.safetensors", "open_clip_model.safetensors"]
        return any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in names)
    if url:
        return os.path.exists(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
    return True


def generate_problems(cfg: GenerateConfig, key: str = "", local: bool = True) -> list[str]:
    """Whether the generation backend can start: endpoint given, model present, templates present."""
    found = []
    if cfg.templates and _missing(cfg.templates):
        found.append(f"{key}templates: no such file: {_where(cfg.templates)}")
    if cfg.backend == "openai":
        endpoint = cfg.openai.endpoint
        if not endpoint:
            found.append(
                f"{key}openai.endpoint: backend openai needs the server's base URL, e.g. http://127.0.0.1:8000/v1"
            )
        elif not endpoint.startswith(("http://", "https://")):
            found.append(f"{key}openai.endpoint: must be an http(s) URL, got {endpoint!r}")
    elif cfg.backend == "transformers":
        if _looks_like_path(cfg.model):
            if _missing(cfg.model):
                found.append(f"{key}model: no model folder or file {_where(cfg.model)}")
        else:
            found += [p for p in [_hub_problem(f"{key}model", cfg.model, local)] if p]
    return found


def _shards_problem(spec: str, key: str) -> list[str]:
    from visinstruct.cli.jobs import input_shards

    try:
        input_shards(spec)
    except UserError as e:
        return [f"{key}: {e}"]
    return []


def curate_problems(cfg, prefix: str, local: bool, standalone: bool) -> list[str]:
    """A curate config's problems: semantic dedup's CLIP model, and every benchmark file it names."""
    from visinstruct.transforms.decontam import load_questions, reference_files

    found = []
    semdedup = cfg.semdedup
    if semdedup is not None and semdedup.embedding == "clip":
        if semdedup.model is not None:
            found += clip_problems(semdedup.model, f"{prefix}semdedup.model", local)
        elif standalone:
            found.append(f"{prefix}semdedup.model: embedding clip needs a CLIP model (or embedding: open_nsfw)")
    for i, benchmark in enumerate(cfg.decontaminate.benchmarks if cfg.decontaminate else []):
        key = f"{prefix}decontaminate.benchmarks[{i}]"
        try:
            if benchmark.images:
                reference_files(benchmark.images)
            if benchmark.questions:
                load_questions(benchmark.questions)
        except (ValueError, OSError) as e:
            found.append(f"{key} ({benchmark.name}): {e}")
    return found


def problems(cfg, local: bool = True) -> list[str]:
    """Every problem found in a build, ingest, filter or generate config, one line each (empty: none found).

    ``local``: the models load on this machine (a local runner), so its model cache counts.
    """
    if isinstance(cfg, IngestConfig):
        output = [] if cfg.write.path else ["write.path: ingest needs an output folder (write.path, or --out DIR)"]
        return output + read_problems(cfg.read)
    if isinstance(cfg, FilterConfig):
        return (_shards_problem(cfg.input, "input") if cfg.input else []) + clip_problems(cfg.model, "model", local)
    if isinstance(cfg, GenerateConfig):
        return (_shards_problem(cfg.input, "input") if cfg.input else []) + generate_problems(cfg, "", local)
    if isinstance(cfg, CurateConfig):
        return (_shards_problem(cfg.input, "input") if cfg.input else []) + curate_problems(cfg, "", local, True)
    if isinstance(cfg, BuildConfig):
        found = read_problems(cfg.ingest.read, "ingest.read") if cfg.ingest else _shards_problem(cfg.input, "input")
        if cfg.curate:
            found += curate_problems(cfg.curate, "curate.", local, False)
        if cfg.filter:
            found += clip_problems(cfg.filter.model, "filter.model", local)
        if cfg.generate:
            found += generate_problems(cfg.generate, "generate.", local)
        return found
    return []


def preflight(cfg, beam_args: list[str] | None = None) -> None:
    """Raise a one-line :class:`UserError` naming every problem :func:`problems` finds.

    ``beam_args``: the run's Beam options; with a remote runner (Dataflow...) the local model cache is not checked.
    """
    from visinstruct.pipelines.options import is_local

    found = problems(cfg, local=is_local(beam_args or []))
    if found:
        raise UserError("; ".join(found))


# What model loading and input reading raise for a wrong name, tag, path or cache, whichever layer wraps them
# (Beam re-raises a worker's exception as a RuntimeError carrying the original text).
_EXPECTED = re.compile(
    r"(?:OSError|RuntimeError|ValueError|InputError|FileNotFoundError|LocalEntryNotFoundError|HFValidationError)?"
    r":? ?(.*(?:is not a local folder and is not a valid model identifier|couldn't connect to|"
    r"outgoing traffic has been disabled|does not appear to have a file named|Model config for .* not found|"
    r"Pretrained weights .* not found|is not a known tag or valid file path|Unknown model|"
    r"open_clip knows no model|no input file matches|"
    r"Repo id must|not in the local cache|config_file must be named).*)"
)


def expected_error_line(exc: BaseException) -> str | None:
    """The one line of an expected model/input error in ``exc`` or what it wraps, or ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for line in str(exc).splitlines():
            match = _EXPECTED.search(line)
            if match:
                return match.group(1).strip()[:400]
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def expected_errors() -> Iterator[None]:
    """Turn the expected errors of reading inputs and loading models into a one-line :class:`UserError`."""
    from visinstruct.transforms.read_bounds import InputError

    try:
        yield
    except InputError as e:
        raise UserError(str(e)) from None
    except Exception as e:
        line = expected_error_line(e)
        if line is None:
            raise
        raise UserError(f"cannot load the model or input: {line}") from None

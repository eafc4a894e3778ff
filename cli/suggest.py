""" "Did you mean" for an option neither the command nor Beam knows.

Most such options are habits from img2dataset (``--output_folder``, ``--url_list``, ``--thread_count``; ``ingest``
takes them itself, the other commands do not): the suggestion is the config key as ``--set key=value`` (or the
command's own ``--out``/``--input``), else the closest Beam flag, else the closest config key.
"""

from __future__ import annotations

import difflib

from visinstruct.cli.ingest_cmd import IMG2DATASET

# img2dataset's folders: the keys --out and --input set, in whichever config the command has.
FOLDERS = {
    "output_folder": ("write.path", "out"),
    "url_list": ("read.path", "ingest.read.path", "input", "data.shards"),
}
COMMAND_FLAGS = {"write.path": "--out", "out": "--out", "input": "--input", "data.shards": "--input"}
TOP_LEVEL = {"-v", "--verbose", "-q", "--quiet"}


def _value(token: str, beam_args: list[str]) -> str | None:
    if "=" in token:
        return token.split("=", 1)[1]
    i = beam_args.index(token) if token in beam_args else -1
    if 0 <= i < len(beam_args) - 1 and not beam_args[i + 1].startswith("-"):
        return beam_args[i + 1]
    return None


def _config_key(command: str, name: str) -> str | None:
    """The config key an option name most likely means, in the command's config (``None`` when none fits)."""
    from visinstruct.configs import CONFIGS, describe

    cls = CONFIGS.get(command)
    if cls is None:
        return None
    keys = [key for key, type_name, _, _ in describe(cls) if type_name != "section"]
    folder = next((key for key in FOLDERS.get(name, ()) if key in keys), None)
    if folder is not None:
        return folder
    wanted = IMG2DATASET.get(name, name)
    if wanted in keys:
        return wanted
    within = [key for key in keys if key.endswith(f".{wanted}")]  # a build's ingest.download.threads
    if within:
        return within[0]
    leaf = {key.rsplit(".", 1)[-1]: key for key in keys}
    for candidate in (wanted, wanted.rsplit(".", 1)[-1]):  # a standalone filter's write.path is write.path too
        if candidate in leaf:
            return leaf[candidate]
    close = difflib.get_close_matches(name, list(leaf) + keys, n=1, cutoff=0.75)
    return leaf.get(close[0], close[0]) if close else None


def unknown_option_message(command: str, token: str, beam_args: list[str], command_flags: list[str]) -> str:
    """One line refusing ``token`` (an argument neither ``command`` nor Beam parses), with a suggestion."""
    if not token.startswith("-"):
        return f"unexpected argument {token!r} (neither visinstruct {command} nor Beam takes it)"
    flag = token.split("=", 1)[0]
    if flag in TOP_LEVEL:
        return f"{flag} goes before the command: visinstruct {flag} {command} ..."
    name = flag.lstrip("-").replace("-", "_")
    value = _value(token, beam_args)
    shown = value if value is not None else "..."
    key = _config_key(command, name)
    if key in COMMAND_FLAGS and COMMAND_FLAGS[key] in command_flags:
        hint = f"{COMMAND_FLAGS[key]} {shown}"
    elif key is not None:
        hint = f"--set {key}={shown}"
    else:
        from visinstruct.pipelines.options import known_beam_flags

        flags = {f.lstrip("-").replace("-", "_"): f for f in known_beam_flags() + command_flags}
        close = difflib.get_close_matches(name, list(flags), n=1, cutoff=0.75)
        hint = flags[close[0]] if close else None
    suggestion = f"; did you mean {hint}?" if hint else ""
    return f"unknown option {flag}: neither visinstruct {command} nor Beam knows it{suggestion}"

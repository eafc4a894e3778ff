"""CONFIG.md: every key of every config, generated from the config classes (a test keeps the file in step)."""

from __future__ import annotations

from visinstruct.configs.loader import describe

HEADER = """# Config reference

Every key of every config, with its type, default and meaning. Generated from the config classes
(`configs/stages.py`, `configs/generate.py`, `configs/build.py`, `configs/train.py`, `configs/train_llava.py`)
by `visinstruct config reference > CONFIG.md`; a test fails when this file and the classes disagree.
`visinstruct config show NAME` prints one of them, and `visinstruct config check NAME FILE` checks a YAML file.
Keys nest as in YAML: `download.threads` is

```yaml
download:
  threads: 64
```

and any key can be set on the command line with `--set download.threads=64`. Bundled examples live in `configs/`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_reference(configs: dict[str, type]) -> str:
    """One section per config (``visinstruct <name>``), one table row per key; sections as bold rows."""
    parts = [HEADER]
    commands = {cls: name for name, cls in configs.items()}  # a build's stage sections: documented on their own
    for name, cls in configs.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        parts.append(f"## {name}\n\n{_cell(doc)}\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, type_name, default, meaning in describe(cls, documented=commands):
            if type_name == "section":
                parts.append(f"| **`{key}`** | section | | {_cell(meaning)} |")
            else:
                parts.append(f"| `{key}` | `{_cell(type_name)}` | `{_cell(default)}` | {_cell(meaning)} |")
        parts.append("")
    return "\n".join(parts)

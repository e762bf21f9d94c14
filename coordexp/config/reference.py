"""Generates docs/config.md from the schema: `python -m coordexp.config.reference > docs/config.md`.

A test regenerates it and compares, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterator
from typing import Any

from omegaconf import MISSING

from coordexp.config.leaf import REQUIRED_LEAF_KNOBS, VL_LEAF_KNOBS
from coordexp.config.legacy import LEGACY_KEYS
from coordexp.config.paths import CONF_DIR
from coordexp.config.schema import TrainConfig

HEADER = """# Config reference

Generated from `coordexp/config/schema.py` by `python -m coordexp.config.reference > docs/config.md`
(a test fails if this file and the schema disagree). Every key is checked: unknown keys fail with their
full dotted path, closed sets are enums, and ranges and cross-field rules are reported all at once.
`(required)` means the experiment leaf or the command line must set it.

Groups (select with `group=option`): {groups}. Experiment leaves:
`conf/experiment/*.yaml` (`+experiment=<name>`), one hop each; every leaf pins:
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin in (list, list):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin in (dict, dict):
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(m.value for m in tp)
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if isinstance(value, list):  # a list of enum members reads as YAML would write it
            value = "[" + ", ".join(str(v.value if isinstance(v, enum.Enum) else v) for v in value) + "]"
        return "" if dataclasses.is_dataclass(value) else f"`{value}`"
    if f.default is MISSING or f.default is dataclasses.MISSING:
        return "(required)"
    value = f.default.value if isinstance(f.default, enum.Enum) else f.default
    return "`null`" if value is None else f"`{value}`"


def rows(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from rows(tp, path + ".")
        else:
            yield path, _type_name(tp), _default(f), f.metadata.get("help", "")


def config_groups() -> str:
    """Every config group under ``conf/`` (the experiment leaves aside) with its options."""
    groups = sorted({p.parent for p in CONF_DIR.rglob("*.yaml")} - {CONF_DIR}, key=str)
    named = [(g.relative_to(CONF_DIR).as_posix(), sorted(p.stem for p in g.glob("*.yaml"))) for g in groups]
    return ", ".join(f"`{name}` ({', '.join(options)})" for name, options in named
                     if not name.startswith("experiment"))


def render() -> str:
    out = [HEADER.format(groups=config_groups())]
    out += [f"`{k}`" + (", " if i < len(REQUIRED_LEAF_KNOBS) - 1 else ".") for i, k in
            enumerate(REQUIRED_LEAF_KNOBS)]
    out += [" A leaf that selects a vision-language model also pins "
            + ", ".join(f"`{k}`" for k in VL_LEAF_KNOBS) + ".\n"]
    out = ["".join(out), "| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{p}` | {t} | {d} | {h} |" for p, t, d, h in rows()]
    out += ["", "## Legacy keys", "", "These fail fast with the migration text shown.", "",
            "| key (and everything below it) | what to do |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in LEGACY_KEYS]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")

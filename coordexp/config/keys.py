"""Unknown- and legacy-key detection on raw (uncomposed) mappings, against the typed schema.

Runs before Hydra composes, on each leaf file and on command-line override keys, so that every bad
key is reported at once with its full dotted path, a suggestion for typos, and migration text for
legacy keys. Hydra's own structured-config merge stays on as the backstop.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from coordexp.config.legacy import legacy_problems
from coordexp.config.schema import TrainConfig

_OPEN = object()  # marker: a Dict[str, Any] node accepts any key


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache  # get_type_hints evaluates every string annotation: ~0.3 ms per call
def _field_types(cls: type[Any]) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def child_type(parent: Any, key: str) -> tuple[bool, Any]:
    """(known, type) of ``key`` under a node of type ``parent``."""
    if parent is _OPEN:
        return True, _OPEN
    if dataclasses.is_dataclass(parent):
        types = _field_types(parent)
        if key not in types:
            return False, None
        tp = types[key]
        origin = typing.get_origin(tp)
        if origin in (dict, Mapping) or tp is dict:
            return True, _OPEN
        return True, tp
    return True, None  # a leaf value: nothing below it is checked here


def _walk(node: Any, tp: Any, path: str) -> Iterator[tuple[str, bool]]:
    """Yield (dotted path, known) for every key of a raw mapping, list items included."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            known, sub_tp = child_type(tp, str(key)) if tp is not None else (True, None)
            yield sub, known
            yield from _walk(value, sub_tp if known else None, sub)  # unknown subtrees: legacy scan only
    elif isinstance(node, list):
        item_tp = None
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp) or (None,)
        for i, value in enumerate(node):
            yield from _walk(value, item_tp if dataclasses.is_dataclass(item_tp) else None, f"{path}[{i}]")


def _suggestion(path: str, parent: Any) -> str:
    if not dataclasses.is_dataclass(parent):
        return ""
    key = path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(parent)], n=1, cutoff=0.6)
    return (f"; did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}'?"
            if close else "")


def _type_at(path: str, root: type[Any] = TrainConfig) -> Any:
    tp: Any = root
    for part in path.replace("]", "").replace("[", ".").split("."):
        if part.isdigit():
            args = typing.get_args(tp)
            tp = args[0] if args else None
            continue
        known, tp = child_type(tp, part)
        if not known or tp is None:
            return None
    return tp


def key_problems(raw: Mapping[str, Any], root: type[Any] = TrainConfig, prefix: str = "",
                 allowed_top: tuple[str, ...] = ("defaults", "hydra")) -> list[str]:
    """All legacy and unknown keys of ``raw`` (a mapping placed at ``prefix`` in the tree)."""
    base_tp = _type_at(prefix, root) if prefix else root
    body = {k: v for k, v in raw.items() if not (not prefix and k in allowed_top)}
    paths = [(f"{prefix}.{p}" if prefix else p, known) for p, known in _walk(body, base_tp, "")]
    problems = legacy_problems(p for p, _ in paths)
    legacy_roots = [p.split(":", 1)[0] for p in problems]
    for path, known in paths:
        if known or any(path == r or path.startswith(r + ".") or r.startswith(path + ".")
                        for r in legacy_roots):
            continue
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        parent_tp = _type_at(parent_path, root) if parent_path else root
        problems.append(f"{path}: unknown key (not in {getattr(parent_tp, '__name__', 'schema')})"
                        f"{_suggestion(path, parent_tp)}")
    return problems


def path_problems(path: str, root: type[Any] = TrainConfig) -> str | None:
    """Problem with one dotted override key, or None if the schema has it."""
    problems = key_problems(_nest(path), root)
    return "; ".join(problems) if problems else None


def _nest(path: str) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = None
    return out

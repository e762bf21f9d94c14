"""Synthetic detection task: deterministic records a tiny text-only model can learn on CPU.

A record follows the JSONL data contract (``docs/data.md``)::

    {"width": 640, "height": 480,
     "objects": [{"desc": "red square", "bbox_2d": [111, 0, 333, 222]}, ...]}

Boxes are norm1000 ints (0..999), ``x2 > x1`` and ``y2 > y1``, objects sorted by ``(minY, minX)``
(for a box: ``(y1, x1)``); no two objects of a record share that sort key, so the order is unique.

There is no image. The *observation* is text: the user turn lists the objects with their coordinate
tokens in answer order (see :mod:`coordexp.data.prompt`, ``scene="text"``), so the assistant answer is a
copy-and-format transform of the prompt. Coordinates live on a coarse grid (``grid`` evenly spaced
norm1000 values per axis) so only a handful of coordinate tokens ever appear, which is what lets a
64-wide, 2-layer model learn the task in minutes on a CPU (the measurement is in ``docs/data.md``).

This module only produces records; it does not serialize CoordJSON (that is ``coordexp.coordjson``)
and it does not build prompts (that is :mod:`coordexp.data.prompt`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordexp.coordjson.serialize import sort_key
from coordexp.data.streams import record_rng
from coordexp.data.synthetic_images import ImageTaskSpec, write_synthetic_image_jsonl

__all__ = [
    "COLOURS",
    "SHAPES",
    "SyntheticSpec",
    "generate_record",
    "generate_records",
    "grid_values",
    "iter_records",
    "write_synthetic_jsonl",
    "write_synthetic_split",
]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "star", "heart", "cross")
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (800, 600), (512, 512), (1024, 768))


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic task. Defaults are the setting measured in ``docs/data.md``."""

    min_objects: int = 1
    max_objects: int = 3
    grid: int = 10  # distinct coordinate values per axis (2..1000); 1000 = every norm1000 bin
    colours: tuple[str, ...] = COLOURS
    shapes: tuple[str, ...] = SHAPES
    unique_desc: bool = True  # no two objects of one record share a desc
    image_sizes: tuple[tuple[int, int], ...] = field(default=IMAGE_SIZES)

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.min_objects, int) and self.min_objects >= 1):
            problems.append(f"min_objects must be an int >= 1, got {self.min_objects!r}")
        if not (isinstance(self.max_objects, int) and self.max_objects >= self.min_objects):
            problems.append(f"max_objects must be an int >= min_objects, got {self.max_objects!r}")
        if not (isinstance(self.grid, int) and 2 <= self.grid <= 1000):
            problems.append(f"grid must be an int in [2, 1000], got {self.grid!r}")
        if not self.colours or not self.shapes:
            problems.append("colours and shapes must be non-empty")
        n_desc = len(self.colours) * len(self.shapes)
        if self.unique_desc and isinstance(self.max_objects, int) and self.max_objects > n_desc:
            problems.append(f"max_objects={self.max_objects} exceeds the {n_desc} distinct descs")
        # Distinct (y1, x1) start keys available on the grid: starts use indices 0..grid-2 on each axis.
        corners_ok = isinstance(self.grid, int) and self.grid >= 2 and isinstance(self.max_objects, int)
        if corners_ok and self.max_objects > (self.grid - 1) ** 2:
            problems.append(f"max_objects={self.max_objects} exceeds the {(self.grid - 1) ** 2} "
                            f"distinct box corners of grid={self.grid}")
        if not self.image_sizes or any(len(s) != 2 or min(s) < 1 for s in self.image_sizes):
            problems.append("image_sizes must be a non-empty list of (width, height) with positive ints")
        if problems:
            raise ValueError("invalid SyntheticSpec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["colours"] = list(self.colours)
        d["shapes"] = list(self.shapes)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        return d


def grid_values(grid: int) -> list[int]:
    """The ``grid`` norm1000 values used on each axis: evenly spaced from 0 to 999, inclusive."""
    if grid == 1000:
        return list(range(1000))
    return [round(i * 999 / (grid - 1)) for i in range(grid)]


def generate_record(seed: int, index: int, spec: SyntheticSpec | None = None) -> dict[str, Any]:
    """Record number ``index`` of the stream ``seed`` (pure function of its arguments)."""
    spec = spec or SyntheticSpec()
    rng = record_rng(seed, index)
    values = grid_values(spec.grid)
    g = len(values)
    width, height = spec.image_sizes[rng.randrange(len(spec.image_sizes))]
    n = rng.randint(spec.min_objects, spec.max_objects)

    descs = [f"{c} {s}" for c in spec.colours for s in spec.shapes]
    chosen = rng.sample(descs, n) if spec.unique_desc else [rng.choice(descs) for _ in range(n)]

    objects = []
    starts: set[tuple[int, int]] = set()
    for desc in chosen:
        while True:
            a = rng.randrange(g - 1)  # x1 index
            b = rng.randrange(g - 1)  # y1 index
            if (b, a) not in starts:
                break
        starts.add((b, a))
        c = rng.randrange(a + 1, g)  # x2 index > x1 index
        d = rng.randrange(b + 1, g)  # y2 index > y1 index
        objects.append({"desc": desc, "bbox_2d": [values[a], values[b], values[c], values[d]]})
    objects.sort(key=lambda o: sort_key(o["bbox_2d"]))
    return {"width": width, "height": height, "objects": objects}


def iter_records(n: int, seed: int, spec: SyntheticSpec | None = None) -> Iterator[dict[str, Any]]:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    spec = spec or SyntheticSpec()
    for i in range(n):
        yield generate_record(seed, i, spec)


def generate_records(n: int, seed: int, spec: SyntheticSpec | None = None) -> list[dict[str, Any]]:
    return list(iter_records(n, seed, spec))


def write_synthetic_jsonl(
    path: str | os.PathLike,
    n: int,
    seed: int,
    spec: SyntheticSpec | None = None,
    **overrides: Any,
) -> Path:
    """Write ``n`` records (one JSON object per line) to ``path`` atomically; return the path.

    ``overrides`` are :class:`SyntheticSpec` fields (e.g. ``max_objects=2, grid=20``) applied on top of
    ``spec`` (or the defaults).
    """
    base = spec or SyntheticSpec()
    if overrides:
        merged = {**{k: getattr(base, k) for k in base.__dataclass_fields__}, **overrides}
        unknown = sorted(set(overrides) - set(base.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown SyntheticSpec field(s): {', '.join(unknown)}")
        base = SyntheticSpec(**merged)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in iter_records(n, seed, base))
    os.replace(tmp, path)
    return path


def write_synthetic_split(path: str | os.PathLike, syn: Any, split: str) -> Path:
    """The learner's (and coordexp.eval's) synthetic ``train``/``val`` split from ``data.synthetic``:
    text scenes, or rendered images (``syn.images``); val uses ``seed + 1``."""
    n, seed = (syn.train_samples, syn.seed) if split == "train" else (syn.val_samples, syn.seed + 1)
    if syn.images:
        task = ImageTaskSpec(cell=syn.image_cell, min_objects=syn.min_objects, max_objects=syn.max_objects)
        return write_synthetic_image_jsonl(path, n, seed, task)
    return write_synthetic_jsonl(path, n, seed, SyntheticSpec(min_objects=syn.min_objects,
                                                              max_objects=syn.max_objects))

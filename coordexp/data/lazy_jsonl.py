"""Lazy JSONL dataset for large files: an index of line offsets up front, each record parsed when asked for.

:class:`JsonlDetectionDataset` parses and validates the whole file in every process that builds it: for
100k records that is tens of seconds per DDP rank before the first step. :class:`LazyJsonlDataset` only
scans the file for line starts (one pass over the bytes, no JSON decoding) and parses record ``i`` -- with
the same validation and prompt messages as the eager dataset -- on ``ds[i]``. Under DDP every rank builds
the same index and the trainer's distributed sampler hands each rank its own indices, so a rank reads and
parses only its shard, as it trains. :meth:`LazyJsonlDataset.shard` gives the ``rank``-th of
``world_size`` interleaved shards directly for code that does its own sharding.

Validation moves to one explicit, parallel pass: :meth:`LazyJsonlDataset.validate` checks every record (or
an evenly spaced ``sample`` of them) in worker processes with a progress bar and raises one
:class:`~coordexp.data.jsonl.DataValidationError` listing the bad lines, as the eager loader does. A bad
line that was not validated fails when it is read, with the same ``file:line: reason`` message.
Measured load times: docs/benchmarks.md ("JSONL loading").
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from coordexp.data.jsonl import (
    MAX_REPORTED_ERRORS,
    DataValidationError,
    DetectionSample,
    decode_line,
    parse_record,
)
from coordexp.data.prompt import PromptSpec, build_messages

__all__ = ["LazyJsonlDataset", "evenly_spaced", "index_lines"]


def index_lines(path: str | os.PathLike) -> tuple[array, array]:
    """(byte offsets, 1-based line numbers) of the non-blank lines of ``path``, as ``array('q')``."""
    offsets, lines = array("q"), array("q")
    pos = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                offsets.append(pos)
                lines.append(line_no)
            pos += len(raw)
    return offsets, lines


def _parse(raw: bytes, base: Path, check_images: bool):
    """(error, (width, height, objects, images), record) of one line; error is '' when the line is valid."""
    try:
        rec = decode_line(raw)
    except ValueError as e:
        return str(e), None, None
    try:
        return "", parse_record(rec, base_dir=base, check_images=check_images), rec
    except ValueError as e:
        return str(e), None, None


def _validate_chunk(args) -> tuple[int, list[tuple[int, str]]]:
    path, offsets, lines, check_images = args
    base = Path(path).parent
    errors = []
    with open(path, "rb") as f:
        for off, line_no in zip(offsets, lines):
            f.seek(off)
            err, _, _ = _parse(f.readline(), base, check_images)
            if err:
                errors.append((line_no, err))
    return len(offsets), errors


class LazyJsonlDataset:
    """Map-style dataset over one JSONL file that parses records on access (usable by a torch DataLoader).

    ``len(ds)`` is the number of non-blank lines; ``ds[i]`` is the :class:`DetectionSample` of the i-th one
    (``index`` = i, ``source`` = ``file:line``), with the prompt messages of ``prompt``. Raises
    ``FileNotFoundError`` for a missing file, ``DataValidationError`` for an empty file, and, on access, for
    an invalid record."""

    def __init__(self, path: str | os.PathLike, prompt: PromptSpec | None = None, *,
                 check_images: bool = True, _index: tuple[array, array] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: JSONL file not found")
        self.prompt = prompt or PromptSpec()
        self.check_images = check_images
        self._offsets, self._lines = _index if _index is not None else index_lines(self.path)
        if not len(self._offsets):
            raise DataValidationError([f"{self.path}: no records"])
        self._fh = None
        self._fh_pid = -1

    def __len__(self) -> int:
        return len(self._offsets)

    def _read(self, i: int) -> bytes:
        if self._fh is None or self._fh_pid != os.getpid():  # one handle per process (DataLoader workers)
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the dataset's life
            self._fh_pid = os.getpid()
        self._fh.seek(self._offsets[i])
        return self._fh.readline()

    def __getitem__(self, i: int) -> DetectionSample:
        return self.get(i)

    def get(self, i: int, *, check_images: bool | None = None) -> DetectionSample:
        """``self[i]``, with the image existence check of this one read on or off (None: the dataset's)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} records")
        i %= len(self)
        where = f"{self.path}:{self._lines[i]}"
        check = self.check_images if check_images is None else check_images
        err, parsed, rec = _parse(self._read(i), self.path.parent, check)
        if err:
            raise DataValidationError([f"{where}: {err}"])
        width, height, objects, images = parsed
        sample = DetectionSample(index=i, source=where, width=width, height=height, objects=objects,
                                 images=images, summary=rec.get("summary"), metadata=rec.get("metadata"))
        return replace(sample, messages=tuple(build_messages(sample, self.prompt)))

    def __iter__(self) -> Iterator[DetectionSample]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"], state["_fh_pid"] = None, -1
        return state

    def shard(self, rank: int, world_size: int) -> LazyJsonlDataset:
        """Records ``rank, rank + world_size, ...`` as a dataset of their own (indices renumbered)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return LazyJsonlDataset(self.path, self.prompt, check_images=self.check_images,
                                _index=(self._offsets[rank::world_size], self._lines[rank::world_size]))

    def validate(self, *, workers: int = 1, sample: int | None = None, progress: bool = True) -> int:
        """Check every record (or ``sample`` evenly spaced ones) in ``workers`` processes; return how many
        were checked. Raises ``DataValidationError`` with the first bad lines (in file order) and a count."""
        picks: Sequence[int] = range(len(self)) if sample is None else evenly_spaced(len(self), sample)
        chunk = 2000
        jobs = [(str(self.path), [self._offsets[i] for i in picks[s:s + chunk]],
                 [self._lines[i] for i in picks[s:s + chunk]], self.check_images)
                for s in range(0, len(picks), chunk)]
        errors: list[tuple[int, str]] = []
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = _progress(pool.map(_validate_chunk, jobs), len(picks), progress)
                checked = sum(_collect(results, errors))
        else:
            checked = sum(_collect(_progress(map(_validate_chunk, jobs), len(picks), progress), errors))
        if errors:
            errors.sort()
            raise DataValidationError([f"{self.path}:{n}: {e}" for n, e in errors[:MAX_REPORTED_ERRORS]],
                                      len(errors))
        return checked


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices of ``range(n)``, evenly spaced, first and last included (k >= 2)."""
    if k >= n:
        return list(range(n))
    return sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)})


def _collect(results, errors: list) -> Iterator[int]:
    for n, errs in results:
        errors.extend(errs)
        yield n


def _progress(results, total: int, enabled: bool):
    if not enabled:
        yield from results
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="validating", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
        for n, errs in results:
            bar.update(n)
            yield n, errs

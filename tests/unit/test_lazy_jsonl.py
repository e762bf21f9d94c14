"""LazyJsonlDataset: the same samples as the eager loader, parsed on access; shards; parallel validation."""

from __future__ import annotations

import json
import pickle

import pytest

from coordexp.data.jsonl import DataValidationError, load_jsonl
from coordexp.data.lazy_jsonl import LazyJsonlDataset, index_lines
from coordexp.data.prompt import PromptSpec
from coordexp.data.synthetic import generate_records


@pytest.fixture
def split(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in generate_records(9, 5)]
    lines.insert(3, "")  # a blank line: skipped, line numbers still count it
    lines.insert(7, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_same_samples_as_the_eager_loader(split):
    prompt = PromptSpec(object_field_order="geometry_first", system_prompt="sys")
    eager = load_jsonl(split, prompt)
    lazy = LazyJsonlDataset(split, prompt)
    assert len(lazy) == len(eager) == 9
    assert list(lazy) == list(eager)  # index, source (file:line), objects, prompt messages
    assert lazy[3].source == f"{split}:5" and lazy[-1] == eager[8]
    offsets, lines = index_lines(split)
    assert list(lines) == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    assert split.read_bytes()[offsets[3]:].startswith(b'{"width"')
    with pytest.raises(IndexError):
        lazy[9]


def test_shards_interleave_and_pickle(split):
    lazy = LazyJsonlDataset(split)
    shards = [lazy.shard(r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [5, 4]
    assert [s.source for s in shards[1]] == [lazy[i].source for i in (1, 3, 5, 7)]
    assert shards[1][0].index == 0  # renumbered within the shard
    lazy[0]  # opens the file handle; a pickled copy (DataLoader worker) opens its own
    assert pickle.loads(pickle.dumps(lazy))[4] == lazy[4]
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        lazy.shard(2, 2)


def test_bad_lines_fail_on_access_and_in_validate(tmp_path):
    good = [json.dumps(r) for r in generate_records(4500, 1)]
    good[10] = '{"width": 10, "height": 10, "objects": []}'
    good[4000] = '{"width": 10, "height": 10, "objects": [{"desc": "a", "bbox_2d": [1, 2, 3]}]}'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(good) + "\n").encode() + b'{"desc": "\xff"}\n')
    lazy = LazyJsonlDataset(path)  # the index does not parse anything
    assert len(lazy) == 4501 and lazy[9].source == f"{path}:10"
    with pytest.raises(DataValidationError) as err:
        lazy[10]
    assert str(err.value) == (f"{path}:11: empty objects (Stage-2 needs at least one ground-truth object per "
                              f"sample)")
    for workers in (1, 2):
        with pytest.raises(DataValidationError) as err:
            lazy.validate(workers=workers, progress=False)
        assert err.value.errors == [
            f"{path}:11: empty objects (Stage-2 needs at least one ground-truth object per sample)",
            f"{path}:4001: objects[0]: bbox_2d must have 4 values [x1, y1, x2, y2], got 3",
            f"{path}:4501: not UTF-8 text: byte 0xff at byte offset 10",
        ]
    # an evenly spaced sample of the odd records (file records 1, 2249, 4499): all valid
    assert LazyJsonlDataset(path).shard(1, 2).validate(sample=3, progress=False) == 3


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        LazyJsonlDataset(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataValidationError, match="no records"):
        LazyJsonlDataset(tmp_path / "e.jsonl")

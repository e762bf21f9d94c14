"""Issue 18 (scale): data.kind=jsonl training reads the file lazily. load_samples reads only line offsets;
each rank checks its own interleaved share (record contract, images, length rule) with the eager path's
messages; data.image_check: sample checks exactly data.image_check_samples records' images up front and the
others as the trainer reads them. Real tiny tokenizers and prompt encoders."""

from __future__ import annotations

import json

import pytest

from coordexp.config.load import compose, to_train_config
from coordexp.data.jsonl import load_jsonl
from coordexp.data.lazy_jsonl import LazyJsonlDataset, evenly_spaced
from coordexp.data.prompt import PromptSpec
from coordexp.data.synthetic import generate_records
from coordexp.errors import ConfigError, LearnerError


def jsonl_cfg(path, *overrides, leaf="smoke/ab_mixed"):
    return to_train_config(compose([f"+experiment={leaf}", "rollout=hf", "data=jsonl",
                                    f"data.train_jsonl={path}", "model.tiny_stage1_steps=0", *overrides]))


@pytest.fixture
def text_encoders(tiny_model_dir):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.rollout.scoring import TokenizerAdapter

    _model, tokenizer, prompts = load_model_and_prompts(tiny_model_dir, "float32")
    return prompts, TokenizerAdapter(tokenizer)


@pytest.fixture(scope="module")
def vl_encoders(tmp_path_factory):
    from coordexp.models.prompts import load_model_and_prompts
    from coordexp.models.tiny import ensure_tiny_model
    from coordexp.rollout.scoring import TokenizerAdapter

    path = ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model-cache", arch="qwen2_vl")
    _model, tokenizer, prompts = load_model_and_prompts(path, "float32")
    return prompts, TokenizerAdapter(tokenizer)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class Reads:
    """Records which record indices a LazyJsonlDataset parses (and with which image check)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, bool | None]] = []
        get = LazyJsonlDataset.get

        def counting(ds, i, *, check_images=None):
            self.calls.append((i, check_images))
            return get(ds, i, check_images=check_images)

        monkeypatch.setattr(LazyJsonlDataset, "get", counting)


def test_lazy_training_data_gives_the_eager_samples_and_reads_nothing_up_front(tmp_path, monkeypatch,
                                                                              text_encoders):
    from coordexp.trainer.learner import check_train_shard, load_samples

    path = write(tmp_path / "train.jsonl", generate_records(40, 3))
    cfg = jsonl_cfg(path, "data.system_prompt=sys", "data.object_field_order=geometry_first")
    reads = Reads(monkeypatch)
    train, val = load_samples(cfg, tmp_path)
    assert isinstance(train, LazyJsonlDataset) and val == [] and reads.calls == []
    eager = list(load_jsonl(path, PromptSpec(object_field_order="geometry_first", system_prompt="sys")))
    assert list(train) == eager  # index, source (file:line), objects, prompt messages
    prompts, adapter = text_encoders
    assert check_train_shard(cfg, prompts, adapter, train) is train  # image_check: all -> the dataset itself


def test_a_rank_reads_only_its_share(tmp_path, monkeypatch, text_encoders):
    from coordexp.trainer.learner import check_train_shard

    path = write(tmp_path / "train.jsonl", generate_records(50, 4))
    cfg = jsonl_cfg(path)
    prompts, adapter = text_encoders
    for rank in range(3):
        reads = Reads(monkeypatch)
        check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()), rank, 3)
        assert reads.calls == [(i, True) for i in range(rank, 50, 3)]


def test_a_bad_line_far_down_fails_with_its_file_line(tmp_path, text_encoders):
    from coordexp.trainer.learner import check_train_shard

    lines = [json.dumps(r) for r in generate_records(30_000, 5)]
    lines[29_990] = '{"width": 10, "height": 10, "objects": [{"desc": "a", "bbox_2d": [1, 2, 3]}]}'
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = jsonl_cfg(path)
    prompts, adapter = text_encoders
    expected = f"{path}:29991: objects[0]: bbox_2d must have 4 values [x1, y1, x2, y2], got 3"
    with pytest.raises(LearnerError) as err:
        check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()))
    assert str(err.value) == expected
    # the rank whose share holds the record (index 29990: rank 0 of 2) reports it; the other share is clean
    check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()), 1, 2)
    with pytest.raises(LearnerError) as err:
        check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()), 0, 2)
    assert str(err.value) == expected


def test_too_long_records_are_refused_as_on_the_eager_path(tmp_path, text_encoders):
    from coordexp.trainer.learner import check_sample_lengths, check_train_shard

    records = generate_records(6, 7)
    records[4]["objects"][0]["desc"] = "x" * 20_000
    path = write(tmp_path / "train.jsonl", records)
    cfg = jsonl_cfg(path)
    prompts, adapter = text_encoders
    with pytest.raises(LearnerError) as eager:
        check_sample_lengths(cfg, prompts, adapter, list(load_jsonl(path)))
    with pytest.raises(LearnerError) as lazy:
        check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()))
    assert str(lazy.value) == str(eager.value)
    assert str(lazy.value).splitlines()[1].startswith(f"{path}:5: ")


def test_image_check_sample_checks_exactly_n_records_up_front_and_the_rest_on_read(tmp_path, monkeypatch,
                                                                                  vl_encoders):
    from coordexp.data.synthetic_images import write_synthetic_image_jsonl
    from coordexp.trainer.learner import ImageCheckedOnRead, check_train_shard

    path = write_synthetic_image_jsonl(tmp_path / "train.jsonl", 12, seed=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[5]["width"] += 28  # not among the 4 sampled records (0, 4, 7, 11): its image no longer fits
    write(path, records)
    prompts, adapter = vl_encoders
    checked: list[str] = []
    check = prompts.check
    monkeypatch.setattr(prompts, "check", lambda samples: checked.extend(s.source for s in samples)
                        or check(samples))
    opened: list[str] = []
    from PIL import Image

    image_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or image_open(p, *a, **k))
    cfg = jsonl_cfg(path, "data.image_check=sample", "data.image_check_samples=4", leaf="smoke/ab_mixed_vl")
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    picked = [f"{path}:{i + 1}" for i in (0, 4, 7, 11)]
    shares = [check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()), rank, 2)
              for rank in range(2)]
    assert sorted(checked) == sorted(picked) and len(opened) == 4  # 4 records, one image each
    assert all(isinstance(s, ImageCheckedOnRead) and len(s) == 12 for s in shares)
    assert shares[0][4].source == f"{path}:5"
    with pytest.raises(LearnerError, match=f"{path}:6: "):
        shares[0][5]  # checked when the trainer reads it
    checked.clear()
    cfg_all = jsonl_cfg(path, leaf="smoke/ab_mixed_vl")
    with pytest.raises(LearnerError, match=f"1 image\\(s\\) do not match .*\n  {path}:6: "):
        check_train_shard(cfg_all, prompts, adapter, LazyJsonlDataset(path, PromptSpec()))
    assert len(checked) == 12


def test_image_check_samples_must_be_positive(tmp_path):
    with pytest.raises(ConfigError) as err:
        jsonl_cfg(tmp_path / "t.jsonl", "data.image_check=sample", "data.image_check_samples=0")
    assert "data.image_check_samples: 0: must be >= 1 (data.image_check: all checks every record)" in \
        err.value.problems


def test_bad_records_and_a_wrong_image_size_are_reported_together(tmp_path, vl_encoders):
    """A file with a broken record and a record whose image the processor resizes to another size: one
    report with both (it took two runs before)."""
    from coordexp.data.synthetic_images import write_synthetic_image_jsonl
    from coordexp.trainer.learner import check_train_shard

    path = write_synthetic_image_jsonl(tmp_path / "train.jsonl", 6, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["objects"][0]["bbox_2d"] = [1, 2, 3]
    records[4]["width"] += 28
    write(path, records)
    prompts, adapter = vl_encoders
    cfg = jsonl_cfg(path, leaf="smoke/ab_mixed_vl")
    with pytest.raises(LearnerError) as err:
        check_train_shard(cfg, prompts, adapter, LazyJsonlDataset(path, PromptSpec()))
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}:2: objects[0]: bbox_2d must have 4 values [x1, y1, x2, y2], got 3"
    assert lines[1].startswith("1 image(s) do not match their record's width/height after the processor's")
    assert lines[2].startswith(f"  {path}:5: ")

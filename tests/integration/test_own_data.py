"""docs/own_data.md end to end on CPU: a COCO fixture -> convert (pre-resize for the tiny VLM's processor) ->
inspect -> a checkpoint without coordinate tokens (refused, then fixed by add_coord_tokens) -> a few
Stage-2 steps with the smoke/ab_mixed_vl settings -> coordexp.eval with a COCO results export."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys

import pytest
from checkpoint_fixture import strip_coord_tokens
from coco_fixture import write_coco

from coordexp.models.tiny import ensure_tiny_model
from tests.conftest import REPO_ROOT, read_jsonl

pytestmark = pytest.mark.slow

SHORT = ["training.max_steps=4", "training.eval_steps=2", "training.save_steps=4",
         "training.effective_batch_size=2", "training.per_device_train_batch_size=2",
         "rollout_matching.decode_batch_size=2", "rollout_matching.max_new_tokens=32"]


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    instances, images = write_coco(root / "coco")
    out = _run("coordexp.data.convert", "coco", "--instances", str(instances), "--images", str(images),
               "--out", str(root / "data"), "--name", "train", "--resize", "qwen2_vl", "--min-pixels", "3136",
               "--max-pixels", "50176", "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert "2 of 4 images (1 without annotations, 1 with every box dropped), 5 of 8 boxes" in out.stdout
    return root


@pytest.fixture(scope="module")
def checkpoint(converted):
    bare, _ = strip_coord_tokens(ensure_tiny_model(converted / "models", arch="qwen2_vl"), converted / "bare")
    return bare


def _data(root):
    return ["data=jsonl", f"data.train_jsonl={root / 'data' / 'train.jsonl'}",
            f"data.val_jsonl={root / 'data' / 'train.jsonl'}"]


def test_inspect_the_converted_set(converted):
    out = _run("coordexp.data.inspect", str(converted / "data" / "train.jsonl"), "--out",
               str(converted / "inspect"))
    assert out.returncode == 0, out.stderr
    stats = json.loads((converted / "inspect" / "stats.json").read_text())
    assert stats["records"] == 2 and stats["image_sizes"] == {"168x252": 1, "252x168": 1}


def test_tiny_vlm_trains_on_the_converted_set(converted):
    run = converted / "run_tiny"
    out = _run("coordexp.train", "+experiment=smoke/ab_mixed_vl", "model.tiny_stage1_steps=0",
               *_data(converted), *SHORT, f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4 and any(r["stage2/channel_b"] == 1.0 for r in rows)
    assert all(r["rollout/raw_rollouts"] == 2 for r in rows if r["stage2/channel_b"] == 1.0)
    # the summary's eval command, as printed, evaluates the run's own held-out split
    summary = (run / "summary.txt").read_text().splitlines()
    (line,) = [ln for ln in summary if ln.strip().startswith("evaluate:")]
    command = shlex.split(line.split("evaluate:", 1)[1])
    assert command[:3] == ["python", "-m", "coordexp.eval"]
    out = _run(*command[2:], f"hydra.run.dir={converted / 'eval_from_summary'}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((converted / "eval_from_summary" / "eval_report.json").read_text())
    assert report["split"] == {"path": str(converted / "data" / "train.jsonl"), "samples": 2}


def test_checkpoint_without_coord_tokens_is_refused_then_fixed(converted, checkpoint):
    refused = _run("coordexp.train", "+experiment=smoke/ab_mixed_vl", "model=local",
                   f"model.path={checkpoint}", *_data(converted), *SHORT,
                   f"hydra.run.dir={converted / 'run_refused'}")
    assert refused.returncode == 2
    assert "python -m coordexp.models.add_coord_tokens --src" in refused.stderr
    assert "Traceback" not in refused.stderr

    fixed = converted / "with_coords"
    out = _run("coordexp.models.add_coord_tokens", "--src", str(checkpoint), "--dst", str(fixed))
    assert out.returncode == 0 and out.stdout.startswith("added 1000 coordinate tokens"), out.stderr
    assert "Loading weights" not in out.stderr and "\r" not in out.stderr  # no bar redraws off a terminal
    again = _run("coordexp.models.add_coord_tokens", "--src", str(fixed), "--dst", str(converted / "again"))
    assert again.returncode == 0 and "nothing to do" in again.stdout

    run = converted / "run_local"
    out = _run("coordexp.train", "+experiment=smoke/ab_mixed_vl", "model=local", f"model.path={fixed}",
               *_data(converted), *SHORT, f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len([r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]) == 4

    # coordexp.eval with the COCO results export, scored by pycocotools against the converted ground truth
    results = converted / "coco_results.json"
    out = _run("coordexp.eval", "+experiment=smoke/ab_mixed_vl", "model=local",
               f"model.path={run / 'checkpoint-4'}", *_data(converted), f"hydra.run.dir={converted / 'eval'}",
               "rollout_matching.max_new_tokens=32", "--coco-results", str(results))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"coco results: {results}" in out.stdout
    report = json.loads((converted / "eval" / "eval_report.json").read_text())
    exported = json.loads(results.read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in exported)
    if exported:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        from coordexp.data.jsonl import load_jsonl
        from coordexp.evaluation.coco_export import coco_ground_truth, load_category_map

        samples = list(load_jsonl(converted / "data" / "train.jsonl"))
        categories = load_category_map(converted / "data" / "train.categories.json")
        gt_dataset = coco_ground_truth(samples, categories)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_dataset
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(exported), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(report["coco"]["by_desc"]["score_constant"]["AP"], abs=1e-9)

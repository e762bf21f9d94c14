"""A real 2-process torchrun (gloo, CPU) learner: every logged metric equals the value recomputed in
one process from both ranks' per-sample records (sum, ratio of sums, p99-max, max rules)."""

import json
import subprocess
import sys
from collections import defaultdict

import pytest

from coordexp.telemetry.metrics import percentile
from tests.conftest import REPO_ROOT, read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", "rollout=hf",
           f"hydra.run.dir={run_dir}",
           "model.tiny_stage1_steps=0", "training.nproc_per_node=2", "training.per_device_train_batch_size=4",
           "training.effective_batch_size=16",
           "training.max_steps=3", "training.eval_strategy=no", "training.save_strategy=no",
           "stage2_ab.schedule.b_ratio=0.5", "rollout_matching.decode_batch_size=2",
           "rollout_matching.max_new_tokens=48", "data.synthetic.train_samples=64",
           "data.synthetic.val_samples=4"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


def test_ranks_saw_different_data(ddp_run):
    ids = [{r["sample_id"] for r in read_jsonl(ddp_run / f"rollout_samples.rank{rank}.jsonl")}
           for rank in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_logged_metrics_equal_the_union_of_both_ranks(ddp_run):
    metrics = {row["step"]: row for row in read_jsonl(ddp_run / "metrics.jsonl") if "loss" in row}
    per_step = defaultdict(lambda: {0: [], 1: []})
    for rank in (0, 1):
        for rec in read_jsonl(ddp_run / f"rollout_samples.rank{rank}.jsonl"):
            per_step[rec["step"]][rank].append(rec)  # the step's number in metrics.jsonl
    b_steps = sorted(per_step)
    assert b_steps == [2], "b_ratio 0.5 over 3 steps: Channel B only at step index 1"
    assert [metrics[s]["stage2/channel_b"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    for step in b_steps:
        logged = metrics[step]
        both = per_step[step][0] + per_step[step][1]
        total = lambda key, both=both: sum(r[key] for r in both)
        assert len(per_step[step][0]) == len(per_step[step][1]) == 8  # 2 micro-steps x 4 per rank
        assert logged["rollout/raw_rollouts"] == 16  # sum
        assert logged["rollout/gen_new_tokens_total"] == total("gen_tokens")
        assert logged["rollout/repeat_terminate_triggered_sequences"] == total("triggered")
        assert logged["rollout/parse_dropped_invalid"] == total("dropped_invalid")
        assert logged["rollout/gt_objects"] == total("gt")
        assert (logged["rollout/parse_truncated_rate"]
                == pytest.approx(total("truncated") / 16))  # ratio of sums
        pred, gt, matched = total("valid_pred"), total("gt"), total("matched")
        assert logged["rollout/f1"] == pytest.approx(2 * matched / (pred + gt) if pred + gt else 0.0)
        rank_p99 = [percentile([r["gen_tokens"] for r in per_step[step][rank]], 99) for rank in (0, 1)]
        assert logged["rollout/gen_new_tokens_p99"] == pytest.approx(max(rank_p99))  # max of rank-local p99
        assert logged["rollout/repeat_terminate_active"] == 1.0  # max
    for step, row in metrics.items():
        assert row["train/samples"] == 16  # sum over 2 ranks x 2 micro-steps x 4


def test_run_artifacts(ddp_run):
    assert (ddp_run / "run_metadata.json").is_file()
    assert list((ddp_run / "tb").glob("events.out.tfevents.*")), "TensorBoard events from rank 0"
    meta = json.loads((ddp_run / "run_metadata.json").read_text())
    assert meta["experiment"] == "smoke/ab_mixed" and meta["versions"]["torch"].startswith("2.13.0")


def test_packed_soft_context_steps_under_ddp(tmp_path):
    """Soft self-context passes and packing (several packs, intermediate ones under no_sync) in a real
    2-rank gloo group: every step trains, and packing/* are global sums over both ranks."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", "rollout=hf",
           f"hydra.run.dir={run_dir}", "model.tiny_stage1_steps=0", "training.nproc_per_node=2",
           "training.per_device_train_batch_size=2", "training.effective_batch_size=8",
           "training.packing=true", "training.packing_length=300", "stage2_ab.n_softctx_iter=2",
           "training.max_steps=2", "training.eval_strategy=no", "training.save_strategy=no",
           "stage2_ab.schedule.b_ratio=0.5", "rollout_matching.decode_batch_size=2",
           "rollout_matching.max_new_tokens=32", "data.synthetic.train_samples=32",
           "data.synthetic.val_samples=4"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # a text model uses every parameter in every step: DDP runs without the unused-parameter search
    assert "find_unused_parameters=True was specified" not in out.stderr
    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert [rows[s]["stage2/channel_b"] for s in (1, 2)] == [0.0, 1.0]
    for step in (1, 2):
        assert rows[step]["packing/segments"] == 8  # 4 samples per rank, summed over both ranks
        assert rows[step]["packing/packs"] >= 4  # 300-token packs: more than one pack per rank
        assert 0 < rows[step]["packing/fill"] <= 1
        assert rows[step]["loss"] == pytest.approx(rows[step]["loss/total"], rel=1e-4)

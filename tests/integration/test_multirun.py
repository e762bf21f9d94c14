"""Hydra multirun over b_ratio: every job validates, trains and writes into its own output dir."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_sweep_over_b_ratio_gives_one_run_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "coordexp.train", "-m", "+experiment=smoke/ab_mixed", "rollout=hf",
           "stage2_ab.schedule.b_ratio=0.25,0.5", f"hydra.sweep.dir={sweep}", "model.tiny_stage1_steps=0",
           "training.max_steps=2", "training.eval_strategy=no", "training.save_strategy=no",
           "rollout_matching.max_new_tokens=16", "data.synthetic.train_samples=32"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = {}
    for job in ("0", "1"):
        cfg = yaml.safe_load((sweep / job / "resolved_config.yaml").read_text())
        assert cfg["training"]["output_dir"] == str(sweep / job)
        assert (sweep / job / "metrics.jsonl").is_file() and (sweep / job / "run_metadata.json").is_file()
        ratios[job] = cfg["stage2_ab"]["schedule"]["b_ratio"]
    assert ratios == {"0": 0.25, "1": 0.5}

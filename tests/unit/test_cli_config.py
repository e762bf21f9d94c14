"""The config CLIs as a user runs them: exit codes, one-screen messages, JSON, --cfg job."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT


def run(module: str, *args: str, cwd=REPO_ROOT, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *(["-X", "importtime"] if module.endswith("train") else []),
                           "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


def test_preflight_prints_the_launcher_contract_from_any_cwd(tmp_path):
    out = run("coordexp.preflight", "+experiment=smoke/ab_mixed", "rollout=vllm_server", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    contract = json.loads(out.stdout)
    assert contract["rollout_backend"] == "vllm"
    assert contract["vllm_mode"] == "server"
    assert contract["server_base_urls"] == ["http://127.0.0.1:8000"]
    assert contract["experiment"] == "smoke/ab_mixed"


def test_preflight_hf_backend_has_no_server():
    contract = json.loads(run("coordexp.preflight", "+experiment=smoke/a_only", "rollout=hf").stdout)
    assert ((contract["rollout_backend"], contract["vllm_mode"], contract["server_base_urls"])
            == ("hf", None, []))


@pytest.mark.parametrize("module", ["coordexp.preflight", "coordexp.train"])
@pytest.mark.parametrize("args,needle", [
    ((), "no experiment selected: add +experiment=<name>"),
    (("+experiment=smoke/ab_mixed", "stage2_ab.schedule.pattern=AB"),
     "stage2_ab.schedule.pattern: legacy key: use stage2_ab.schedule.b_ratio (float in [0,1])"),
    (("+experiment=smoke/ab_mixed", "rollout=vllm_server", "vllm.server.base_urls=[]",
      "stage2_ab.schedule.b_ratio=2"),
     "Invalid coordexp config (2 problems):\n  - stage2_ab.schedule.b_ratio: 2.0 is outside [0, 1]\n"
     "  - vllm.server.base_urls: server mode needs at least one URL"),
])
def test_bad_config_exits_non_zero_with_one_screen_and_no_traceback(module, args, needle):
    out = run(module, *args)
    assert out.returncode == 2
    stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("import time:"))
    assert needle in stderr
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) <= 12


def test_cfg_job_prints_complete_resolved_config_without_heavy_imports():
    out = run("coordexp.train", "+experiment=ab_mixed", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["stage2_ab"]["schedule"]["b_ratio"] == 0.85
    assert cfg["training"]["output_dir"].startswith("runs/ab_mixed/")
    assert cfg["training"]["logging_dir"] == cfg["training"]["output_dir"] + "/tb"
    assert "${" not in out.stdout
    assert set(cfg) == {"experiment", "seed", "model", "data", "training", "stage2_ab", "rollout_matching",
                        "vllm", "extra"}
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    # nor numpy (the coordjson parser) or tqdm: bench_config_compose.py, docs/benchmarks.md
    assert not imported & {"torch", "vllm", "swift", "transformers", "numpy", "tqdm"}


def test_two_leaves_diff_on_their_knobs():
    a = yaml.safe_load(run("coordexp.train", "+experiment=a_only", "--cfg", "job").stdout)
    b = yaml.safe_load(run("coordexp.train", "+experiment=ab_mixed", "--cfg", "job").stdout)
    assert a["stage2_ab"]["schedule"]["b_ratio"] == 0.0 and b["stage2_ab"]["schedule"]["b_ratio"] == 0.85
    assert (a["training"]["effective_batch_size"], b["training"]["effective_batch_size"]) == (64, 56)

"""Preflight reports a GPU plan the machine cannot run (issue 17, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys

from coordexp.config.gpus import gpu_plan, visible_gpus
from coordexp.config.load import compose, to_train_config
from tests.conftest import REPO_ROOT


def test_visible_gpus_counts_the_driver_within_cuda_visible_devices(tmp_path):
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (proc / bus).mkdir(parents=True)
    assert visible_gpus({}, proc) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,2"}, proc) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, proc) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, proc) == 1
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4"}, proc) == 3


def test_the_plan_counts_server_and_learner_gpus():
    prod = to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt"]))
    assert gpu_plan(prod, visible=8) == {"needed": 8, "visible": 8, "satisfiable": True,
                                         "server_gpus": [0, 1, 2, 3, 4, 5], "learner_gpus": [6, 7]}
    assert gpu_plan(prod, visible=4)["satisfiable"] is False
    reused = to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt",
                                      "vllm.server.reuse_existing=true"]))
    assert gpu_plan(reused, visible=2) == {"needed": 2, "visible": 2, "satisfiable": True,
                                           "server_gpus": [], "learner_gpus": [6, 7]}
    smoke = to_train_config(compose(["+experiment=smoke/ab_mixed"]))
    assert gpu_plan(smoke, visible=0)["needed"] == 0


def test_preflight_on_a_machine_without_the_gpus_says_so():
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the host has
    cmd = [sys.executable, "-m", "coordexp.preflight", "+experiment=ab_mixed", "model.path=/ckpt"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gpu_plan"] == {"needed": 8, "visible": 0, "satisfiable": False,
                                                  "server_gpus": [0, 1, 2, 3, 4, 5], "learner_gpus": [6, 7]}
    plan_warning, gpu_warning = out.stderr.splitlines()  # no checkpoint here: no memory plan, said so
    assert plan_warning == ("warning: no memory plan: model.path '/ckpt' has no config.json: the memory plan "
                            "counts parameters from it (pass model.path=<local checkpoint dir>)")
    assert gpu_warning + "\n" == (
        "warning: +experiment=ab_mixed needs 8 GPUs (vllm.server_gpus [0, 1, 2, 3, 4, 5], vllm.learner_gpus "
        "[6, 7]; vllm.device: cuda) and this machine shows 0: run it on a node with 8 GPUs, or on a CPU use "
        "a smoke/* leaf (docs/quickstart.md; your own data on a CPU: docs/own_data.md)\n")


def test_a_smoke_leaf_pointed_at_gpus_is_told_to_drop_vllm_gpu():
    from coordexp.config.gpus import gpu_plan_problem

    plan = {"satisfiable": False, "needed": 2, "visible": 0, "server_gpus": [0], "learner_gpus": [1]}
    assert gpu_plan_problem(plan, "smoke/ab_mixed").endswith(
        "run it on a node with 2 GPUs, or on a CPU drop vllm=gpu (a smoke leaf's server runs on the CPU)")

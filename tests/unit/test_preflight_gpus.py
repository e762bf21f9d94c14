"""Preflight reports a GPU plan the machine cannot run (issue 17, item 5)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_the_plan_counts_server_and_learner_gpus(monkeypatch):
    monkeypatch.setenv("COORDEXP_SERVER_API_KEY", "k")  # the two-node servers bind 0.0.0.0
    prod = to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt"]))
    assert gpu_plan(prod, visible=8) == {"needed": 8, "visible": 8, "satisfiable": True,
                                         "server_gpus": [0, 1, 2, 3, 4, 5], "learner_gpus": [6, 7]}
    assert gpu_plan(prod, visible=4)["satisfiable"] is False
    reused = to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt",
                                      "vllm.server.reuse_existing=true"]))
    # GPU ids index the visible GPUs: learner GPUs 6 and 7 need 8 of them, not 2
    assert gpu_plan(reused, visible=2) == {"needed": 8, "visible": 2, "satisfiable": False,
                                           "server_gpus": [], "learner_gpus": [6, 7]}
    two_nodes = ["+experiment=ab_mixed", "model.path=/ckpt", "training.nnodes=2",
                 "training.rdzv_endpoint=n0:29400", "vllm.server.host=0.0.0.0", "vllm.server.base_urls=[http://n0:8000]",
                 "vllm.server_gpus=[0,1,2,3,4,5]", "vllm.learner_gpus=[6,7]"]
    node0, node1 = (to_train_config(compose([*two_nodes, f"training.node_rank={rank}"])) for rank in (0, 1))
    assert gpu_plan(node0, visible=8)["server_gpus"] == [0, 1, 2, 3, 4, 5]
    assert gpu_plan(node1, visible=8)["server_gpus"] == []  # node 1 starts no server
    smoke = to_train_config(compose(["+experiment=smoke/ab_mixed"]))
    assert gpu_plan(smoke, visible=0)["needed"] == 0


def test_preflight_on_a_machine_without_the_gpus_says_so():
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the host has
    cmd = [sys.executable, "-m", "coordexp.preflight", "+experiment=ab_mixed", "model.path=/ckpt"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gpu_plan"] == {"needed": 8, "visible": 0, "satisfiable": False,
                                                  "server_gpus": [0, 1, 2, 3, 4, 5], "learner_gpus": [6, 7]}
    # no checkpoint here: no memory plan, said so; the leaf's data is the synthetic task, said so
    plan_warning, data_warning, gpu_warning = out.stderr.splitlines()
    assert data_warning.startswith("warning: the checkpoint /ckpt trains on the built-in synthetic task")
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


def _problems(*overrides: str) -> list[str]:
    from coordexp.config.errors import ConfigError

    try:
        to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt", *overrides]))
    except ConfigError as err:
        return err.problems
    return []


def test_gpu_lists_name_each_gpu_once_and_non_negative():
    assert "vllm.learner_gpus: [4, 4, 5, 6]: GPU(s) [4] appear more than once; one process (server worker " \
           "or learner rank) per GPU" in _problems("vllm.learner_gpus=[4,4,5,6]", "training.nproc_per_node=4")
    assert "vllm.server_gpus: [0, 0, 1, 1, 2, 2]: GPU(s) [0, 1, 2] appear more than once; one process " \
           "(server worker or learner rank) per GPU" in _problems("vllm.server_gpus=[0,0,1,1,2,2]")
    assert ("vllm.learner_gpus: [6, -7]: GPU ids are >= 0 (a negative id in CUDA_VISIBLE_DEVICES hides every "
            "GPU after it)") in _problems("vllm.learner_gpus=[6,-7]")
    assert not [p for p in _problems() if "GPU" in p]


def test_urls_the_servers_cannot_answer_are_refused(monkeypatch):
    monkeypatch.setenv("COORDEXP_SERVER_API_KEY", "k")
    assert ("vllm.server.base_urls[0]: 'http://127.0.0.1:8000/v1' has a path; a base URL is "
            "http(s)://host:port only (the client adds the routes: /infer/, /health/, ...)") in _problems(
        "vllm.server.base_urls=[http://127.0.0.1:8000/v1]")
    assert not _problems("vllm.server.base_urls=[http://127.0.0.1:8000/]")  # a trailing slash is no path
    far = _problems("vllm.server.base_urls=[http://node0.cluster:8000]")
    assert far == ["vllm.server.base_urls: http://node0.cluster:8000 is not a loopback address, but the "
                   "servers the launcher starts bind vllm.server.host=127.0.0.1, so nothing answers there: "
                   "set vllm.server.host=0.0.0.0 (with an API key), or use http://127.0.0.1:<port>"]
    assert not _problems("vllm.server.base_urls=[http://node0.cluster:8000]", "vllm.server.host=0.0.0.0")
    # servers someone else started: the launcher binds nothing
    assert not _problems("vllm.server.base_urls=[http://node0.cluster:8000]",
                         "vllm.server.reuse_existing=true")


def test_loopback_across_nodes_is_a_warning(monkeypatch):
    """Several nodes on one machine (tests/integration/test_multinode.py) use loopback on purpose; on a
    cluster it cannot work, so it is said, not refused."""
    from coordexp.config.validate import config_warnings

    monkeypatch.setenv("COORDEXP_SERVER_API_KEY", "k")
    common = ["+experiment=ab_mixed", "model.path=/ckpt", "data=jsonl", "data.train_jsonl=/d.jsonl",
              "training.nnodes=2", "training.node_rank=1"]
    cfg = to_train_config(compose([*common, "training.rdzv_endpoint=127.0.0.1:29400"]))
    assert config_warnings(cfg) == [
        "training.rdzv_endpoint 127.0.0.1:29400 and vllm.server.base_urls http://127.0.0.1:8000: loopback, "
        "which only nodes on this machine reach; on a cluster name node 0 by a hostname or address every "
        "node resolves (node0.cluster)"]
    cluster = to_train_config(compose([*common, "training.rdzv_endpoint=node0.cluster:29400",
                                       "vllm.server.host=0.0.0.0",
                                       "vllm.server.base_urls=[http://node0.cluster:8000]"]))
    assert config_warnings(cluster) == []


def test_train_refuses_a_gpu_plan_this_machine_cannot_run(tmp_path):
    """The preflight only warns (it may run on a login node); the run stops before any server starts."""
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=ab_mixed", "model.path=/ckpt",
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert ("  - vllm.device: +experiment=ab_mixed needs 8 GPUs (vllm.server_gpus [0, 1, 2, 3, 4, 5], "
            "vllm.learner_gpus [6, 7]; vllm.device: cuda) and this machine shows 0") in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "server").exists()


def test_the_contract_lists_gpus_only_where_they_apply():
    from coordexp.preflight import preflight

    hf = preflight(to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt", "rollout=hf"])))
    assert (hf["server_gpus"], hf["learner_gpus"], hf["gpu_plan"]["needed"]) == ([], [], 0)
    server = preflight(to_train_config(compose(["+experiment=ab_mixed", "model.path=/ckpt"])))
    assert (server["server_gpus"], server["learner_gpus"]) == ([0, 1, 2, 3, 4, 5], [6, 7])


def test_a_sweep_run_elsewhere_is_not_held_to_this_machines_gpus(tmp_path, monkeypatch):
    """A Slurm sweep (hydra/launcher=submitit_slurm) is started on a login node without GPUs: its jobs get
    theirs on the compute nodes, so only a sweep that runs here is checked against this machine."""
    from coordexp.config.errors import ConfigError
    from coordexp.config.load import check_before_start, runs_here

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever the host has
    remote = "hydra.launcher._target_=hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    sweep = ["+experiment=ab_mixed", "model.path=/ckpt", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             "stage2_ab.schedule.b_ratio=0.25,0.5"]
    assert runs_here(compose([*sweep[:2], remote]), multirun=True) is False
    assert runs_here(compose(sweep[:2]), multirun=True) is True and runs_here(compose(sweep[:2]), False)
    # coordexp's own launcher (launchers/hydra_plugins) runs its jobs here too: its _target_ is listed
    assert runs_here(compose([*sweep[:2], "hydra/launcher=coordexp"]), multirun=True) is True
    check_before_start([*sweep, remote], multirun=True)  # the login node: nothing to refuse
    with pytest.raises(ConfigError) as err:
        check_before_start(sweep, multirun=True)  # the basic launcher runs the jobs here
    assert err.value.problems[0].startswith("vllm.device: +experiment=ab_mixed needs 8 GPUs")

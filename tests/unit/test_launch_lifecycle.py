"""Orchestrator pieces without servers: timeline, server identity for sweep sharing, the sweep pool,
learner GPU env, process-group teardown, model-dir errors."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from coordexp.config.load import compose, to_train_config
from coordexp.launch import run, servers


def cfg_of(*overrides):
    return to_train_config(compose(["+experiment=smoke/ab_mixed", "rollout=vllm_server", *overrides]))


def test_timeline_phases_are_gaps_between_marks():
    tl = run.Timeline(start=100.0)
    tl.mark("config", at=101.5)
    tl.mark("server_health", at=160.0)
    tl.mark("end", at=170.25)
    d = tl.to_dict()
    assert d["phases_s"] == {"config": 1.5, "server_health": 58.5, "end": 10.25}
    assert d["marks"]["end"] == 170.25
    assert run.process_start_epoch() <= time.time()


def test_server_key_ignores_learner_side_settings_and_tracks_server_ones(tmp_path):
    base = servers.server_key(cfg_of(), tmp_path)
    same = [
        ("training.learning_rate=0.1",),
        ("rollout_matching.max_new_tokens=7",),
        ("vllm.sync.timeout_s=9",),
        ("vllm.server.infer_timeout_s=3",),
        ("seed=3",),
    ]
    for o in same:
        assert servers.server_key(cfg_of(*o), tmp_path) == base, o
    differ = [
        ("vllm.max_model_len=777",),
        ("rollout_matching.repeat_terminate.min_new_tokens=3",),
        ("vllm.server.base_urls=[http://127.0.0.1:9001]",),
        ("vllm.cpu_kvcache_space_gib=2",),
    ]
    for o in differ:
        assert servers.server_key(cfg_of(*o), tmp_path) != base, o
    assert servers.server_key(cfg_of(), tmp_path / "other") != base


def test_learner_env_gets_the_learner_gpus_only_on_gpu():
    gpu = cfg_of("vllm=gpu", "training.nproc_per_node=2", "training.effective_batch_size=32")
    assert run.learner_env(gpu) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert run.learner_env(cfg_of("rollout=hf")) == {}


def test_only_one_unsharded_process_on_one_node_trains_in_process():
    assert run.learner_in_process(cfg_of("rollout=hf"))
    assert not run.learner_in_process(cfg_of("rollout=hf", "training.nproc_per_node=2",
                                             "training.effective_batch_size=32"))
    # FSDP needs a process group even on one GPU: the Trainer refuses it outside distributed training
    one_gpu_fsdp = cfg_of("vllm=gpu", "vllm.learner_gpus=[7]", "training.fsdp=true")
    assert one_gpu_fsdp.training.nproc_per_node == 1 and not run.learner_in_process(one_gpu_fsdp)
    cmd = run.learner_command(one_gpu_fsdp, "/run/resolved_config.yaml")
    assert cmd[2:5] == ["coordexp.launch.quiet_torchrun", "--standalone", "--nproc_per_node=1"]


def test_a_learner_next_to_a_cpu_server_keeps_openmps_default_wait_policy():
    """Passive OpenMP threads made the learner's Channel-B forward 1.4x slower next to a CPU server
    (tests/benchmarks/bench_server_learner.py, docs/benchmarks.md); the server's worker sleeps between
    requests instead (coordexp.launch.server_spec.cpu_server_env)."""
    assert run.learner_env(cfg_of()) == {}


class FakeSet:
    def __init__(self, key):
        self.key, self.stopped, self.ok = key, False, True
        self.servers = [type("S", (), {"base_url": "http://x:1"})()]

    def healthy(self):
        return self.ok

    def stop(self):
        self.stopped = True


def test_pool_keeps_equal_servers_restarts_on_change_failure_or_sickness(monkeypatch, tmp_path):
    monkeypatch.setattr(servers, "server_key", lambda cfg, model_dir: cfg)  # the "config" is the key here
    monkeypatch.setattr(servers.ServerSet, "start",
                        classmethod(lambda cls, cfg, md, rd, rid, weights_root=None: FakeSet(cfg)))
    pool = servers.ServerPool()
    s1, fresh1 = pool.acquire("A", tmp_path, tmp_path, "r1")  # start
    s2, fresh2 = pool.acquire("A", tmp_path, tmp_path, "r2")  # same settings: keep
    assert s1 is s2 and (fresh1, fresh2) == (True, False) and not s1.stopped
    s3, fresh3 = pool.acquire("B", tmp_path, tmp_path, "r3")  # changed: restart
    assert s1.stopped and s3 is not s1 and fresh3
    pool.release(ok=False)  # a failed job: stop it
    assert s3.stopped and pool.current is None
    s4, _ = pool.acquire("B", tmp_path, tmp_path, "r4")  # fresh start
    s4.ok = False
    s5, fresh5 = pool.acquire("B", tmp_path, tmp_path, "r5")  # unhealthy: restart although the key matches
    assert s4.stopped and fresh5 and s5 is not s4
    pool.close()
    assert s5.stopped and pool.current is None


def test_shared_servers_context_installs_and_closes_the_pool():
    assert servers.current_pool() is None
    with servers.shared_servers() as pool:
        assert servers.current_pool() is pool
        fake = FakeSet("k")
        pool.current = fake
    assert servers.current_pool() is None and fake.stopped


def test_stop_group_kills_grandchildren():
    proc = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    time.sleep(0.3)
    run.stop_group(proc, timeout_s=5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_stop_group_escalates_to_kill():
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait; sleep 300"], start_new_session=True)
    time.sleep(0.3)
    t0 = time.monotonic()
    run.stop_group(proc, timeout_s=1)
    assert time.monotonic() - t0 < 10 and proc.poll() == -signal.SIGKILL


def test_missing_local_checkpoint_is_a_launch_error():
    cfg = to_train_config(
        compose(
            ["+experiment=smoke/ab_mixed", "model=local", "model.path=/no/such/ckpt", "model.dtype=float32"]
        )
    )
    with pytest.raises(
        servers.LaunchError, match="'/no/such/ckpt' is not a checkpoint directory.*nothing was started"
    ):
        servers.resolve_model_dir(cfg)


def test_a_cpu_server_runs_vllm_in_process_with_sleeping_openmp_threads(tmp_path):
    """The server shares the learner's cores: vLLM's engine runs in the server process (no EngineCore and
    Worker processes spinning on the queue between them), on one thread fewer than its cores, and its OpenMP
    threads do not spin after a parallel region (the learner's Channel-B forward right after the rollouts ran
    24x slower in the issue's measurement); a value the user exported wins, and a GPU server is left alone."""
    from coordexp.launch.server_spec import ServerLaunchSpec, build_env, cpu_server_env

    cpu = ServerLaunchSpec(model_dir=str(tmp_path), port=1, device="cpu", cpus=[4, 5, 6])
    env = build_env(cpu, base={"PATH": "/bin"})
    assert (env["OMP_WAIT_POLICY"], env["KMP_BLOCKTIME"]) == ("PASSIVE", "0")
    assert (env["VLLM_ENABLE_V1_MULTIPROCESSING"], env["OMP_NUM_THREADS"]) == ("0", "2")
    one_core = ServerLaunchSpec(model_dir=str(tmp_path), port=1, device="cpu", cpus=[3])
    assert build_env(one_core, base={})["OMP_NUM_THREADS"] == "1"
    two_engines = ServerLaunchSpec(model_dir=str(tmp_path), port=1, device="cpu", cpus=list(range(16)),
                                   data_parallel_size=2)
    assert build_env(two_engines, base={})["OMP_NUM_THREADS"] == "7"  # (16 - 1) // 2 per engine
    unpinned = build_env(ServerLaunchSpec(model_dir=str(tmp_path), port=1, device="cpu"), base={})
    assert unpinned["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) - 1))
    mine = {"KMP_BLOCKTIME": "5", "OMP_NUM_THREADS": "7", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    assert {k: build_env(cpu, base=mine)[k] for k in mine} == mine
    empty = build_env(cpu, base={"VLLM_ENABLE_V1_MULTIPROCESSING": ""})  # unset: vLLM cannot parse ""
    assert empty["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    gpu = build_env(ServerLaunchSpec(model_dir=str(tmp_path), port=1, device="cuda"), base={})
    assert not set(cpu_server_env(4)) & set(gpu)

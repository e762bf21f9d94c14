"""What `python -m coordexp.train` does once the config is valid: the run's whole process lifecycle.

``run_experiment(cfg, run_dir, resolved)``:

1. ``rollout=hf``: record the run (``run_metadata.json``), train (in-process learner for one process on one
   node without FSDP - :func:`learner_in_process` - else ``torchrun`` on the saved ``resolved_config.yaml``;
   ranks never re-compose Hydra), return the learner's exit code.
2. ``rollout=vllm_server`` additionally, before the learner:

   * resolve the model dir the server must serve - the very folder the learner trains (for the tiny model
     ``ensure_tiny_model(model.path, arch)``, built here, before the server starts); a missing checkpoint
     fails here, before anything starts;
   * start ``swift rollout`` with the coordexp plugin and the repeat-terminate environment in its own
     process group (:class:`~coordexp.launch.rollout_server.RolloutServer`: port check, ``/health/``
     deadline with progress lines, early-exit detection, activation probe) - or, with
     ``vllm.server.reuse_existing``, check and probe the servers already running at
     ``vllm.server.base_urls`` (never stopped here);
   * tell the learner, through ``COORDEXP_SERVER_INITIAL_WEIGHTS``, that a server it started serves the
     learner's initial checkpoint (so the first weight sync can wait until the weights change);
   * run the learner; for a torchrun learner, watch the server too: a server that dies mid-training stops
     the learner at once with the server's exit code and log tail;
   * on exit, error, SIGINT or SIGTERM: the learner's process group, then the server's, get TERM, then KILL.

Exit code: the learner's (in-process: 0, or 2 for a :class:`~coordexp.errors.CoordexpError` such
as a server failure mid-training); 3 when the rollout server could not be started or probed, or died
during a torchrun learner; 2 for a model path that is not a checkpoint; 128+signal on SIGINT/SIGTERM. On
failure the tail of each started server's log is printed.

Multi-node (``training.nnodes > 1``, docs/runbook.md "Multi-node learner"): node 0 runs the lifecycle above
with a c10d-rendezvous torchrun learner (never in-process) and without the initial-weights shortcut (every
node's ranks must agree when the first sync happens); another node (``training.node_rank > 0``) starts no
server and writes no metadata: it waits for node 0's servers and rendezvous
(:mod:`coordexp.launch.nodes`), then runs its ranks and watches node 0's servers.

Inside a Hydra sweep with ``hydra/launcher=coordexp`` (see ``launchers/``), a
:class:`~coordexp.launch.servers.ServerPool` keeps the server between jobs whose server settings are
equal; each job's learner then re-syncs weights before its first rollout (the server holds the previous
job's weights). Plain runs never see a launcher (Hydra
instantiates launchers only in MULTIRUN mode), which is why this lifecycle lives here, in the task function.

Importing this module is cheap (no torch): the launcher plugin and ``coordexp.train`` import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordexp.config.schema import TrainConfig, enum_value
from coordexp.errors import (
    EXIT_SERVER_ERROR,
    CoordexpError,
    LaunchError,
    ServerStartError,
    disk_full_is_an_error,
)
from coordexp.launch import metadata
from coordexp.launch import nodes as nodes_mod
from coordexp.launch.process import defer_signal, set_parent_death_signal, stop_group, terminate_on_signals
from coordexp.launch.servers import ServerSet, current_pool, resolve_model_dir
from coordexp.launch.supervise import supervised_command
from coordexp.protocol import ENV_INITIAL_WEIGHTS, ENV_RUN_ID, METADATA_NAME
from coordexp.telemetry.record import say
from coordexp.trainer import resume


def _say(msg: str) -> None:
    say(f"[coordexp launch] {msg}")


# ----------------------------------------------------------------------------------------------- timeline


def process_start_epoch() -> float:
    """Wall-clock time this process started (Linux: /proc start ticks against /proc/uptime; else now)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


_LAST_RUN_END: float | None = None


@dataclass
class Timeline:
    """Named marks (epoch seconds); each phase is the time since the previous mark."""

    start: float
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.append((name, time.time() if at is None else at))

    def phases(self) -> dict[str, float]:
        out, prev = {}, self.start
        for name, t in self.marks:
            out[name] = round(t - prev, 3)
            prev = t
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "marks": {n: t for n, t in self.marks}, "phases_s": self.phases()}


# ----------------------------------------------------------------------------------------------- learner


def learner_command(cfg: TrainConfig, resolved: Path) -> list[str]:
    t = cfg.training
    nodes = (nodes_mod.torchrun_node_args(t.nnodes, t.node_rank, t.rdzv_endpoint or "", t.output_dir,
                                          t.rdzv_timeout_s) if t.nnodes > 1 else ["--standalone"])
    return [
        sys.executable,
        "-m",
        "coordexp.launch.quiet_torchrun",
        *nodes,
        f"--nproc_per_node={t.nproc_per_node}",
        "-m",
        "coordexp.trainer.learner",
        "--config",
        str(resolved),
    ]


def learner_in_process(cfg: TrainConfig) -> bool:
    """Whether the learner runs in this process: one process on one node, unsharded. FSDP needs a process
    group even on one GPU (the Trainer refuses FSDP outside distributed training), so ``training.fsdp``
    always runs under torchrun."""
    t = cfg.training
    return t.nproc_per_node == 1 and t.nnodes == 1 and not t.fsdp


def learner_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment additions for the learner: its GPU set on a GPU node. Next to a CPU server the learner
    keeps OpenMP's default wait policy: with passive threads its forward took 1.4x as long, and the server
    sleeps between requests instead (:func:`coordexp.launch.server_spec.cpu_server_env`,
    docs/benchmarks.md)."""
    v = cfg.vllm
    env: dict[str, str] = {}
    server_mode = enum_value(cfg.rollout_matching.rollout_backend) == "vllm"
    if server_mode and enum_value(v.device) == "cuda" and v.learner_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in v.learner_gpus)
    return env


@contextlib.contextmanager
def _env_overlay(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------- the run


def _update_metadata(run_dir: Path, launcher: dict[str, Any]) -> None:
    path = run_dir / METADATA_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    data["launcher"] = launcher
    try:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    except OSError as err:  # e.g. a full disk: the run's exit code must not turn into a traceback here
        _say(f"warning: could not update {path}: {err}")


def _run_in_process(cfg: TrainConfig, run_dir: Path, env: dict[str, str]) -> int:
    from coordexp.trainer import preemption  # torch and transformers: only when a learner really runs
    from coordexp.trainer.learner import train

    def checkpoint_first(signum: int) -> bool:
        """The first SIGTERM while the training loop runs (training.checkpoint_on_sigterm): the learner ends
        its step, saves a checkpoint and returns; the run then exits 128 + signal."""
        if preemption.active():
            preemption.request(signum)
            return True
        return False

    with _env_overlay(env), defer_signal(checkpoint_first):
        try:
            train(cfg, run_dir)
        except CoordexpError as err:
            say(f"error: {err}")
            return err.code
    signum = preemption.requested()
    if signum:
        _say(f"{signal.Signals(signum).name}: checkpoint saved at the end of the step; exiting")
    return 128 + signum if signum else 0


def _run_torchrun(
    cmd: list[str], env: dict[str, str], servers: Any, launcher: dict[str, Any], run_dir: Path,
    record: bool = True,
) -> int:
    """Run the torchrun learner under the supervisor; ``servers`` (a ServerSet, or another node's view of
    node 0's servers, :class:`~coordexp.launch.nodes.RemoteServers`) is watched meanwhile. ``record``: this
    orchestrator owns run_metadata.json (node 0)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env}
    proc = subprocess.Popen(supervised_command(cmd), env=full_env, start_new_session=True,  # owns the ranks
                            preexec_fn=set_parent_death_signal)  # noqa: PLW1509
    launcher["learner"]["pgid"] = proc.pid
    if record:
        _update_metadata(run_dir, launcher)
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            dead = servers.dead() if servers is not None else None
            if dead is not None:
                srv, code = dead
                how = (f"is {code}: node 0 ended or was lost" if isinstance(code, str)
                       else f"exited with code {code}")
                _say(f"error: the rollout server {srv.base_url} {how} during training; stopping the learner")
                return EXIT_SERVER_ERROR
    finally:
        stop_group(proc)


def _run_other_node(cfg: TrainConfig, run_dir: Path, resolved: Path, env: dict[str, str]) -> int:
    """A node other than node 0 (docs/runbook.md "Multi-node learner"): no server, no run metadata; wait for
    node 0's servers and rendezvous, then run this node's ranks, watching node 0's servers."""
    t, v = cfg.training, cfg.vllm
    server_mode = enum_value(cfg.rollout_matching.rollout_backend) == "vllm"
    _say(f"node {t.node_rank} of {t.nnodes}: this node runs {t.nproc_per_node} learner rank(s); node 0 owns "
         f"the rollout servers and the run metadata; shared run dir {run_dir}")
    urls = list(v.server.base_urls) if server_mode else []
    if urls:
        problem = nodes_mod.wait_for_servers(urls, v.server.startup_timeout_s, t.node_rank, say=_say)
        if problem:
            say(f"error: {problem}")
            return EXIT_SERVER_ERROR
    problem = nodes_mod.wait_for_rendezvous(t.rdzv_endpoint or "", t.rdzv_timeout_s, t.node_rank, say=_say)
    if problem:
        say(f"error: {problem}")
        return LaunchError.code
    cmd = learner_command(cfg, resolved)
    launcher = {"learner": {"command": cmd, "pgid": None}}
    code = _run_torchrun(cmd, env, nodes_mod.RemoteServers(urls) if urls else None, launcher, run_dir,
                         record=False)
    if code != 0:
        _say(f"node {t.node_rank}: the learner group ended with exit code {code}; with training.nnodes="
             f"{t.nnodes} a rank or an orchestrator stopping on another node ends every node's ranks too "
             f"(see node 0's console)")
    return code


def run_experiment(cfg: TrainConfig, run_dir: Path, resolved: Path) -> int:
    """The whole run (see the module docstring); returns the exit code."""
    global _LAST_RUN_END
    timeline = Timeline(start=_LAST_RUN_END or process_start_epoch())
    timeline.mark("config")
    try:
        with terminate_on_signals():
            return _run(cfg, Path(run_dir), Path(resolved), timeline)
    finally:
        _LAST_RUN_END = time.time()


def _run(cfg: TrainConfig, run_dir: Path, resolved: Path, timeline: Timeline) -> int:
    # OpenMP reads its settings when torch first loads it: set the learner's before anything imports torch
    # (the in-process learner and a Stage-1 build run in this process).
    extra_env = learner_env(cfg)
    os.environ.update(extra_env)
    server_mode = enum_value(cfg.rollout_matching.rollout_backend) == "vllm"
    nproc = cfg.training.nproc_per_node
    run_id = uuid.uuid4().hex[:12]
    pool = current_pool()
    v = cfg.vllm
    launcher: dict[str, Any] = {
        "entry": "hydra_launcher:coordexp" if pool is not None else "task_function",
        "run_id": run_id,
        "orchestrator_pid": os.getpid(),
        "rollout_backend": enum_value(cfg.rollout_matching.rollout_backend),
        "learner": {
            "mode": "in_process" if learner_in_process(cfg) else "torchrun",
            "nproc_per_node": nproc,
            "nnodes": cfg.training.nnodes,
            "node_rank": cfg.training.node_rank,
            "rdzv_endpoint": cfg.training.rdzv_endpoint,
            "gpus": list(v.learner_gpus) if server_mode and enum_value(v.device) == "cuda" else [],
            "pgid": None,
        },
    }
    try:  # the checkpoint to resume from, before any server starts (docs/runbook.md "Resume")
        resumed = resume.resolve(cfg.training.resume_from_checkpoint, run_dir, cfg.training.max_steps)
    except CoordexpError as err:
        say(f"error: {err}")
        return err.code
    if resumed is not None:
        _say(resumed.describe())
        if resumed.complete:  # nothing to train: record it and end with 0
            launcher.update(exit_code=0, already_complete=True)
            with disk_full_is_an_error("run_metadata.json", run_dir):
                metadata.write(run_dir, cfg, resolved, launcher)
                resume.record(run_dir, resumed)
            return 0
    env: dict[str, str] = {ENV_RUN_ID: run_id, **extra_env}
    multinode = cfg.training.nnodes > 1
    if multinode and cfg.training.node_rank > 0:
        return _run_other_node(cfg, run_dir, resolved, env)
    servers: ServerSet | None = None
    code: int | None = None
    try:
        if server_mode:
            try:
                model_dir = resolve_model_dir(cfg)
            except LaunchError as err:
                say(f"error: {err}")
                return err.code
            timeline.mark("model")
            launcher.update(
                model=str(model_dir),
                dtype=enum_value(v.dtype),
                device=enum_value(v.device),
                server_base_urls=list(v.server.base_urls),
                reuse_existing=bool(v.server.reuse_existing),
                data_parallel_size=v.data_parallel_size,
                tensor_parallel_size=v.tensor_parallel_size,
                server_gpus=list(v.server_gpus) if enum_value(v.device) == "cuda" else [],
                weight_sync={
                    "mode": enum_value(v.sync.mode),
                    "transport": enum_value(v.sync.transport),
                    "timeout_s": v.sync.timeout_s,
                },
            )
            try:
                if pool is not None:
                    servers, fresh = pool.acquire(cfg, model_dir, run_dir, run_id)
                else:
                    servers, fresh = ServerSet.start(cfg, model_dir, run_dir, run_id), True
            except ServerStartError as err:
                say(f"error: {err}")
                return err.code
            # fresh: started now by this orchestrator, so it holds the learner's initial checkpoint
            fresh = fresh and servers.started_here
            for srv in servers.servers:
                for phase in ("spawn", "health", "probe"):
                    if phase in srv.timings and (fresh or not servers.started_here):
                        timeline.marks.append((f"server_{phase}", timeline.marks[-1][1] + srv.timings[phase]))
            timeline.mark("server_ready")
            launcher["servers"] = servers.describe()
            launcher["server_fresh"] = fresh
            if fresh and not multinode:  # every node's ranks must agree on it: only node 0 knows
                env[ENV_INITIAL_WEIGHTS] = str(model_dir)
        try:
            with disk_full_is_an_error("run_metadata.json", run_dir):
                metadata.write(run_dir, cfg, resolved, launcher)
                if resumed is not None:
                    resume.record(run_dir, resumed)
        except CoordexpError as err:
            say(f"error: {err}")
            code = err.code
            return code
        timeline.mark("learner_start")
        launcher["timeline"] = timeline.to_dict()
        _update_metadata(run_dir, launcher)
        if learner_in_process(cfg):
            code = _run_in_process(cfg, run_dir, env)
        else:
            launcher["learner"]["command"] = learner_command(cfg, resolved)
            code = _run_torchrun(learner_command(cfg, resolved), env, servers, launcher, run_dir)
            if code != 0 and multinode:
                _say(f"the learner group ended with exit code {code}; with training.nnodes="
                     f"{cfg.training.nnodes} a rank or an orchestrator stopping on another node ends every "
                     f"node's ranks too (see that node's console)")
        return code
    except SystemExit as exc:  # SIGTERM/SIGINT (128 + signal): run_metadata.json records it like any code
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        failed = code is None or code != 0
        interrupted = code in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the user's or a scheduler's stop
        if servers is not None and failed and not interrupted:
            # a learner error may come from a server that just died: give its supervisor's line a moment,
            # so the message names the server
            dead = servers.ended(wait_s=2.0 if code in (2, 3) else 0.0)
            if dead is not None:
                _say(f"the rollout server {dead[0].base_url} exited with code {dead[1]}")
            tails = servers.log_tails()
            if tails:
                say(tails)
        if servers is not None:
            if pool is not None:
                pool.release(ok=not failed)
            else:
                servers.stop()
        timeline.mark("end")
        launcher["timeline"] = timeline.to_dict()
        launcher["exit_code"] = code
        _update_metadata(run_dir, launcher)

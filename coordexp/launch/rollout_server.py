"""Rollout-server lifecycle: start ``swift rollout`` with the coordexp plugin, wait, probe, tear down.

Importable without torch (only ``requests`` and the pure config/rule modules).

:class:`RolloutServer` starts a server from a :class:`~coordexp.launch.server_spec.ServerLaunchSpec` in its
own session / process group (``setsid``), refuses a port that is already in use, polls ``/health/`` against a
deadline with progress lines, notices an early exit and raises :class:`~coordexp.errors.ServerStartError`
with the tail of the server log (an exit because another process bound the port during the start --
:class:`PortTakenDuringStart` -- starts it once more), logs ``/get_world_size/``, runs the activation probe
(:mod:`coordexp.rollout.probe`) when repeat-terminate is enabled, and tears the whole process group down
(TERM, then KILL) on exit, error, SIGINT or SIGTERM - also from ``atexit`` and, if the orchestrator dies
abruptly (SIGKILL included), through :mod:`coordexp.launch.supervise`, the group's leader, which owns every
process of the server (its engine process and vLLM's EngineCore/Worker grandchildren too). With
``vllm.server.reuse_existing: true`` nothing is started: each base URL must already answer ``/health/``, and
the probe still runs.

Start is two halves so that several servers start concurrently: :meth:`RolloutServer.spawn` (``Popen``; on
the caller's thread, because Linux's parent-death signal follows the thread that forked) and
:meth:`RolloutServer.ready` (health deadline, world size, probe; safe on a worker thread).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Self

from coordexp.checkpoint import read_stop_ids
from coordexp.config.schema import enum_value
from coordexp.errors import ServerStartError
from coordexp.launch.process import (
    ephemeral_port_range,
    port_in_use,
    set_parent_death_signal,
    stop_group,
    terminate_on_signals,
)
from coordexp.launch.server_identity import foreign_server_problem, reuse_problem
from coordexp.launch.server_log import command_exit_code, lost_port_in_log, start_failure_fix
from coordexp.launch.server_spec import (
    ServerLaunchSpec,
    build_command,
    build_env,
    check_server_python,
    launch_spec_from_config,
)
from coordexp.launch.supervise import supervised_command
from coordexp.protocol import ENV_SERVER_NONCE
from coordexp.rollout.probe import ProbeError, run_probe
from coordexp.rollout.server_client import RolloutServerError, check_health, get_identity, get_world_size
from coordexp.telemetry import record as console

__all__ = ["BUSY_PORT_FIX", "PortTakenDuringStart", "RolloutServer", "lost_port_in_log", "say", "start_all"]

#: The way out of a busy port for a run or an eval.
BUSY_PORT_FIX = ("stop whatever listens there, pick another port in vllm.server.base_urls, or set "
                 "vllm.server.reuse_existing=true to use a server that is already running")


class PortTakenDuringStart(ServerStartError):
    """The server exited because its port was bound by another process between the launcher's free-port
    check and uvicorn's bind -- often the server's own engine, which takes its internal ports from the
    kernel's ephemeral range. Starting again usually succeeds (:func:`start_all`)."""


def say(msg: str) -> None:
    console.say(f"[coordexp server] {msg}")


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class RolloutServer:
    """One rollout server: started here (``spec`` given) or reused (``reuse_existing``)."""

    def __init__(
        self,
        spec: ServerLaunchSpec | None,
        base_url: str,
        *,
        log_path: str | os.PathLike | None = None,
        startup_timeout_s: float = 600.0,
        request_timeout_s: float = 30.0,
        probe_timeout_s: float = 120.0,
        log_tail_lines: int = 40,
        probe: bool | None = None,
        reuse_existing: bool = False,
        progress: Callable[[str], None] = say,
        progress_every_s: float = 10.0,
        poll_interval_s: float = 1.0,
        eos_token_id: int | tuple[int, ...] | None = None,
        pushes_from: str | os.PathLike | None = None,
        serves: str | os.PathLike | None = None,
        busy_port_fix: str = BUSY_PORT_FIX,
    ):
        """``pushes_from`` / ``serves`` apply to a reused server: the folder this run writes weight files
        under (the server's weights root must hold it), or - when nothing is pushed (an eval) - the model
        folder the server must serve unchanged. ``busy_port_fix``: what the error for a busy port tells the
        user to do."""
        if spec is None and not reuse_existing:
            raise ValueError("RolloutServer needs a launch spec unless reuse_existing is set")
        self.spec = spec
        self.base_url = base_url.rstrip("/")
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = float(startup_timeout_s)
        self.request_timeout_s = float(request_timeout_s)
        self.probe_timeout_s = float(probe_timeout_s)
        self.log_tail_lines = int(log_tail_lines)
        enabled = bool(spec.repeat_terminate.enabled) if spec is not None else True
        self.run_probe = enabled if probe is None else bool(probe)
        self.reuse_existing = bool(reuse_existing)
        self.progress = progress
        self.progress_every_s = float(progress_every_s)
        self.poll_interval_s = float(poll_interval_s)
        self.eos_token_id = eos_token_id
        self.busy_port_fix = busy_port_fix
        self.pushes_from = str(pushes_from) if pushes_from else None
        self.serves = str(serves) if serves else None
        self._nonce = secrets.token_hex(8)  # this start's identity (ENV_SERVER_NONCE)
        self.api_key = spec.api_key if spec is not None else None  # None: the environment's (if any)
        if self.eos_token_id is None and spec is not None:
            self.eos_token_id = read_stop_ids(spec.model_dir) or None  # the checkpoint's stop-token set
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.world_size: int | None = None
        self.probe_report: Any = None
        self.startup_seconds: float | None = None
        #: seconds per start phase: ``spawn`` (Popen), ``health`` (until /health/ answered), ``probe``
        self.timings: dict[str, float] = {}
        self._log_fh = None
        self._log_start = 0  # byte offset of the current start in the (appended) server log
        self._signals: contextlib.ExitStack | None = None
        self._t0: float | None = None

    # ------------------------------------------------------------------------------------------ factory

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        model_dir: str | os.PathLike,
        log_path: str | os.PathLike | None,
        base_url: str | None = None,
        index: int = 0,
        count: int = 1,
        weights_root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> RolloutServer:
        """Server ``index`` of the ``count`` the config describes (``count`` = its number of base URLs);
        ``weights_root``: where its weight-loading route may read files (the run dir)."""
        s = cfg.vllm.server
        urls = list(s.base_urls)
        url = base_url or (urls[0] if urls else None)
        if not url:
            raise ServerStartError("vllm.server.base_urls is empty")
        if s.reuse_existing:
            spec = None
            kwargs.setdefault("probe", bool(cfg.rollout_matching.repeat_terminate.enabled))
            kwargs.setdefault("eos_token_id", read_stop_ids(model_dir) or None)
            if weights_root is None:  # an eval: nothing is pushed, the server must hold the checkpoint
                kwargs.setdefault("serves", model_dir)
            elif enum_value(cfg.vllm.sync.transport) == "file":
                kwargs.setdefault("pushes_from", weights_root)
        else:
            if s.python and os.path.realpath(s.python) != os.path.realpath(sys.executable):
                # a separate server environment: fail fast without the stack
                check_server_python(s.python, enum_value(cfg.vllm.device))
            spec = launch_spec_from_config(cfg, model_dir, url, index=index, count=count,
                                           weights_root=weights_root)
        return cls(
            spec,
            url,
            log_path=log_path,
            startup_timeout_s=s.startup_timeout_s,
            request_timeout_s=s.request_timeout_s,
            probe_timeout_s=s.infer_timeout_s,
            log_tail_lines=s.log_tail_lines,
            reuse_existing=s.reuse_existing,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def command(self) -> list[str]:
        assert self.spec is not None
        return build_command(self.spec)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit code of a server started here that has exited; None while it runs (or if reused)."""
        return self.proc.poll() if self.proc is not None else None

    def command_exit_code(self) -> int | None:
        """The exit code of the server command itself, once it ended: its supervisor says so in this start's
        log at once, then spends up to its grace stopping the engine processes before it exits itself (and
        :meth:`exit_code` shows it). None while the command runs (or if reused)."""
        if self.proc is None:
            return None
        code = command_exit_code(self._this_starts_log())
        return code if code is not None else self.exit_code()

    def describe(self) -> dict[str, Any]:
        """What run_metadata.json records about this server."""
        spec = self.spec
        out: dict[str, Any] = {
            "base_url": self.base_url,
            "started_here": spec is not None,
            "pgid": self.pgid,
            "log": str(self.log_path) if self.log_path and spec is not None else None,
            "world_size": self.world_size,
            "startup_seconds": self.startup_seconds,
            "timings": dict(self.timings),
            "probe": None,
        }
        if spec is not None:
            out.update(
                model=spec.model_dir,
                device=spec.device,
                dtype=spec.dtype,
                data_parallel_size=spec.data_parallel_size,
                tensor_parallel_size=spec.tensor_parallel_size,
                gpus=list(spec.server_gpus),
                cpus=list(spec.cpus),
                python=spec.python,
                max_model_len=spec.max_model_len,
                command=build_command(spec),
            )
        r = self.probe_report
        if r is not None:
            out["probe"] = {
                "passed": True,
                "attempts": r.attempts,
                "seconds": round(r.seconds, 3),
                "trigger_tokens": len(r.trigger.token_ids),
                "control_tokens": len(r.control.token_ids),
            }
        return out

    def log_tail(self, n: int | None = None) -> str:
        n = self.log_tail_lines if n is None else n
        if not self.log_path or not self.log_path.is_file():
            return "(no server log)"
        with open(self.log_path, "r", errors="replace") as fh:
            return "".join(deque(fh, maxlen=n))

    def _this_starts_log(self) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_start)  # this start's lines only: the log is appended to across starts
            return fh.read().decode(errors="replace")

    def _lost_its_port(self) -> bool:
        """uvicorn's bind error for this server's port is in what this start wrote to the log."""
        return self.spec is not None and lost_port_in_log(self._this_starts_log(), self.spec.port)

    def _fail(self, msg: str, with_log: bool = True,
              error: type[ServerStartError] = ServerStartError) -> ServerStartError:
        if with_log and self.log_path:
            msg += f"\n--- last {self.log_tail_lines} lines of {self.log_path} ---\n{self.log_tail()}"
        return error(msg)

    def start(self) -> RolloutServer:
        """:meth:`spawn`, then :meth:`ready` (once more after a lost port: :func:`start_all`); stops the
        server on any failure."""
        start_all([self])
        return self

    def spawn(self) -> None:
        """Start the process (nothing for a reused server). Call it on the thread that stays alive for the
        server's lifetime: the parent-death signal fires when the forking thread ends."""
        self._t0 = time.monotonic()
        if self.reuse_existing:
            return
        try:
            self._spawn()
        except BaseException:
            self.stop()
            raise
        self.timings["spawn"] = time.monotonic() - self._t0

    def ready(self) -> RolloutServer:
        """Wait for ``/health/`` (or check a reused server), read the world size, run the probe."""
        t0 = self._t0 if self._t0 is not None else time.monotonic()
        try:
            if self.reuse_existing:
                if not check_health(self.base_url, self.request_timeout_s, api_key=self.api_key):
                    raise ServerStartError(
                        f"vllm.server.reuse_existing is true but no healthy server answers "
                        f"{self.base_url}/health/: start it first (python -m coordexp.launch.server "
                        f"+experiment=<leaf> ..., docs/runbook.md), or set vllm.server.reuse_existing=false "
                        f"to let the run start its own"
                    )
                self.progress(f"reusing the rollout server at {self.base_url}")
                self._check_reused()
            else:
                self._wait_healthy(t0)
            t_healthy = time.monotonic()
            self.timings["health"] = t_healthy - t0 - self.timings.get("spawn", 0.0)
            try:
                self.world_size = get_world_size(self.base_url, self.request_timeout_s, api_key=self.api_key)
            except RolloutServerError as exc:
                raise self._fail(
                    f"rollout server at {self.base_url} is up but /get_world_size/ failed: {exc}"
                ) from None
            self.progress(
                f"rollout server {self.base_url} healthy after {time.monotonic() - t0:.1f} s "
                f"(world_size={self.world_size})"
            )
            if self.run_probe:
                t_probe = time.monotonic()
                self._probe()
                self.timings["probe"] = time.monotonic() - t_probe
            self.startup_seconds = time.monotonic() - t0
            return self
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        spec = self.spec
        assert spec is not None
        if not Path(spec.plugin_path).is_file():
            raise ServerStartError(f"coordexp swift plugin not found at {spec.plugin_path}")
        if port_in_use(spec.host, spec.port):
            raise ServerStartError(f"port {spec.port} on {spec.host} is already in use: {self.busy_port_fix}")
        cmd = supervised_command(build_command(spec))  # the supervisor owns vLLM's engine grandchildren too
        env = build_env(spec)
        env[ENV_SERVER_NONCE] = self._nonce
        if spec.device == "cpu" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            self.progress("warning: VLLM_ENABLE_V1_MULTIPROCESSING in the environment runs this CPU server's "
                          "engine in separate EngineCore/Worker processes that busy-wait on each other: the "
                          "learner's steps next to it ran up to 28x slower (docs/benchmarks.md); unset it")
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed by stop()
            self._log_start = self._log_fh.tell()
            self._log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
            out = self._log_fh
        else:
            out = subprocess.DEVNULL
        where = f"cores {_ranges(spec.cpus)}" if spec.cpus else (
            f"GPUs {','.join(map(str, spec.server_gpus))}" if spec.server_gpus else spec.device)
        self.progress(f"starting rollout server on {spec.host}:{spec.port} ({where}); log: {self.log_path}")
        cpus = list(spec.cpus)

        def preexec() -> None:  # between fork and exec: die with the orchestrator; pin to the core slice
            set_parent_death_signal()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509
            cwd=os.getcwd(),
        )
        self.pgid = self.proc.pid  # session leader: its pid is the process-group id
        atexit.register(self.stop)

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        next_note = time.monotonic() + self.progress_every_s
        while True:
            if self.proc is None:  # stop() from another thread: another server of the set failed
                raise ServerStartError(f"rollout server {self.base_url} was stopped during its start")
            code = self.proc.poll()
            if code is not None:
                msg = (f"rollout server {self.base_url} exited with code {code} before becoming healthy "
                       f"({time.monotonic() - t0:.1f} s after start)")
                if self._lost_its_port():
                    port, ephemeral = self.spec.port, ephemeral_port_range()
                    span = f"{ephemeral[0]}-{ephemeral[1]}" if ephemeral else "(ip_local_port_range)"
                    self.progress(f"{self.base_url} lost port {port} to another process during its start")
                    raise self._fail(
                        f"{msg}: port {port} was taken after the launcher found it free (the server's engine "
                        f"takes internal ports from the ephemeral range {span}). Fix: choose a "
                        f"port below that range in vllm.server.base_urls (8000 is)",
                        error=PortTakenDuringStart)
                fix = start_failure_fix(self._this_starts_log())
                raise self._fail(f"{msg}. {fix}" if fix else msg)
            wait_s = min(5.0, self.request_timeout_s)
            if check_health(self.base_url, wait_s, api_key=self.api_key) and self._answers_as_ours(wait_s):
                return
            now = time.monotonic()
            if now >= deadline:
                raise self._fail(
                    f"rollout server at {self.base_url} not healthy within "
                    f"vllm.server.startup_timeout_s={self.startup_timeout_s:g} s"
                )
            if now >= next_note:
                self.progress(
                    f"waiting for {self.base_url}/health/ ... {now - t0:.0f} s "
                    f"(deadline {self.startup_timeout_s:.0f} s)"
                )
                next_note = now + self.progress_every_s
            time.sleep(self.poll_interval_s)

    def _answers_as_ours(self, timeout_s: float) -> bool:
        """Whether the server answering :attr:`base_url` is the one this start spawned; another server there
        is an error now, before its rollouts or evals could be taken for ours
        (:func:`~coordexp.launch.server_identity.foreign_server_problem`). False while the identity route
        cannot be asked yet (keep polling)."""
        try:
            ident = get_identity(self.base_url, timeout_s, api_key=self.api_key)
        except RolloutServerError:
            return False
        problem = foreign_server_problem(ident, self._nonce, self.base_url, self.spec.port)
        if problem:
            raise self._fail(problem, with_log=False)
        return True

    def _check_reused(self) -> None:
        """A reused server must fit this run (:func:`~coordexp.launch.server_identity.reuse_problem`). A
        server without the identity route (an older coordexp) cannot be checked: said, not refused."""
        try:
            ident = get_identity(self.base_url, timeout_s=self.request_timeout_s, api_key=self.api_key)
        except RolloutServerError as exc:
            raise ServerStartError(f"vllm.server.reuse_existing: {exc}") from None
        if ident is None:
            self.progress(f"warning: {self.base_url} has no /coordexp/identity/ route (a server started "
                          f"by an older coordexp): cannot check which weights it holds or where it loads "
                          f"them from")
            return
        problem = reuse_problem(ident, self.base_url, self.pushes_from, self.serves)
        if problem:
            raise ServerStartError(problem)

    def _probe(self) -> None:
        try:
            self.probe_report = run_probe(
                self.base_url, timeout_s=self.probe_timeout_s, eos_token_id=self.eos_token_id,
                api_key=self.api_key,
            )
        except ProbeError as exc:
            raise self._fail(str(exc), with_log=not self.reuse_existing) from None
        r = self.probe_report
        self.progress(
            f"repeat-terminate probe passed in {r.seconds:.1f} s (attempt {r.attempts}): forced request "
            f"stopped after {len(r.trigger.token_ids)} tokens with flag 1; control ran "
            f"{len(r.control.token_ids)} tokens with flag 0"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """Terminate the whole process group (TERM, wait, KILL). Idempotent."""
        proc, pgid = self.proc, self.pgid
        if proc is not None and pgid is not None:
            stop_group(proc, timeout_s)
            self.proc = None
            self.pgid = None
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> Self:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(terminate_on_signals())
        try:
            return self.start()
        except BaseException:
            self._signals.close()
            self._signals = None
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None


def start_all(servers: list[RolloutServer]) -> None:
    """Start ``servers`` concurrently: spawn each on this thread (the parent-death signal follows the forking
    thread), then wait for health and probe them in parallel threads. Any failure stops every one of them and
    is re-raised (the first in ``servers`` order; its message names its URL). A server that lost its port
    during its start (:class:`PortTakenDuringStart`) starts the set once more; a second loss is raised."""
    try:
        _start_all_once(servers)
    except PortTakenDuringStart:
        say("starting the rollout server(s) once more")
        _start_all_once(servers)


def _start_all_once(servers: list[RolloutServer]) -> None:
    try:
        for srv in servers:
            srv.spawn()
        if len(servers) == 1:
            servers[0].ready()
        elif servers:
            with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="coordexp-server") as ex:
                futures = [ex.submit(srv.ready) for srv in servers]
                wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:  # stop the others now rather than at their startup deadline
                    for srv in servers:
                        srv.stop()
                    raise failed[0].exception()
    except BaseException:
        for srv in servers:
            srv.stop()
        raise

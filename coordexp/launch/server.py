"""Rollout-server lifecycle: start ``swift rollout`` with the coordexp plugin, wait, probe, tear down.

Importable without torch (only ``requests`` and the pure config/rule modules).

* :func:`launch_spec_from_config` turns a ``TrainConfig`` into a :class:`ServerLaunchSpec`;
  :func:`build_command` and :func:`build_env` turn that into the exact command line and environment
  (the repeat-terminate subtree is exported as JSON in ``COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON``
  together with the guard ``COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION=1``, for the server process
  only).
* :class:`RolloutServer` starts it in its own session / process group (``setsid``), refuses a port that is
  already in use, polls ``/health/`` against a deadline with progress lines, notices an early exit and
  raises :class:`ServerStartError` with the tail of the server log, logs ``/get_world_size/``, runs the
  activation probe (:mod:`coordexp.rollout.probe`) when repeat-terminate is enabled, and tears the whole
  process group down (TERM, then KILL) on exit, error, SIGINT or SIGTERM - also from ``atexit`` and, if the
  orchestrator dies abruptly, through the leader's parent-death signal.
* ``vllm.server.reuse_existing: true``: nothing is started; each base URL must already answer ``/health/``,
  and the probe still runs.

The command is ``python -m swift.cli.rollout ...``: the program ``swift rollout`` runs (ms-swift's ``swift``
entry point only re-executes that file in a child process).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from coordexp.config.contract import server_image_root
from coordexp.config.schema import RepeatTerminateConfig
from coordexp.rollout.repeat_rules import config_to_dict, parse_config
from coordexp.rollout.server_client import RolloutServerError, check_health, get_world_size

__all__ = [
    "ENV_CONFIG_JSON",
    "ENV_ENABLE",
    "ENV_SERVER_DEVICE",
    "PLUGIN_PATH",
    "RolloutServer",
    "ServerLaunchSpec",
    "ServerStartError",
    "build_command",
    "build_env",
    "launch_spec_from_config",
    "port_in_use",
    "read_eos_token_id",
    "stop_group",
    "terminate_on_signals",
]

PLUGIN_PATH = str(Path(__file__).resolve().parents[1] / "rollout" / "swift_plugin.py")
ENV_ENABLE = "COORDEXP_ENABLE_VLLM_REPEAT_TERMINATE_INJECTION"
ENV_CONFIG_JSON = "COORDEXP_VLLM_REPEAT_TERMINATE_CONFIG_JSON"
ENV_SERVER_DEVICE = "COORDEXP_SERVER_DEVICE"


class ServerStartError(RuntimeError):
    """The rollout server could not be started, did not become healthy, or failed its probe."""


@dataclass
class ServerLaunchSpec:
    """Everything that determines the server command line and environment."""

    model_dir: str
    port: int
    host: str = "127.0.0.1"
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "float32"
    max_model_len: int = 1024
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_space_gib: int = 1
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    server_gpus: list[int] = field(default_factory=list)
    repeat_terminate: RepeatTerminateConfig = field(default_factory=RepeatTerminateConfig)
    model_type: str | None = None  # ms-swift --model_type (None: let ms-swift detect it)
    template: str | None = None  # ms-swift --template (None: the model's default template)
    plugin_path: str = PLUGIN_PATH
    python: str = sys.executable
    image_root: str | None = None  # ROOT_IMAGE_DIR: the folder request image paths are relative to
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # applied last (tests, site tweaks)


def _enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


def _tiny_model_type(model_dir: str) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _is_tiny_checkpoint(model_dir: str) -> bool:
    """A folder of the tiny model or trained from it (e.g. ``<run_dir>/checkpoint-N`` passed as
    ``model.kind=local``): its chat template is the tiny model's ChatML."""
    from coordexp.data.tiny_model import CHATML_TEMPLATE

    try:
        return (Path(model_dir) / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    except OSError:
        return False


def launch_spec_from_config(
    cfg: Any, model_dir: str | os.PathLike, base_url: str | None = None
) -> ServerLaunchSpec:
    """The launch spec of the (single) server a ``TrainConfig`` asks for, at ``base_url`` (default: the first
    of ``vllm.server.base_urls``). For the tiny model and checkpoints trained from it, ms-swift is told
    ``--model_type <qwen2|qwen3> --template chatml`` (its auto-detection is ambiguous for a bare Qwen2
    folder)."""
    v = cfg.vllm
    urls = list(v.server.base_urls)
    url = base_url or (urls[0] if urls else None)
    if not url:
        raise ServerStartError("vllm.server.base_urls is empty: nowhere to start the rollout server")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise ServerStartError(f"vllm.server.base_urls entry {url!r} must look like http://host:port")
    model_dir = str(Path(model_dir).resolve())
    if not Path(model_dir).is_dir():
        raise ServerStartError(f"model directory {model_dir} does not exist")
    model_type = template = None
    if _enum_value(cfg.model.kind) == "tiny" or _is_tiny_checkpoint(model_dir):
        model_type = _tiny_model_type(model_dir) or _enum_value(cfg.model.tiny_arch)
        template = "chatml"
    return ServerLaunchSpec(
        model_dir=model_dir,
        port=int(parsed.port),
        host=v.server.host,
        device=_enum_value(v.device),
        dtype=_enum_value(v.dtype),
        max_model_len=int(v.max_model_len),
        enforce_eager=bool(v.enforce_eager),
        gpu_memory_utilization=float(v.gpu_memory_utilization),
        cpu_kvcache_space_gib=int(v.cpu_kvcache_space_gib),
        data_parallel_size=int(v.data_parallel_size),
        tensor_parallel_size=int(v.tensor_parallel_size),
        server_gpus=list(v.server_gpus),
        repeat_terminate=parse_config(
            cfg.rollout_matching.repeat_terminate, where="rollout_matching.repeat_terminate."
        ),
        model_type=model_type,
        template=template,
        image_root=server_image_root(cfg),
    )


def build_command(spec: ServerLaunchSpec) -> list[str]:
    cmd = [
        spec.python,
        "-m",
        "swift.cli.rollout",
        "--model",
        spec.model_dir,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--infer_backend",
        "vllm",
        "--torch_dtype",
        spec.dtype,
        "--vllm_max_model_len",
        str(spec.max_model_len),
        "--vllm_enforce_eager",
        "true" if spec.enforce_eager else "false",
        "--vllm_data_parallel_size",
        str(spec.data_parallel_size),
        "--vllm_tensor_parallel_size",
        str(spec.tensor_parallel_size),
        "--external_plugins",
        spec.plugin_path,
    ]
    if spec.device != "cpu":
        cmd += ["--vllm_gpu_memory_utilization", str(spec.gpu_memory_utilization)]
    if spec.model_type:
        cmd += ["--model_type", spec.model_type]
    if spec.template:
        cmd += ["--template", spec.template]
    return cmd + list(spec.extra_args)


def build_env(spec: ServerLaunchSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default ``os.environ``) plus the coordexp variables."""
    env = dict(os.environ if base is None else base)
    env[ENV_ENABLE] = "1"
    env[ENV_CONFIG_JSON] = json.dumps(config_to_dict(spec.repeat_terminate), separators=(",", ":"))
    env[ENV_SERVER_DEVICE] = spec.device
    env["PYTHONUNBUFFERED"] = "1"
    if spec.image_root:
        env["ROOT_IMAGE_DIR"] = spec.image_root
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_space_gib)
        # ms-swift's own vLLM general plugin imports torchvision, absent from the CPU stack.
        env.setdefault("VLLM_PLUGINS", "none")
    elif spec.server_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.server_gpus)
    env.update({str(k): str(v) for k, v in spec.extra_env.items()})
    return env


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on (host, port) or the port cannot be bound."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(0.5)
        if s.connect_ex((probe_host, port)) == 0:
            return True
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return True
    return False


def read_eos_token_id(model_dir: str | os.PathLike) -> int | None:
    """The tokenizer's EOS id from the model folder's JSON files (no transformers import); None if unsure."""
    d = Path(model_dir)
    try:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        eos = tc.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            for src in (d / "tokenizer.json",):
                if src.is_file():
                    tj = json.loads(src.read_text())
                    for tok in tj.get("added_tokens", []):
                        if tok.get("content") == eos:
                            return int(tok["id"])
                    vocab = (tj.get("model") or {}).get("vocab") or {}
                    if isinstance(vocab, dict) and eos in vocab:
                        return int(vocab[eos])
            for tok in (tc.get("added_tokens_decoder") or {}).items():
                if isinstance(tok[1], dict) and tok[1].get("content") == eos:
                    return int(tok[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def stop_group(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """TERM the process group led by ``proc`` (a session leader, so its pid is the group id), wait up to
    ``timeout_s`` for the group to empty, then KILL and wait up to 5 s. Stops the server and the learner."""
    if proc is None:
        return
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not count as a member
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def set_parent_death_signal() -> None:
    """In a child between fork and exec (``preexec_fn``): die with SIGTERM when the parent dies."""
    import ctypes

    with contextlib.suppress(Exception):  # not Linux: no parent-death signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Terminated(SystemExit):
    pass


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise ``SystemExit`` (exit code 128+signum) in the main thread,
    so every ``finally``/``__exit__`` (server teardown) runs. A no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise _Terminated(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stderr_progress(msg: str) -> None:
    print(f"[coordexp server] {msg}", file=sys.stderr, flush=True)


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
        progress: Callable[[str], None] = _stderr_progress,
        progress_every_s: float = 10.0,
        poll_interval_s: float = 1.0,
        eos_token_id: int | None = None,
    ):
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
        if self.eos_token_id is None and spec is not None:
            self.eos_token_id = read_eos_token_id(spec.model_dir)
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.world_size: int | None = None
        self.probe_report: Any = None
        self.startup_seconds: float | None = None
        #: seconds per start phase: ``spawn`` (Popen), ``health`` (until /health/ answered), ``probe``
        self.timings: dict[str, float] = {}
        self._log_fh = None
        self._signals: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------------ factory

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        model_dir: str | os.PathLike,
        log_path: str | os.PathLike,
        base_url: str | None = None,
        **kwargs: Any,
    ) -> RolloutServer:
        s = cfg.vllm.server
        urls = list(s.base_urls)
        url = base_url or (urls[0] if urls else None)
        if not url:
            raise ServerStartError("vllm.server.base_urls is empty")
        if s.reuse_existing:
            spec = None
            kwargs.setdefault("probe", bool(cfg.rollout_matching.repeat_terminate.enabled))
            kwargs.setdefault("eos_token_id", read_eos_token_id(model_dir))
        else:
            if len(urls) > 1 and base_url is None:
                raise ServerStartError(
                    f"vllm.server.base_urls has {len(urls)} URLs but reuse_existing is false: the launcher "
                    "starts one server (scale it with vllm.data_parallel_size), or start several yourself "
                    "and set vllm.server.reuse_existing=true"
                )
            spec = launch_spec_from_config(cfg, model_dir, url)
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

    def _fail(self, msg: str, with_log: bool = True) -> ServerStartError:
        if with_log and self.log_path:
            msg += f"\n--- last {self.log_tail_lines} lines of {self.log_path} ---\n{self.log_tail()}"
        return ServerStartError(msg)

    def start(self) -> RolloutServer:
        t0 = time.monotonic()
        try:
            if self.reuse_existing:
                if not check_health(self.base_url, self.request_timeout_s):
                    raise ServerStartError(
                        f"vllm.server.reuse_existing is true but no healthy server answers "
                        f"{self.base_url}/health/"
                    )
                self.progress(f"reusing the rollout server at {self.base_url}")
            else:
                self._spawn()
                self.timings["spawn"] = time.monotonic() - t0
                self._wait_healthy(t0)
            t_healthy = time.monotonic()
            self.timings["health"] = t_healthy - t0 - self.timings.get("spawn", 0.0)
            try:
                self.world_size = get_world_size(self.base_url, self.request_timeout_s)
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
            raise ServerStartError(
                f"port {spec.port} on {spec.host} is already in use: stop whatever listens "
                f"there, pick another port in vllm.server.base_urls, or set "
                f"vllm.server.reuse_existing=true to use a server that is already running"
            )
        cmd = build_command(spec)
        env = build_env(spec)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed by stop()
            self._log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
            out = self._log_fh
        else:
            out = subprocess.DEVNULL
        self.progress(
            f"starting rollout server on {spec.host}:{spec.port} ({spec.device}); log: {self.log_path}"
        )
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=set_parent_death_signal,  # noqa: PLW1509
            cwd=os.getcwd(),
        )
        self.pgid = self.proc.pid  # session leader: its pid is the process-group id
        atexit.register(self.stop)

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout_s
        next_note = time.monotonic() + self.progress_every_s
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                raise self._fail(
                    f"rollout server exited with code {code} before becoming healthy "
                    f"({time.monotonic() - t0:.1f} s after start)"
                )
            if check_health(self.base_url, timeout_s=min(5.0, self.request_timeout_s)):
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

    def _probe(self) -> None:
        from coordexp.rollout.probe import ProbeError, run_probe

        try:
            self.probe_report = run_probe(
                self.base_url, timeout_s=self.probe_timeout_s, eos_token_id=self.eos_token_id
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


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m coordexp.launch.server [--base-url URL] [--log PATH] +experiment=<leaf> rollout=vllm_server
    [overrides]``: start one rollout server exactly as a run would (same model dir, command, environment,
    probe) and keep it up until SIGINT/SIGTERM - for ``vllm.server.reuse_existing=true`` runs, several
    servers, or sweeps that must not pay a server start per job. Exit code 3 if it cannot be started."""
    import argparse
    import dataclasses

    from coordexp.config.errors import exit_on_config_error
    from coordexp.config.load import compose, to_train_config

    ap = argparse.ArgumentParser(prog="python -m coordexp.launch.server", description=main.__doc__)
    ap.add_argument("--base-url", help="URL to serve (default: the first of vllm.server.base_urls)")
    ap.add_argument("--log", help="server log file (default: runs/servers/<host>_<port>.log)")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        cfg = to_train_config(compose(ns.overrides))
    if getattr(cfg.rollout_matching.rollout_backend, "value", None) != "vllm":
        print("error: select rollout=vllm_server (the config's rollout backend is not the server)",
              file=sys.stderr)
        return 2
    from coordexp.launch.run import LaunchError, resolve_model_dir

    try:
        model_dir = resolve_model_dir(cfg)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    url = ns.base_url or (list(cfg.vllm.server.base_urls) or [None])[0]
    if not url:
        print("error: no URL: pass --base-url or vllm.server.base_urls=[http://host:port]", file=sys.stderr)
        return 2
    parsed = urlparse(url)
    log = Path(ns.log) if ns.log else Path("runs") / "servers" / f"{parsed.hostname}_{parsed.port}.log"
    cfg = dataclasses.replace(cfg, vllm=dataclasses.replace(
        cfg.vllm, server=dataclasses.replace(cfg.vllm.server, reuse_existing=False)))
    try:
        with RolloutServer.from_config(cfg, model_dir=model_dir, log_path=log, base_url=url) as srv:
            _stderr_progress(f"serving {model_dir} at {srv.base_url} (process group {srv.pgid}, log {log}); "
                             f"SIGINT/SIGTERM stops it")
            while srv.alive():
                time.sleep(1.0)
            _stderr_progress(f"the rollout server exited with code {srv.exit_code()}\n{srv.log_tail()}")
            return 3
    except ServerStartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

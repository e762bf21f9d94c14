"""The rollout servers of a run: the model dir they serve, which started servers can be kept between jobs
(:func:`server_key`), the set of servers one run uses (:class:`ServerSet`: started here, or reused), and the
pool that keeps a server set alive across the jobs of a sweep (:class:`ServerPool`, used by the coordexp Hydra
launcher through :func:`shared_servers`).

Several servers: without ``reuse_existing`` every URL of ``vllm.server.base_urls`` gets its own started
server (``server/swift_rollout.<i>.log`` with more than one), each with its slice of the GPUs or cores
(:mod:`coordexp.launch.server_spec`). They start concurrently - spawned one after another on the calling
thread, then health-gated and probed in parallel threads - and the first failure stops them all and names
its URL. The learner's client splits requests over them by world size and the weight sync reaches each."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from coordexp.config.schema import TrainConfig, enum_value
from coordexp.errors import LaunchError
from coordexp.launch.rollout_server import RolloutServer, start_all
from coordexp.protocol import ENV_RUN_ID
from coordexp.repeat_rules import config_to_dict, parse_config
from coordexp.rollout.server_client import check_health
from coordexp.trainer.model_dir import ModelDirError, prepare_model_dir

__all__ = ["SERVER_LOG_NAME", "ServerPool", "ServerSet", "current_pool", "resolve_model_dir", "server_key",
           "shared_servers"]

SERVER_LOG_NAME = "server/swift_rollout{suffix}.log"


def _say(msg: str) -> None:
    print(f"[coordexp launch] {msg}", file=sys.stderr, flush=True)


def resolve_model_dir(cfg: TrainConfig) -> Path:
    """The checkpoint folder the learner will load (and the server must serve)."""
    try:
        return prepare_model_dir(cfg)
    except ModelDirError as err:
        raise LaunchError(f"{err}; nothing was started") from None


def server_key(cfg: TrainConfig, model_dir: Path) -> str:
    """Everything that decides what a started server is; equal keys => the server can be kept."""
    v = OmegaConf.to_container(OmegaConf.structured(cfg.vllm), resolve=True, enum_to_str=True)
    v.pop("sync", None)
    v.pop("learner_gpus", None)
    for k in ("infer_timeout_s", "request_timeout_s", "log_tail_lines", "startup_timeout_s"):
        v["server"].pop(k, None)
    rt = config_to_dict(parse_config(cfg.rollout_matching.repeat_terminate))
    return json.dumps(
        {"model": str(model_dir), "kind": enum_value(cfg.model.kind), "vllm": v, "repeat_terminate": rt},
        sort_keys=True,
    )


class ServerSet:
    """The rollout servers of a run: one started here, or every ``base_url`` reused."""

    def __init__(self, servers: list[Any], key: str, model_dir: Path):
        self.servers = servers
        self.key = key
        self.model_dir = model_dir

    @property
    def started_here(self) -> bool:
        return any(s.spec is not None for s in self.servers)

    @classmethod
    def start(
        cls, cfg: TrainConfig, model_dir: Path, run_dir: Path, run_id: str, weights_root: Path | None = None
    ) -> ServerSet:
        """Start (or check, with ``reuse_existing``) every server of ``vllm.server.base_urls``; raises the
        first :class:`~coordexp.errors.ServerStartError` after stopping all of them. ``weights_root``: the
        folder the started servers may load weight files from (default ``run_dir``)."""
        urls = list(cfg.vllm.server.base_urls)
        reuse = bool(cfg.vllm.server.reuse_existing)
        servers: list[Any] = []
        try:
            for i, url in enumerate(urls):
                suffix = f".{i}" if len(urls) > 1 else ""
                srv = RolloutServer.from_config(
                    cfg, model_dir=model_dir, base_url=url, index=i, count=len(urls),
                    weights_root=weights_root or run_dir,  # a reused server logs where it was started
                    log_path=None if reuse else run_dir / SERVER_LOG_NAME.format(suffix=suffix),
                )
                if srv.spec is not None:
                    srv.spec.extra_env[ENV_RUN_ID] = run_id
                servers.append(srv)
        except BaseException:
            for srv in servers:
                srv.stop()
            raise
        start_all(servers)
        if len(servers) > 1:
            _say(f"{len(servers)} rollout servers ready: " + ", ".join(
                f"{s.base_url} (world_size={s.world_size})" for s in servers))
        return cls(servers, server_key(cfg, model_dir), model_dir)

    def dead(self) -> tuple[Any, int] | None:
        for srv in self.servers:
            code = srv.exit_code()
            if code is not None:
                return srv, code
        return None

    def ended(self, wait_s: float = 0.0) -> tuple[Any, int] | None:
        """A server whose command ended (:meth:`RolloutServer.command_exit_code`: before its supervisor has
        stopped the engine processes), waiting up to ``wait_s`` for one: after a learner failed on a
        connection the server dropped, the supervisor's line may be a moment behind."""
        deadline = time.monotonic() + wait_s
        while True:
            for srv in self.servers:
                code = srv.command_exit_code()
                if code is not None:
                    return srv, code
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def healthy(self) -> bool:
        return self.dead() is None and all(
            check_health(s.base_url, s.request_timeout_s, api_key=s.api_key) for s in self.servers
        )

    def log_tails(self) -> str:
        parts = []
        for srv in self.servers:
            if srv.spec is not None and srv.log_path:
                parts.append(f"--- last {srv.log_tail_lines} lines of {srv.log_path} ---\n{srv.log_tail()}")
        return "\n".join(parts)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.servers]

    def stop(self) -> None:
        for srv in self.servers:
            srv.stop()


class ServerPool:
    """Keeps one server set alive across the jobs of a sweep (used by the coordexp Hydra launcher)."""

    def __init__(self, weights_root: Path | None = None) -> None:
        self.current: ServerSet | None = None
        self.jobs_served = 0
        #: where the pool's servers may load weight files: the sweep dir (every job's run dir is under it)
        self.weights_root = weights_root

    def acquire(
        self, cfg: TrainConfig, model_dir: Path, run_dir: Path, run_id: str
    ) -> tuple[ServerSet, bool]:
        """(servers, fresh): fresh = started now, so it holds the initial checkpoint's weights."""
        key = server_key(cfg, model_dir)
        cur = self.current
        if cur is not None:
            if cur.key == key and cur.healthy():
                self.jobs_served += 1
                _say(
                    f"keeping the sweep's rollout server(s) {[s.base_url for s in cur.servers]} "
                    f"(job {self.jobs_served + 1}); the learner re-syncs weights before its first rollout"
                )
                return cur, False
            _say("server settings changed between sweep jobs (or the server is unhealthy): restarting it")
            self.close()
        root = self.weights_root or run_dir.parent  # a sweep's jobs: <sweep dir>/<job subdir>
        self.current = ServerSet.start(cfg, model_dir, run_dir, run_id, weights_root=root)
        self.jobs_served = 0
        return self.current, True

    def release(self, ok: bool) -> None:
        if not ok and self.current is not None:
            _say("a sweep job failed: stopping its rollout server (the next job starts a fresh one)")
            self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


_POOL: ServerPool | None = None


def current_pool() -> ServerPool | None:
    """The sweep's server pool while :func:`shared_servers` is active, else None."""
    return _POOL


@contextlib.contextmanager
def shared_servers(weights_root: Path | None = None) -> Iterator[ServerPool]:
    """Within the block, run_experiment keeps servers between calls (the sweep launcher uses this, with the
    sweep dir as ``weights_root``)."""
    global _POOL
    prev, _POOL = _POOL, ServerPool(weights_root)
    try:
        yield _POOL
    finally:
        pool, _POOL = _POOL, prev
        pool.close()

"""The rollout servers of a run: the model dir they serve, which started servers can be kept between jobs
(:func:`server_key`), the set of servers one run uses (:class:`ServerSet`: started here, or reused), and the
pool that keeps a server set alive across the jobs of a sweep (:class:`ServerPool`, used by the coordexp Hydra
launcher through :func:`shared_servers`)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from coordexp.config.schema import TrainConfig, enum_value
from coordexp.errors import LaunchError
from coordexp.launch.rollout_server import RolloutServer
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
    def start(cls, cfg: TrainConfig, model_dir: Path, run_dir: Path, run_id: str) -> ServerSet:
        urls = list(cfg.vllm.server.base_urls)
        servers: list[Any] = []
        try:
            if cfg.vllm.server.reuse_existing:
                for i, url in enumerate(urls):
                    servers.append(
                        RolloutServer.from_config(
                            cfg,
                            model_dir=model_dir,
                            base_url=url,
                            log_path=run_dir / SERVER_LOG_NAME.format(suffix=f".{i}"),
                        )
                    )
            else:
                srv = RolloutServer.from_config(
                    cfg, model_dir=model_dir, log_path=run_dir / SERVER_LOG_NAME.format(suffix="")
                )
                srv.spec.extra_env[ENV_RUN_ID] = run_id
                servers.append(srv)
            for srv in servers:
                srv.start()
        except BaseException:
            for srv in servers:
                srv.stop()
            raise
        return cls(servers, server_key(cfg, model_dir), model_dir)

    def dead(self) -> tuple[Any, int] | None:
        for srv in self.servers:
            code = srv.exit_code()
            if code is not None:
                return srv, code
        return None

    def healthy(self) -> bool:
        return self.dead() is None and all(
            check_health(s.base_url, s.request_timeout_s) for s in self.servers
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

    def __init__(self) -> None:
        self.current: ServerSet | None = None
        self.jobs_served = 0

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
        self.current = ServerSet.start(cfg, model_dir, run_dir, run_id)
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
def shared_servers() -> Iterator[ServerPool]:
    """Within the block, run_experiment keeps servers between calls (the sweep launcher uses this)."""
    global _POOL
    prev, _POOL = _POOL, ServerPool()
    try:
        yield _POOL
    finally:
        pool, _POOL = _POOL, prev
        pool.close()

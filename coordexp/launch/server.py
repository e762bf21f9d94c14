"""``python -m coordexp.launch.server``: start one rollout server exactly as a run would and keep it up."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from coordexp.config.load import compose, to_train_config
from coordexp.config.schema import enum_value
from coordexp.config.validate import server_problems, url_problem
from coordexp.errors import ConfigError, CoordexpError, ServerStartError, exit_on_error
from coordexp.launch.rollout_server import RolloutServer, say
from coordexp.launch.servers import resolve_model_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m coordexp.launch.server [--base-url URL] [--log PATH] +experiment=<leaf> rollout=vllm_server
    [overrides]``: start one rollout server exactly as a run would (same model dir, command, environment,
    probe) and keep it up until SIGINT/SIGTERM - for ``vllm.server.reuse_existing=true`` runs, several
    servers, or sweeps that must not pay a server start per job. Exit code 3 if it cannot be started."""
    ap = argparse.ArgumentParser(prog="python -m coordexp.launch.server", description=main.__doc__)
    ap.add_argument("--base-url", help="URL to serve (default: the first of vllm.server.base_urls)")
    ap.add_argument("--log", help="server log file (default: runs/servers/<host>_<port>.log)")
    ap.add_argument("--weights-root", default="runs",
                    help="the folder the runs that reuse this server write into (their run dirs must be "
                         "under it: the server loads synced weights only from there; default: runs)")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_error():
        cfg = to_train_config(compose(ns.overrides))
        if enum_value(cfg.rollout_matching.rollout_backend) != "vllm":
            raise CoordexpError("select rollout=vllm_server (the config's rollout backend is not the server)")
        url = ns.base_url or (list(cfg.vllm.server.base_urls) or [None])[0]
        if not url:
            raise CoordexpError("no URL: pass --base-url or vllm.server.base_urls=[http://host:port]")
        if url_problem(url):  # --base-url skips the config's URL check
            raise ConfigError([f"--base-url: {url_problem(url)}"])
        cfg = dataclasses.replace(cfg, vllm=dataclasses.replace(
            cfg.vllm, server=dataclasses.replace(cfg.vllm.server, reuse_existing=False, base_urls=[url])))
        # the config's server rules for the URL served here: the bind host answers it, an API key beyond
        # loopback (else the server binds 127.0.0.1 and the health check waits for a URL nobody answers)
        problems = server_problems(cfg)
        if problems:
            raise ConfigError([f"{p} (serving {url})" for p in problems])
        model_dir = resolve_model_dir(cfg)
        parsed = urlparse(url)
        log = Path(ns.log) if ns.log else Path("runs") / "servers" / f"{parsed.hostname}_{parsed.port}.log"
        busy = ("stop whatever listens there (a coordexp server already running there serves runs with "
                "vllm.server.reuse_existing=true as it is), or serve another port with --base-url")
        root = Path(ns.weights_root).resolve()
        with RolloutServer.from_config(cfg, model_dir=model_dir, log_path=log, base_url=url,
                                       weights_root=root, busy_port_fix=busy) as srv:
            say(f"serving {model_dir} at {srv.base_url} (process group {srv.pgid}, log {log}); "
                f"SIGINT/SIGTERM stops it")
            while srv.alive():
                time.sleep(1.0)
            raise ServerStartError(f"the rollout server exited with code {srv.exit_code()}\n{srv.log_tail()}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

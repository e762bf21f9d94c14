"""Hydra launcher ``hydra/launcher=coordexp``: a sweep's jobs run one after another through coordexp's run
lifecycle, and one rollout server is kept across jobs.

    python -m coordexp.train -m hydra/launcher=coordexp +experiment=smoke/ab_mixed rollout=vllm_server \\
        stage2_ab.schedule.b_ratio=0.25,0.5

Each job is Hydra's own ``run_job`` on the job's config, i.e. the same task function a plain run executes
(``coordexp.train.hydra_task`` -> ``coordexp.launch.run.run_experiment``): config check, metadata, server,
probe, learner, teardown. The difference is a :class:`coordexp.launch.servers.ServerPool` around the jobs:

* the first job starts the server; a later job whose server settings (model dir, ``vllm.*`` server knobs,
  repeat-terminate subtree) are equal keeps it, and its learner pushes its own weights before its first
  rollout (the server still holds the previous job's weights, so the launcher never claims "initial");
* a job with different server settings, a failed job, or an unhealthy server means stop + fresh start;
* the server is stopped when the sweep ends, fails, or gets SIGINT/SIGTERM.

``share_server: false`` gives every job its own server (Hydra's basic launcher behaves the same way).
Jobs are sequential: on one node the server and the learner already share the machine. For parallel jobs
on a cluster use Hydra's submitit launcher; each job then runs the full lifecycle with its own server.

Why a plain run does not use this launcher: Hydra instantiates launchers only in MULTIRUN mode (a plain run
calls the task function directly), so the lifecycle itself lives in the task function and this launcher only
adds server sharing on top of it.

Hydra scans ``hydra_plugins.*`` and imports every module: keep imports here light (coordexp is imported
inside ``launch``).
"""

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class CoordexpLauncherConf:
    _target_: str = "hydra_plugins.coordexp_launcher.coordexp_launcher.CoordexpLauncher"
    #: keep one rollout server across jobs whose server settings are equal
    share_server: bool = True


ConfigStore.instance().store(
    group="hydra/launcher", name="coordexp", node=CoordexpLauncherConf, provider="coordexp"
)


class CoordexpLauncher(Launcher):
    def __init__(self, share_server: bool = True) -> None:
        super().__init__()
        self.share_server = bool(share_server)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from coordexp.launch.process import terminate_on_signals
        from coordexp.launch.servers import shared_servers

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            f"coordexp launcher: {len(job_overrides)} job(s), sequential, "
            f"{'one shared' if self.share_server else 'a fresh'} rollout server per "
            f"{'sweep' if self.share_server else 'job'} (server-mode jobs only)"
        )
        runs: list[JobReturn] = []
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()  # the servers load weights under it
        pool_cm = shared_servers(sweep_dir) if self.share_server else contextlib.nullcontext()
        with terminate_on_signals(), pool_cm:
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                sweep_config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(overrides)
                )
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = idx
                    sweep_config.hydra.job.num = idx
                runs.append(
                    run_job(
                        hydra_context=self.hydra_context,
                        task_function=self.task_function,
                        config=sweep_config,
                        job_dir_key="hydra.sweep.dir",
                        job_subdir_key="hydra.sweep.subdir",
                    )
                )
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

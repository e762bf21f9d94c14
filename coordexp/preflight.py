"""`python -m coordexp.preflight +experiment=<leaf> [overrides]`: resolve the config exactly as the
learner does and print the launcher contract as one JSON object on stdout (no GPU, no download, any cwd),
with the memory plan (coordexp.planning) under ``memory_plan`` and as a table on stderr. A plan above the
device memory (``training.device_memory_gib``, else the detected GPU) exits 2 with the table and the fixes."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from coordexp.config.contract import rollout_contract, server_image_root
from coordexp.config.errors import exit_on_config_error, raise_if
from coordexp.config.gpus import cuda_server, gpu_plan, gpu_plan_problem
from coordexp.config.load import compose, hydra_dir_of, start_problems, to_train_config
from coordexp.config.schema import TrainConfig
from coordexp.config.validate import config_warnings
from coordexp.errors import CoordexpError
from coordexp.repeat_rules import config_to_dict


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    contract = rollout_contract(cfg)
    v = cfg.vllm
    on_cuda = cuda_server(cfg)
    return {
        "experiment": cfg.experiment,
        "rollout_backend": contract.backend,
        "vllm_mode": contract.vllm_mode,
        "server_base_urls": list(contract.server_base_urls),
        "server_reuse_existing": v.server.reuse_existing if contract.vllm_mode else None,
        "server_device": v.device.value if contract.vllm_mode else None,
        # ROOT_IMAGE_DIR of the server; request image paths are relative to the training JSONL's folder
        "server_image_root": server_image_root(cfg) if contract.vllm_mode else None,
        "model_kind": cfg.model.kind.value,
        # the checkpoint the server serves; the tiny model's folder is built at launch (see tiny_model_cache)
        "server_model": cfg.model.path if cfg.model.kind.value == "local" else None,
        "tiny_model_cache": cfg.model.path if cfg.model.kind.value == "tiny" else None,
        "server_dtype": v.dtype.value,
        "vllm_max_model_len": v.max_model_len,
        "server_data_parallel_size": v.data_parallel_size,
        "server_tensor_parallel_size": v.tensor_parallel_size,
        # GPU lists apply to a server on CUDA only (the launcher pins the learner to learner_gpus then)
        "server_gpus": list(v.server_gpus) if on_cuda else [],
        "learner_gpus": list(v.learner_gpus) if on_cuda else [],
        "learner_nproc_per_node": cfg.training.nproc_per_node,
        "sync_mode": contract.sync_mode,
        "sync_transport": contract.sync_transport,
        "decode_batch_size": contract.decode_batch_size,
        "max_new_tokens": contract.max_new_tokens,
        "repeat_terminate": config_to_dict(contract.repeat_terminate),
        "output_dir": cfg.training.output_dir,
        # the GPUs the plan needs and those this machine shows (a plan can be checked on a login node)
        "gpu_plan": gpu_plan(cfg),
    }


class PlanTooLarge(CoordexpError):
    """The memory plan is above the device memory (exit 2; the message holds the table and the fixes)."""


def memory_section(cfg: TrainConfig) -> tuple[dict[str, Any], str]:
    """(``memory_plan`` JSON, the table). A plan that cannot be made (e.g. the checkpoint is on another
    machine) is reported, not fatal, unless ``training.device_memory_gib`` asks for the check (PlanError)."""
    # kept lazy: the planner loads torch/transformers/peft; a config error is reported without them
    from coordexp.planning.inventory import PlanError
    from coordexp.planning.memory import memory_plan
    from coordexp.planning.report import plan_table

    try:
        plan = memory_plan(cfg)
    except PlanError as err:
        if cfg.training.device_memory_gib is not None:
            raise PlanError(f"training.device_memory_gib is set but the memory plan cannot be made: {err}"
                            ) from None
        return {"error": str(err)}, f"warning: no memory plan: {err}"
    return plan.to_json(), plan_table(plan, cfg)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error():
        composed = compose(argv)
        cfg = to_train_config(composed)
        # what the run itself checks first (the GPUs: a warning below; a login node has none)
        raise_if(start_problems(cfg, argv, hydra_dir_of(composed), this_machine=False))
        contract = preflight(cfg)
        plan, table = memory_section(cfg)
        contract["memory_plan"] = plan
        print(json.dumps(contract, sort_keys=True), flush=True)
        if plan.get("fits") is False:
            raise PlanTooLarge(f"the memory plan of +experiment={cfg.experiment} does not fit the device:\n"
                            f"{table}")
        print(table, file=sys.stderr)
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    problem = gpu_plan_problem(contract["gpu_plan"], cfg.experiment)
    if problem:  # the contract stands (e.g. checked on a login node); the plan does not fit this machine
        print(f"warning: {problem}", file=sys.stderr)


if __name__ == "__main__":
    main()

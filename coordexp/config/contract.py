"""`rollout_matching.*` (+ the server part of `vllm.*`) normalized into one typed contract.

The trainer, the eval loop and the rollout backends receive this object and nothing else about
rollouts; `decode_batch_size` is the single micro-batching knob for rollout decode and eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordexp.config.schema import RepeatTerminateConfig, TrainConfig


@dataclass(frozen=True)
class RolloutContract:
    backend: str                     # "hf" | "vllm"
    server_base_urls: tuple[str, ...]
    server_dtype: str                # what the server holds: weight sync casts to it
    decode_batch_size: int           # rollout micro-batch (train and eval)
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    candidate_top_k: int
    iou_gate: float
    fp_cost: float
    fn_cost: float
    object_field_order: str
    repeat_terminate: RepeatTerminateConfig
    infer_timeout_s: float
    request_timeout_s: float
    sync_mode: str
    sync_transport: str
    sync_timeout_s: float
    sync_bucket_mib: int             # bucket size of a sharded learner's gather (vllm.sync.bucket_mib)
    image_root: str                  # request image paths are relative to it (learner_image_root)
    pipeline: bool                   # pipelined Channel-B rollouts (server mode only)

    @property
    def vllm_mode(self) -> str | None:
        """``server`` with the vLLM backend (a separately launched ``swift rollout``), else None."""
        return "server" if self.backend == "vllm" else None


def rollout_contract(cfg: TrainConfig) -> RolloutContract:
    rm, v = cfg.rollout_matching, cfg.vllm
    server = rm.rollout_backend.value == "vllm"
    return RolloutContract(
        backend=rm.rollout_backend.value,
        server_base_urls=tuple(v.server.base_urls) if server else (),
        server_dtype=v.dtype.value,
        decode_batch_size=rm.decode_batch_size,
        max_new_tokens=rm.max_new_tokens,
        temperature=rm.decoding.temperature,
        top_p=rm.decoding.top_p,
        top_k=rm.decoding.top_k,
        repetition_penalty=rm.repetition_penalty,
        candidate_top_k=rm.candidate_top_k,
        iou_gate=rm.iou_gate,
        fp_cost=rm.fp_cost,
        fn_cost=rm.fn_cost,
        object_field_order=cfg.data.object_field_order.value,
        repeat_terminate=rm.repeat_terminate,
        infer_timeout_s=v.server.infer_timeout_s,
        request_timeout_s=v.server.request_timeout_s,
        sync_mode=v.sync.mode.value,
        sync_transport=v.sync.transport.value,
        sync_timeout_s=v.sync.timeout_s,
        sync_bucket_mib=v.sync.bucket_mib,
        image_root=learner_image_root(cfg),
        pipeline=server and (rm.pipeline if rm.pipeline is not None else True),
    )


def learner_image_root(cfg: TrainConfig) -> str:
    """The folder image paths in rollout requests are relative to: the training JSONL's folder (synthetic
    data: the run's data/ folder). The server's ROOT_IMAGE_DIR is ``vllm.server.image_root``, else this."""
    if cfg.data.kind.value == "jsonl" and cfg.data.train_jsonl:
        return str(Path(cfg.data.train_jsonl).resolve().parent)
    return str((Path(cfg.training.output_dir) / "data").resolve())


def server_image_root(cfg: TrainConfig) -> str:
    """The server's ROOT_IMAGE_DIR: ``vllm.server.image_root``, else :func:`learner_image_root` (a shared
    filesystem)."""
    return cfg.vllm.server.image_root or learner_image_root(cfg)

"""Range and cross-field rules, checked once after composition; every violation reported at once."""

from __future__ import annotations

from urllib.parse import urlparse

from coordexp.config.schema import (
    IntervalStrategy,
    ModelKind,
    RolloutBackend,
    ServerDevice,
    SyncMode,
    TrainConfig,
    VllmMode,
)


def derived_grad_accumulation(cfg: TrainConfig) -> int:
    t = cfg.training
    return t.effective_batch_size // (t.per_device_train_batch_size * t.nproc_per_node)


def _url_problem(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.port is None:
        return f"'{url}' is not http(s)://host:port"
    return None


def problems(cfg: TrainConfig) -> list[str]:
    out: list[str] = []

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            out.append(f"{path}: {message}")

    t, ab, rm, v = cfg.training, cfg.stage2_ab, cfg.rollout_matching, cfg.vllm
    need(0.0 <= ab.schedule.b_ratio <= 1.0, "stage2_ab.schedule.b_ratio",
         f"{ab.schedule.b_ratio} is outside [0, 1]")
    need(ab.n_softctx_iter == 1, "stage2_ab.n_softctx_iter",
         f"{ab.n_softctx_iter}: soft self-context passes are not implemented yet; "
         "use 1 (plain teacher forcing)")
    need(ab.softctx_temperature > 0, "stage2_ab.softctx_temperature", "must be > 0")
    need(ab.bbox_smoothl1_beta > 0, "stage2_ab.bbox_smoothl1_beta", "must be > 0")
    for name in ("desc_ce_weight", "bbox_smoothl1_weight", "bbox_ciou_weight", "coord_ce_weight",
                 "coord_gate_weight"):
        need(getattr(ab, name) >= 0, f"stage2_ab.{name}", "must be >= 0")
    mult = ab.channel_b.drop_invalid_struct_ce_multiplier
    need(1.0 <= mult <= 4.0, "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier",
         f"{mult} is outside [1, 4]")

    need(t.learning_rate > 0, "training.learning_rate", "must be > 0")
    for name in ("effective_batch_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "nproc_per_node", "max_steps", "logging_steps"):
        need(getattr(t, name) >= 1, f"training.{name}", "must be >= 1")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"):
        need(getattr(t, name) >= 0, f"training.{name}", "must be >= 0")
    if t.eval_strategy == IntervalStrategy.steps:
        need(t.eval_steps >= 1, "training.eval_steps", "must be >= 1 with eval_strategy: steps")
    if t.save_strategy == IntervalStrategy.steps:
        need(t.save_steps >= 1, "training.save_steps", "must be >= 1 with save_strategy: steps")
    if t.save_total_limit is not None:
        need(t.save_total_limit >= 1, "training.save_total_limit", "must be >= 1 or null")
    per_step = t.per_device_train_batch_size * t.nproc_per_node
    if t.effective_batch_size >= 1 and per_step >= 1:
        need(t.effective_batch_size % per_step == 0, "training.effective_batch_size",
             f"{t.effective_batch_size} is not divisible by per_device_train_batch_size x nproc_per_node "
             f"= {per_step}")
        if t.gradient_accumulation_steps is not None and t.effective_batch_size % per_step == 0:
            derived = t.effective_batch_size // per_step
            need(t.gradient_accumulation_steps == derived, "training.gradient_accumulation_steps",
                 f"{t.gradient_accumulation_steps} conflicts with the derived value {derived}; leave it null")

    need(rm.decode_batch_size >= 1, "rollout_matching.decode_batch_size", "must be >= 1")
    need(rm.max_new_tokens >= 1, "rollout_matching.max_new_tokens", "must be >= 1")
    need(rm.repetition_penalty > 0, "rollout_matching.repetition_penalty", "must be > 0")
    need(rm.decoding.temperature >= 0, "rollout_matching.decoding.temperature", "must be >= 0 (0 = greedy)")
    need(0 < rm.decoding.top_p <= 1, "rollout_matching.decoding.top_p", "must be in (0, 1]")
    need(rm.decoding.top_k == -1 or rm.decoding.top_k >= 1, "rollout_matching.decoding.top_k",
         "must be -1 (off) or >= 1")
    need(rm.candidate_top_k >= 1, "rollout_matching.candidate_top_k", "must be >= 1")
    need(0 <= rm.iou_gate <= 1, "rollout_matching.iou_gate", "must be in [0, 1]")
    need(rm.fp_cost >= 0 and rm.fn_cost >= 0, "rollout_matching.fp_cost/fn_cost", "must be >= 0")
    rt = rm.repeat_terminate
    for name in ("min_new_tokens", "max_consecutive_token_repeats", "ngram_size", "ngram_repeats"):
        need(getattr(rt, name) >= 0, f"rollout_matching.repeat_terminate.{name}", "must be >= 0")
    need(rt.ngram_repeats != 1, "rollout_matching.repeat_terminate.ngram_repeats",
         "must be 0 (off) or >= 2: one occurrence is not a repeat")
    need((rt.ngram_size == 0) == (rt.ngram_repeats == 0), "rollout_matching.repeat_terminate.ngram_size",
         "ngram_size and ngram_repeats must be both 0 (rule off) or both set")
    if rt.max_object_keys is not None:
        need(rt.max_object_keys >= 1, "rollout_matching.repeat_terminate.max_object_keys",
             "must be >= 1 or null")

    data = cfg.data
    if data.kind.value == "jsonl":
        need(bool(data.train_jsonl), "data.train_jsonl", "is required with data.kind: jsonl")
    syn = data.synthetic
    need(1 <= syn.min_objects <= syn.max_objects, "data.synthetic.min_objects/max_objects",
         "need 1 <= min_objects <= max_objects")
    need(syn.train_samples >= 1 and syn.val_samples >= 1, "data.synthetic.train_samples/val_samples",
         "must be >= 1")
    need(syn.image_cell >= 2, "data.synthetic.image_cell", "must be >= 2 pixels")
    need(bool(cfg.model.path), "model.path", "is required")

    server_mode = rm.rollout_backend == RolloutBackend.vllm
    need(server_mode == (v.mode == VllmMode.server), "vllm.mode",
         f"is {v.mode.value if v.mode else 'null'} but rollout_matching.rollout_backend is "
         f"{rm.rollout_backend.value}: select rollout=vllm_server (or rollout=hf) instead of setting "
         "them apart")
    if server_mode:
        need(len(v.server.base_urls) >= 1, "vllm.server.base_urls", "server mode needs at least one URL")
        for i, url in enumerate(v.server.base_urls):
            bad = _url_problem(url)
            need(bad is None, f"vllm.server.base_urls[{i}]", bad or "")
        need(rm.max_new_tokens < v.max_model_len, "rollout_matching.max_new_tokens",
             f"{rm.max_new_tokens} must be < vllm.max_model_len ({v.max_model_len})")
        if t.nproc_per_node > 1:
            need(v.sync.mode == SyncMode.full, "vllm.sync.mode",
                 f"must be full with more than one learner process (nproc_per_node={t.nproc_per_node})")
        need(v.data_parallel_size >= 1 and v.tensor_parallel_size >= 1,
             "vllm.data_parallel_size/tensor_parallel_size", "must be >= 1")
        need(0 < v.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", "must be in (0, 1]")
        for name in ("startup_timeout_s", "infer_timeout_s", "request_timeout_s"):
            need(getattr(v.server, name) > 0, f"vllm.server.{name}", "must be > 0 (no unbounded waits)")
        need(v.sync.timeout_s > 0, "vllm.sync.timeout_s", "must be > 0")
        if v.device == ServerDevice.cuda and not v.server.reuse_existing:
            overlap = sorted(set(v.server_gpus) & set(v.learner_gpus))
            need(not overlap, "vllm.server_gpus", f"overlaps vllm.learner_gpus on GPUs {overlap}")
            need(len(v.server_gpus) == v.data_parallel_size * v.tensor_parallel_size, "vllm.server_gpus",
                 f"{len(v.server_gpus)} GPUs != data_parallel_size x tensor_parallel_size "
                 f"({v.data_parallel_size} x {v.tensor_parallel_size})")
            if v.learner_gpus:
                need(len(v.learner_gpus) == t.nproc_per_node, "vllm.learner_gpus",
                     f"{len(v.learner_gpus)} GPUs != training.nproc_per_node ({t.nproc_per_node})")
        if v.device == ServerDevice.cpu:
            need(v.sync.transport.value == "file", "vllm.sync.transport",
                 "NCCL does not work on CPU; use file")
    need(cfg.model.tiny_stage1_steps >= 0, "model.tiny_stage1_steps", "must be >= 0")
    if cfg.model.kind == ModelKind.tiny:
        need(cfg.model.dtype.value == "float32", "model.dtype", "the tiny model trains in float32 on CPU")
        tiny_vl = cfg.model.tiny_arch.value.endswith("_vl")
        need(tiny_vl or not (data.kind.value == "synthetic" and syn.images), "data.synthetic.images",
             f"the tiny {cfg.model.tiny_arch.value} model is text-only and cannot read images: "
             f"use model=tiny_vl (model.tiny_arch=qwen2_vl) or data.synthetic.images=false")
        need(not (tiny_vl and server_mode), "rollout",
             "the tiny VLM runs with rollout=hf only: vLLM's Qwen2-VL needs torchvision (absent from the CPU "
             "stack) and ms-swift's qwen2_vl template expects Qwen's own vision-token ids (docs/vlm.md)")
    return out

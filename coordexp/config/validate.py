"""Range and cross-field rules, checked once after composition; every violation reported at once."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from coordexp.config.gpus import visible_gpus
from coordexp.config.schema import (
    DType,
    IntervalStrategy,
    ModelKind,
    Precision,
    RolloutBackend,
    ServerDevice,
    SyncMode,
    TrainConfig,
    enum_value,
)
from coordexp.config.value_rules import MAX_WAIT_S, kind_of, nonfinite_keys, value_problems
from coordexp.protocol import ENV_SERVER_API_KEY, is_loopback_host
from coordexp.repeat_rules import config_to_dict
from coordexp.repeat_rules import problems as repeat_terminate_problems

#: Soft self-context passes a config may ask for: each is a full forward whose graph stays alive
MAX_SOFTCTX_ITER = 16
#: GiB no single accelerator comes near (an H200 has 141): a larger training.device_memory_gib is a typo
MAX_DEVICE_GIB = 4096
# patch_size x merge_size (px) of the tiny vision-language models (coordexp.models.tiny; a test keeps it true)
TINY_VL_IMAGE_UNIT = {"qwen2_vl": 28, "qwen2_5_vl": 28, "qwen3_vl": 32}


def learner_world_size(cfg: TrainConfig) -> int:
    """Learner ranks over all nodes: training.nproc_per_node x training.nnodes."""
    return cfg.training.nproc_per_node * max(cfg.training.nnodes, 1)


def learner_on_cpu(cfg: TrainConfig) -> bool:
    """The config runs the learner on CPU: server mode with ``vllm.device: cpu`` (so no FSDP)."""
    return cfg.rollout_matching.rollout_backend == RolloutBackend.vllm and cfg.vllm.device == ServerDevice.cpu


def derived_grad_accumulation(cfg: TrainConfig) -> int:
    t = cfg.training
    return t.effective_batch_size // (t.per_device_train_batch_size * learner_world_size(cfg))


def url_problem(url: object) -> str | None:
    """Why ``url`` is not a server URL ``http(s)://host:port``; None when it is one (the one URL rule)."""
    if not isinstance(url, str):
        return f"{kind_of(url)} {url!r} is not a URL: each item is one string http(s)://host:port"
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as err:  # a non-numeric or out-of-range port, a malformed IPv6 host
        return f"'{url}' is not http(s)://host:port ({err}; the port is an integer 1..65535)"
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        return f"'{url}' is not http(s)://host:port"
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        return (f"'{url}' has a path; a base URL is http(s)://host:port only (the client adds the routes: "
                f"/infer/, /health/, ...)")
    if port == 0:
        return f"'{url}': port 0 is not a port a server listens on (use 1..65535)"
    return None


def server_problems(cfg: TrainConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """The rollout-server rules of server mode that are not plain ranges: distinct ports for the servers
    the launcher starts, an API key (:data:`~coordexp.protocol.ENV_SERVER_API_KEY` in ``environ``, default
    ``os.environ``) for any server reachable beyond loopback, and a runnable ``vllm.server.python``."""
    s = cfg.vllm.server
    env = os.environ if environ is None else environ
    out: list[str] = []
    parsed = [urlparse(u) for u in s.base_urls if isinstance(u, str) and url_problem(u) is None]
    if not s.reuse_existing:
        ports = [p.port for p in parsed]
        dup = sorted({p for p in ports if ports.count(p) > 1})
        if dup:
            out.append(f"vllm.server.base_urls: port(s) {dup} appear more than once; the launcher starts one "
                       "server per URL, each on its own port")
    if not s.reuse_existing and s.host and is_loopback_host(s.host):
        far = [p.geturl() for p in parsed if not is_loopback_host(p.hostname or "")]
        if far:
            out.append(f"vllm.server.base_urls: {', '.join(far)} is not a loopback address, but the servers "
                       f"the launcher starts bind vllm.server.host={s.host}, so nothing answers there: set "
                       f"vllm.server.host=0.0.0.0 (with an API key), or use http://127.0.0.1:<port>")
    local = s.reuse_existing or not s.host or is_loopback_host(s.host)  # an empty host: its own rule
    exposed = [] if local else [f"vllm.server.host={s.host}"]
    exposed += [p.geturl() for p in parsed if not is_loopback_host(p.hostname or "")]
    if exposed and not env.get(ENV_SERVER_API_KEY):
        out.append(f"vllm.server: {', '.join(exposed)} is reachable beyond this machine, so the servers need "
                   f"an API key: export {ENV_SERVER_API_KEY}=<secret> (e.g. `python -c \"import secrets; "
                   "print(secrets.token_urlsafe(32))\"`) on every node, or bind to 127.0.0.1")
    if s.python is not None and not s.reuse_existing:
        py = Path(s.python).expanduser()
        if not (py.is_absolute() and py.is_file() and os.access(py, os.X_OK)):
            out.append(f"vllm.server.python: {s.python} is not an executable file (an absolute path such as "
                       "/opt/server-venv/bin/python; null = the learner's Python)")
    return out


def problems(cfg: TrainConfig, training: bool = True) -> list[str]:
    """Every problem of ``cfg`` as ``"<key>: <what is wrong>"`` (empty: valid). ``training``: the config
    is for training (an evaluation needs no training data)."""
    out: list[str] = []
    nonfinite = nonfinite_keys(cfg)  # "nan is not a finite number" says more than a range rule's message

    def need(ok: bool, path: str, message: str) -> None:
        if not ok and path not in nonfinite:
            out.append(f"{path}: {message}")

    t, ab, rm, v = cfg.training, cfg.stage2_ab, cfg.rollout_matching, cfg.vllm
    need(0.0 <= ab.schedule.b_ratio <= 1.0, "stage2_ab.schedule.b_ratio",
         f"{ab.schedule.b_ratio} is outside [0, 1]")
    need(1 <= ab.n_softctx_iter <= MAX_SOFTCTX_ITER, "stage2_ab.n_softctx_iter",
         f"{ab.n_softctx_iter} must be in [1, {MAX_SOFTCTX_ITER}] (1 = plain teacher forcing; each pass is a "
         f"full forward, the production leaves use 2)")
    need(ab.softctx_temperature > 0, "stage2_ab.softctx_temperature", "must be > 0")
    need(ab.bbox_smoothl1_beta > 0, "stage2_ab.bbox_smoothl1_beta", "must be > 0")
    for name in ("desc_ce_weight", "bbox_smoothl1_weight", "bbox_ciou_weight", "coord_ce_weight",
                 "coord_gate_weight"):
        need(getattr(ab, name) >= 0, f"stage2_ab.{name}", "must be >= 0")
    mult = ab.channel_b.drop_invalid_struct_ce_multiplier
    need(1.0 <= mult <= 4.0, "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier",
         f"{mult} is outside [1, 4]")

    need(t.learning_rate > 0, "training.learning_rate", "must be > 0")
    if t.device_memory_gib is not None:
        need(0 < t.device_memory_gib <= MAX_DEVICE_GIB, "training.device_memory_gib",
             f"{t.device_memory_gib} must be in (0, {MAX_DEVICE_GIB}] (GiB of one GPU, e.g. 80), or null for "
             f"the detected GPU's")
    for name in ("effective_batch_size", "per_device_train_batch_size", "nproc_per_node", "max_steps",
                 "logging_steps"):
        need(getattr(t, name) >= 1, f"training.{name}", "must be >= 1")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"):
        need(getattr(t, name) >= 0, f"training.{name}", "must be >= 0")
    if t.eval_strategy == IntervalStrategy.steps:
        need(t.eval_steps >= 1, "training.eval_steps", "must be >= 1 with eval_strategy: steps")
    if t.save_strategy == IntervalStrategy.steps:
        need(t.save_steps >= 1, "training.save_steps", "must be >= 1 with save_strategy: steps")
    if t.save_total_limit is not None:
        need(t.save_total_limit >= 1, "training.save_total_limit", "must be >= 1 or null")
    world = learner_world_size(cfg)
    per_step = t.per_device_train_batch_size * world
    if t.effective_batch_size >= 1 and per_step >= 1:
        need(t.effective_batch_size % per_step == 0, "training.effective_batch_size",
             f"{t.effective_batch_size} is not divisible by per_device_train_batch_size x nproc_per_node "
             f"x nnodes = {per_step}")
        if t.gradient_accumulation_steps is not None and t.effective_batch_size % per_step == 0:
            derived = t.effective_batch_size // per_step
            need(t.gradient_accumulation_steps == derived, "training.gradient_accumulation_steps",
                 f"{t.gradient_accumulation_steps} conflicts with the derived value {derived}; leave it null")

    need(rm.decode_batch_size >= 1, "rollout_matching.decode_batch_size", "must be >= 1")
    if t.packing:
        need(t.packing_length > rm.max_new_tokens, "training.packing_length",
             f"{t.packing_length} leaves no room for a prompt: a Channel-B segment is the prompt + up to "
             f"rollout_matching.max_new_tokens ({rm.max_new_tokens}) tokens and must fit one pack; raise it "
             f"above {rm.max_new_tokens} + your longest prompt + answer, or lower "
             f"rollout_matching.max_new_tokens")
        per_rank = t.effective_batch_size // max(world, 1)
        need(t.packing_buffer >= per_rank, "training.packing_buffer",
             f"{t.packing_buffer} < the {per_rank} samples one rank trains per step "
             f"(effective_batch_size / (nproc_per_node x nnodes)); raise it")
        need(0.0 <= t.packing_min_fill_ratio <= 1.0, "training.packing_min_fill_ratio", "must be in [0, 1]")
    if rm.pipeline and rm.rollout_backend != RolloutBackend.vllm:
        need(False, "rollout_matching.pipeline", "pipelined rollouts need rollout=vllm_server (the hf "
             "backend generates on the learner's own device: nothing to overlap); set it to null or false")
    need(rm.max_new_tokens >= 1, "rollout_matching.max_new_tokens", "must be >= 1")
    # every sample's prompt + answer must fit vllm.max_model_len - max_new_tokens (coordexp.data.lengths)
    need(rm.max_new_tokens < v.max_model_len, "rollout_matching.max_new_tokens",
         f"{rm.max_new_tokens} must be < vllm.max_model_len ({v.max_model_len})")
    need(rm.repetition_penalty > 0, "rollout_matching.repetition_penalty", "must be > 0")
    need(rm.decoding.temperature >= 0, "rollout_matching.decoding.temperature", "must be >= 0 (0 = greedy)")
    need(0 < rm.decoding.top_p <= 1, "rollout_matching.decoding.top_p", "must be in (0, 1]")
    need(rm.decoding.top_k == -1 or rm.decoding.top_k >= 1, "rollout_matching.decoding.top_k",
         "must be -1 (off) or >= 1")
    need(rm.candidate_top_k >= 1, "rollout_matching.candidate_top_k", "must be >= 1")
    need(0 <= rm.iou_gate <= 1, "rollout_matching.iou_gate", "must be in [0, 1]")
    need(rm.fp_cost >= 0 and rm.fn_cost >= 0, "rollout_matching.fp_cost/fn_cost", "must be >= 0")
    rt = rm.repeat_terminate
    out += repeat_terminate_problems(config_to_dict(rt), "rollout_matching.repeat_terminate.")

    data = cfg.data
    if data.kind.value == "jsonl" and training:  # an evaluation reads data.val_jsonl alone
        need(bool(data.train_jsonl), "data.train_jsonl", "is required with data.kind: jsonl")
    syn = data.synthetic
    need(1 <= syn.min_objects <= syn.max_objects, "data.synthetic.min_objects/max_objects",
         "need 1 <= min_objects <= max_objects")
    need(syn.train_samples >= 1 and syn.val_samples >= 1, "data.synthetic.train_samples/val_samples",
         "must be >= 1")
    need(syn.image_cell >= 2, "data.synthetic.image_cell", "must be >= 2 pixels")
    need(bool(cfg.model.path), "model.path", "is required")

    server_mode = rm.rollout_backend == RolloutBackend.vllm
    if server_mode:
        need(len(v.server.base_urls) >= 1, "vllm.server.base_urls", "server mode needs at least one URL")
        for i, url in enumerate(v.server.base_urls):
            bad = url_problem(url)
            need(bad is None, f"vllm.server.base_urls[{i}]", bad or "")
        if world > 1:
            need(v.sync.mode == SyncMode.full, "vllm.sync.mode",
                 f"must be full with more than one learner process (nproc_per_node={t.nproc_per_node}, "
                 f"nnodes={t.nnodes})")
        need(v.data_parallel_size >= 1 and v.tensor_parallel_size >= 1,
             "vllm.data_parallel_size/tensor_parallel_size", "must be >= 1")
        need(0 < v.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", "must be in (0, 1]")
        for name in ("startup_timeout_s", "infer_timeout_s", "request_timeout_s"):
            need(getattr(v.server, name) > 0, f"vllm.server.{name}", "must be > 0 (no unbounded waits)")
        need(v.sync.timeout_s > 0, "vllm.sync.timeout_s", "must be > 0")
        need(v.sync.bucket_mib >= 1, "vllm.sync.bucket_mib", "must be >= 1")
        out.extend(server_problems(cfg))
        if v.device == ServerDevice.cuda:
            for name in ("server_gpus", "learner_gpus"):
                ids = getattr(v, name)
                need(all(i >= 0 for i in ids), f"vllm.{name}",
                     f"{ids}: GPU ids are >= 0 (a negative id in CUDA_VISIBLE_DEVICES hides every GPU after "
                     f"it)")
                twice = sorted({i for i in ids if ids.count(i) > 1})
                need(not twice, f"vllm.{name}", f"{ids}: GPU(s) {twice} appear more than once; one process "
                     f"(server worker or learner rank) per GPU")
        if v.device == ServerDevice.cuda and not v.server.reuse_existing:
            overlap = sorted(set(v.server_gpus) & set(v.learner_gpus))
            need(not overlap, "vllm.server_gpus", f"overlaps vllm.learner_gpus on GPUs {overlap}")
            n = max(1, len(v.server.base_urls))
            per = v.data_parallel_size * v.tensor_parallel_size
            if len(v.server_gpus) % n:
                need(False, "vllm.server_gpus",
                     f"{len(v.server_gpus)} GPUs do not split evenly over the {n} servers of "
                     f"vllm.server.base_urls; give {n * per} GPUs ({n} servers x data_parallel_size "
                     f"{v.data_parallel_size} x tensor_parallel_size {v.tensor_parallel_size})")
            else:
                need(len(v.server_gpus) // n == per, "vllm.server_gpus",
                     f"{len(v.server_gpus) // n} GPUs per server ({len(v.server_gpus)} over {n} "
                     f"server(s)) != data_parallel_size x tensor_parallel_size ({v.data_parallel_size} x "
                     f"{v.tensor_parallel_size})")
            if v.learner_gpus:
                need(len(v.learner_gpus) == t.nproc_per_node, "vllm.learner_gpus",
                     f"{len(v.learner_gpus)} GPUs != training.nproc_per_node ({t.nproc_per_node})")
        if v.device == ServerDevice.cpu:
            need(v.sync.transport.value == "file", "vllm.sync.transport",
                 "NCCL does not work on CPU; use file")
            need(v.cpu_kvcache_space_gib >= 1, "vllm.cpu_kvcache_space_gib",
                 f"{v.cpu_kvcache_space_gib} must be >= 1 (GiB of KV cache the CPU server allocates)")
            need(cfg.model.kind == ModelKind.tiny or not checkpoint_is_vision_language(cfg), "rollout",
                 f"the checkpoint {cfg.model.path} is vision-language (its config.json has a "
                 f"vision_config), and a CPU rollout server cannot run one: vLLM's Qwen-VL models import "
                 f"torchvision, which the CPU stack removes (docs/vlm.md). Use rollout=hf, or a GPU server "
                 f"(vllm=gpu)")
    need(not (t.fsdp and learner_on_cpu(cfg)), "training.fsdp", FSDP_ON_CPU)
    out += multinode_problems(cfg)
    need(cfg.model.tiny_stage1_steps >= 0, "model.tiny_stage1_steps", "must be >= 0")
    if cfg.model.kind == ModelKind.tiny:
        path = Path(str(cfg.model.path)).expanduser()
        need(not (path / "config.json").is_file(), "model.path",
             f"'{path}' is a checkpoint (it has config.json), but model.kind is tiny, for which model.path "
             f"is the cache dir the tiny model is built in: add model.kind=local to load that checkpoint")
        need(cfg.model.tiny_stage1_steps == 0 or data.kind.value == "synthetic", "model.tiny_stage1_steps",
             f"{cfg.model.tiny_stage1_steps} Stage-1 steps train the tiny model on its own synthetic task, "
             f"so they need data.kind: synthetic; set model.tiny_stage1_steps=0 to train it on your data "
             f"from random weights, or train your checkpoint: model.kind=local model.path=<checkpoint>")
        need(cfg.model.dtype.value == "float32", "model.dtype", "the tiny model trains in float32 on CPU")
        tiny_vl = cfg.model.tiny_arch.value.endswith("_vl")
        need(tiny_vl or not (data.kind.value == "synthetic" and syn.images), "data.synthetic.images",
             f"the tiny {cfg.model.tiny_arch.value} model is text-only and cannot read images: "
             f"use model=tiny_vl (model.tiny_arch=qwen2_vl) or data.synthetic.images=false")
        unit = TINY_VL_IMAGE_UNIT.get(cfg.model.tiny_arch.value)
        if unit and data.kind.value == "synthetic" and syn.images:
            need(syn.image_cell == unit, "data.synthetic.image_cell",
                 f"{syn.image_cell} px cells make {4 * syn.image_cell}x{4 * syn.image_cell} px images, but "
                 f"the tiny {cfg.model.tiny_arch.value} reads images in {unit} px units (patch x merge): set "
                 f"data.synthetic.image_cell={unit}")
        need(not (tiny_vl and server_mode), "rollout",
             "the tiny VLM runs with rollout=hf only: vLLM's Qwen2-VL needs torchvision (absent from the CPU "
             "stack) and ms-swift's qwen2_vl template expects Qwen's own vision-token ids (docs/vlm.md)")
    out += param_group_problems(cfg) + precision_problems(cfg) + adapter_problems(cfg)
    out += value_problems(cfg, reported={p.split(":", 1)[0] for p in out})
    return out


def checkpoint_is_vision_language(cfg: TrainConfig) -> bool | None:
    """Whether the configured checkpoint is vision-language: the tiny model's arch, or a local checkpoint's
    config.json has a ``vision_config`` (the preflight and the learner apply the same rule,
    coordexp.models.param_groups.is_vision_language); None when config.json cannot be read yet."""
    m = cfg.model
    if m.kind == ModelKind.tiny:
        return str(enum_value(m.tiny_arch)).endswith("_vl")
    try:
        data = json.loads((Path(str(m.path)).expanduser() / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return isinstance(data, dict) and data.get("vision_config") is not None


def unset_hint(key: str) -> str:
    """How to drop a vision knob a leaf may pin (vision-language leaves pin the rates)."""
    return f"set {key}=false" if key.startswith("model.freeze_") else f"set {key}=null (or leave it out)"


def param_group_problems(cfg: TrainConfig) -> list[str]:
    """Parameter-group knobs (coordexp.trainer.optim): vit_lr / aligner_lr > 0; vision knobs only on a
    vision-language checkpoint; something left to train."""
    m, t, out = cfg.model, cfg.training, []
    for name in ("vit_lr", "aligner_lr"):
        value = getattr(t, name)
        if value is not None and not value > 0:
            out.append(f"training.{name}: {value} must be > 0 (null = training.learning_rate; freeze the "
                       f"group with model.freeze_{name[:-3]} instead of a zero rate)")
    vl = checkpoint_is_vision_language(cfg)
    what = (f"the tiny {enum_value(m.tiny_arch)} model" if m.kind == ModelKind.tiny
            else f"the checkpoint {m.path} (its config.json has no vision_config)")
    if vl is False:
        knobs = (("model.freeze_vit", m.freeze_vit), ("model.freeze_aligner", m.freeze_aligner),
                 ("training.vit_lr", t.vit_lr is not None), ("training.aligner_lr", t.aligner_lr is not None))
        set_knobs = [k for k, on in knobs if on]
        out += [f"{k}: {what} is a text model without a vision tower or aligner (its only parameter group is "
                f"the language model); {unset_hint(k)}" for k in set_knobs]
        if m.freeze_llm:
            out.append(f"model.freeze_llm: freezes all of {what}, a text model: nothing would train")
    elif m.freeze_llm and m.freeze_vit and m.freeze_aligner:
        out.append("model.freeze_llm/freeze_vit/freeze_aligner: every parameter group is frozen: nothing "
                   "would train; unfreeze at least one")
    return out


def adapter_problems(cfg: TrainConfig) -> list[str]:
    """``model.adapter`` (coordexp.trainer.adapters): rank, alpha, dropout, non-empty unique targets. Whether
    each target matches a linear layer of the language model is checked at load, against the model."""
    a = cfg.model.adapter
    if enum_value(a.kind) == "none":
        return []
    out = []
    number = (int, float)
    if not (isinstance(a.r, int) and not isinstance(a.r, bool) and a.r >= 1):
        out.append(f"model.adapter.r: {a.r} must be an integer >= 1 (the adapter rank; 16 in the original)")
    if not (isinstance(a.alpha, number) and a.alpha > 0):
        out.append(f"model.adapter.alpha: {a.alpha} must be > 0 (scale = alpha / r; 32 in the original)")
    if not (isinstance(a.dropout, number) and 0.0 <= a.dropout < 1.0):
        out.append(f"model.adapter.dropout: {a.dropout} must be in [0, 1)")
    targets = list(a.target_modules or [])
    if not targets:
        out.append("model.adapter.target_modules: is empty: name the linear layers that get adapters, e.g. "
                   "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]")
    bad = [t for t in targets if not (isinstance(t, str) and t.strip() and t == t.strip())]
    if bad:
        out.append(f"model.adapter.target_modules: {bad} are not module names (non-empty, no spaces)")
    dups = sorted({t for t in targets if targets.count(t) > 1})
    if dups:
        out.append(f"model.adapter.target_modules: {dups} listed more than once")
    bad = [t for t in (a.modules_to_save or []) if not (isinstance(t, str) and t.strip())]
    if bad:
        out.append(f"model.adapter.modules_to_save: {bad} are not module names")
    return out


def precision_problems(cfg: TrainConfig, visible: int | None = None) -> list[str]:
    """training.precision against model.dtype and the machine (``visible``: GPUs; default: detected)."""
    precision, dtype = enum_value(cfg.training.precision), enum_value(cfg.model.dtype)
    out = []
    if precision == "fp16":
        gpus = visible_gpus() if visible is None else visible
        if gpus == 0:
            out.append("training.precision: fp16 runs on CUDA GPUs only and this machine shows none (CPU "
                       "autocast has no fp16 gradient scaling): use bf16 (CPU autocast) or fp32")
        if dtype != "float32":
            out.append(f"training.precision: fp16 needs float32 master weights (model.dtype: float32), got "
                       f"model.dtype {dtype}: the fp16 gradient scaler cannot unscale {dtype} gradients")
    elif precision == "bf16" and dtype == "float16":
        out.append("training.precision: bf16 autocast over float16 weights mixes two half formats: set "
                   "model.dtype float32 (master weights) or bfloat16 (pure bf16)")
    return out


#: training.fsdp where the config says the learner runs on CPU (vllm.device: cpu; the learner itself refuses
#: it too, coordexp.trainer.fsdp.require_cuda, where no GPU is visible).
FSDP_ON_CPU = ("FSDP needs CUDA GPUs, and vllm.device: cpu runs the learner on CPU, where accelerate does "
               "not shard at all but silently runs plain DDP (DistributedType.MULTI_CPU); set "
               "training.fsdp=false (DDP) or run on GPUs (vllm.device=cuda)")


def _endpoint_problem(endpoint: str | None) -> str | None:
    if not endpoint:
        return ("is required when training.nnodes > 1: host:port of node 0 (the c10d rendezvous), e.g. "
                "10.0.0.1:29400")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"'{endpoint}' is not host:port (port 1..65535), e.g. 10.0.0.1:29400"
    return None


def multinode_problems(cfg: TrainConfig) -> list[str]:
    """training.nnodes / node_rank / rdzv_endpoint (the config alone; :func:`run_dir_problems` needs the
    command line)."""
    t, out = cfg.training, []
    if t.nnodes < 1:
        return [f"training.nnodes: {t.nnodes} must be >= 1"]
    if not 0 <= t.node_rank < t.nnodes:
        out.append(f"training.node_rank: {t.node_rank} is outside [0, nnodes={t.nnodes})")
    if t.nnodes > 1:
        bad = _endpoint_problem(t.rdzv_endpoint)
        if bad:
            out.append(f"training.rdzv_endpoint: {bad}")
    if not 0 < t.rdzv_timeout_s <= MAX_WAIT_S:
        out.append(f"training.rdzv_timeout_s: {t.rdzv_timeout_s} must be in (0, {MAX_WAIT_S:.0f}] seconds")
    return out


def run_dir_problems(nnodes: int, overrides: Iterable[str], multirun: bool) -> list[str]:
    """A multi-node run needs one run dir every node sees: ``hydra.run.dir`` given explicitly (the default
    one carries each node's own start time), on a shared filesystem, and no sweep. ``overrides``: the job's
    Hydra overrides. Called by the entry points' check (coordexp.config.load) and the preflight."""
    if nnodes <= 1:
        return []
    if multirun:
        return [f"training.nnodes: {nnodes} nodes cannot run a sweep (-m); start each job as its own run"]
    if not any(o.split("=", 1)[0].lstrip("+~") == "hydra.run.dir" for o in overrides):
        return [f"hydra.run.dir: must be given explicitly with training.nnodes={nnodes}: every node writes "
                "to the same run dir (node 0: checkpoints, metrics, metadata, weight-sync files; the others "
                "their ranks' files), so pass hydra.run.dir=<dir on a filesystem every node mounts> with the "
                "same value on every node"]
    return []


def config_warnings(cfg: TrainConfig) -> list[str]:
    """What a valid config probably did not mean (printed by the preflight and by the learner's rank 0 at
    start, never refused): pure bf16 (``model.dtype: bfloat16`` with ``training.precision: bf16``: no fp32
    master weights), a checkpoint of your own trained on the built-in synthetic task (the production
    leaves' data default is the synthetic toy task, so a run that sets only ``model.path`` trains on it), a
    warmup as long as the run, and a multi-node run whose rendezvous or servers are on loopback (only nodes
    on this machine reach them: right for a test of several nodes on one machine, wrong on a cluster)."""
    out = []
    if (enum_value(cfg.model.dtype) == DType.bfloat16.value
            and enum_value(cfg.training.precision) == Precision.bf16.value):
        out.append("model.dtype bfloat16 with training.precision bf16 is pure bf16 (no fp32 master weights; "
                   "small updates can round away): model.dtype float32 keeps fp32 master weights")
    smoke = str(cfg.experiment).startswith("smoke/")  # the tiny models' own task (their Stage-1, their evals)
    if cfg.model.kind == ModelKind.local and enum_value(cfg.data.kind) == "synthetic" and not smoke:
        what = "images" if cfg.data.synthetic.images else "text"
        out.append(f"the checkpoint {cfg.model.path} trains on the built-in synthetic task (data.kind: "
                   f"synthetic, {what}): for your data add data=jsonl data.train_jsonl=<file> "
                   f"data.val_jsonl=<file> (docs/own_data.md)")
    t = cfg.training
    if t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        out.append(f"training.warmup_steps {t.warmup_steps} >= training.max_steps {t.max_steps}: the "
                   f"learning rate never reaches training.learning_rate; lower training.warmup_steps")
    if t.nnodes > 1:
        server_mode = cfg.rollout_matching.rollout_backend == RolloutBackend.vllm
        near = [f"vllm.server.base_urls {u}" for u in (cfg.vllm.server.base_urls if server_mode else [])
                if url_problem(u) is None and is_loopback_host(urlparse(u).hostname or "")]
        if t.rdzv_endpoint and is_loopback_host(t.rdzv_endpoint.rpartition(":")[0]):
            near.insert(0, f"training.rdzv_endpoint {t.rdzv_endpoint}")
        if near:
            out.append(f"{' and '.join(near)}: loopback, which only nodes on this machine reach; on a "
                       f"cluster name node 0 by a hostname or address every node resolves (node0.cluster)")
    return out

"""The memory plan of a config: bytes per learner rank and per rollout-server GPU, checked against the device.

Per learner rank (all terms in bytes; ``p`` = bytes of ``model.dtype``, ``c`` = bytes of the autocast dtype of
``training.precision`` bf16/fp16, ``W`` = world size ``nproc_per_node x nnodes``; FSDP divides the first
three by ``W``):

* weights: every parameter in ``model.dtype`` (peft's LoRA/DoRA weights in float32 on a bf16/fp16 base);
* gradients: one per trainable parameter, in its dtype; plain DDP over ``W > 1`` ranks keeps a second copy in
  its all-reduce buckets (torch ``DistributedDataParallel(gradient_as_bucket_view=False)``, the default that
  accelerate and the Trainer keep);
* optimizer state: AdamW's ``exp_avg`` and ``exp_avg_sq``, two per trainable parameter in its dtype (torch
  AdamW allocates them ``zeros_like(param)``); plus, while ``step()`` runs, one more trainable-sized temporary
  (the foreach implementation's ``sqrt(exp_avg_sq)``), which never coexists with the activations;
* master copies: with float32 ``model.dtype`` the stored weights are the master copy and the compute runs in
  ``c``; autocast then keeps a ``c``-byte copy of every matmul weight from the forward to the backward
  (``matmul_params x c``; measured with saved-tensor hooks); 0 when compute runs in the storage dtype. Under
  FSDP2 these copies exist only for the units being computed and are counted in "FSDP gathered units";
* FSDP gathered units (``training.fsdp``): the root unit (embeddings, head, norms, merger: FSDP2 keeps the
  root gathered from forward to backward) plus the current and the prefetched block, in the compute dtype,
  and one block's unsharded gradient before its reduce-scatter;
* activations: :mod:`coordexp.planning.activations`.

Peak = weights + gradients + optimizer state + max(master copies + FSDP gathered units + activations, the
step temporary).

Per rollout server (server mode): every GPU of an engine holds the weights (``vllm.dtype``, split over
``tensor_parallel_size``); the KV cache gets ``gpu_memory_utilization x device - weights`` (vLLM also reserves
its profiled activation peak and CUDA graphs, so the capacity is an upper bound), ``2 x layers x kv_heads x
head_dim x bytes`` per token (kv heads split over tensor parallelism); one engine must hold
``decode_batch_size`` sequences of ``prompt + max_new_tokens`` tokens (the data's length rule makes that at
most ``min(vllm.max_model_len, training.packing_length with packing)``), and at least one sequence of
``vllm.max_model_len`` (vLLM refuses to start otherwise). A CPU server's cache is
``vllm.cpu_kvcache_space_gib``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from coordexp.config.contract import rollout_contract
from coordexp.config.schema import AdapterKind, Precision, SoftctxGradMode, TrainConfig, enum_value
from coordexp.config.validate import learner_on_cpu
from coordexp.data.lengths import token_limit
from coordexp.planning.activations import (
    ActivationEstimate,
    layer_bytes_per_token,
    norm_bytes_per_token,
    vision_block_bytes_per_token,
)
from coordexp.planning.inventory import Inventory, inventory, load_model_config

__all__ = ["GIB", "LearnerPlan", "MemoryPlan", "ServerPlan", "detected_gpu_memory", "estimate_activations",
           "learner_plan", "memory_plan", "server_plan"]

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _compute_bytes(cfg: TrainConfig) -> int | None:
    """Bytes of the autocast dtype, None without autocast (``training.precision: fp32``)."""
    return None if enum_value(cfg.training.precision) == Precision.fp32.value else 2


def world_size(cfg: TrainConfig) -> int:
    return cfg.training.nproc_per_node * cfg.training.nnodes


def estimate_activations(cfg: TrainConfig, inv: Inventory) -> ActivationEstimate:
    """Activations of the largest micro-batch ``cfg`` allows: ``training.packing_length`` tokens with packing,
    else ``per_device_train_batch_size x vllm.max_model_len``. Image tokens: one image of the processor's
    largest size (``max_pixels``) per ``vllm.max_model_len`` tokens, at most every token."""
    t, ab = cfg.training, cfg.stage2_ab
    s = DTYPE_BYTES[enum_value(cfg.model.dtype)]
    c = _compute_bytes(cfg)
    a = c if c is not None else s
    L = cfg.vllm.max_model_len
    S = t.packing_length if t.packing else t.per_device_train_batch_size * L
    v = inv.vision
    image_tokens = min(S, math.ceil(S / L) * v.image_tokens) if v else 0
    patches = image_tokens * v.merge ** 2 if v else 0
    n = ab.n_softctx_iter
    passes = n if enum_value(ab.softctx_grad_mode) == SoftctxGradMode.unroll.value else min(n, 2)
    d = inv.text
    b_layer = layer_bytes_per_token(d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.intermediate,
                                    d.heads, s, c)
    b_vis = vision_block_bytes_per_token(v.width, v.intermediate, v.heads, v.gated_mlp, s, c) if v else 0
    shared = 2 * d.head_dim * s + norm_bytes_per_token(d.hidden, s, c, 1)  # rotary cos/sin, final norm
    if t.gradient_checkpointing:
        text = passes * S * (d.layers * s * d.hidden + shared) + max(S * b_layer, patches * b_vis)
        vision = passes * patches * v.depth * s * v.width if v else 0
    else:
        text = passes * S * (d.layers * b_layer + shared)
        vision = passes * patches * v.depth * b_vis if v else 0
    supervised = S - image_tokens  # logits only where a loss reads them: never an image placeholder
    head = supervised * d.vocab * (a + (4 if a != 4 else 0) + 8) + (passes - 1) * supervised * d.vocab * a
    return ActivationEstimate(tokens=S, image_tokens=image_tokens, patches=patches, passes=passes,
                              checkpointing=t.gradient_checkpointing, layer_bytes_per_token=b_layer,
                              vision_bytes_per_patch=b_vis, text_bytes=text, vision_bytes=vision,
                              head_bytes=head, total=text + vision + head)


@dataclass(frozen=True)
class LearnerPlan:
    """Bytes per learner rank (see the module docstring)."""

    world: int
    fsdp: bool
    weights: int
    gradients: int
    optimizer: int
    master_copies: int
    fsdp_gathered: int
    activations: ActivationEstimate
    step_temporary: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer
                + max(self.master_copies + self.fsdp_gathered + self.activations.total, self.step_temporary))


def learner_plan(cfg: TrainConfig, inv: Inventory) -> LearnerPlan:
    t = cfg.training
    W = world_size(cfg)
    p = DTYPE_BYTES[enum_value(cfg.model.dtype)]
    c = _compute_bytes(cfg)
    shard = W if t.fsdp else 1
    fp32_adapter = inv.adapter_fp32_params
    weights = (inv.total - fp32_adapter) * p + fp32_adapter * 4
    trained_fp32 = fp32_adapter if not inv.groups["llm"].frozen else 0
    trainable = (inv.trainable - trained_fp32) * p + trained_fp32 * 4
    gradients = trainable * (2 if (W > 1 and not t.fsdp) else 1)
    master = inv.matmul_params * c if (c is not None and c != p and not t.fsdp) else 0
    gathered = ((inv.root_params + 2 * inv.largest_block) * (c or p) + inv.largest_block * p) if t.fsdp else 0
    return LearnerPlan(world=W, fsdp=t.fsdp, weights=_ceil_div(weights, shard),
                       gradients=_ceil_div(gradients, shard), optimizer=_ceil_div(2 * trainable, shard),
                       master_copies=master, fsdp_gathered=gathered,
                       activations=estimate_activations(cfg, inv), step_temporary=_ceil_div(trainable, shard))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ServerPlan:
    """One rollout server engine's GPU (or a CPU server's KV space)."""

    servers: int
    device: str                 # "cuda" | "cpu"
    tensor_parallel: int
    weights_per_gpu: int
    kv_bytes_per_token: int     # per GPU
    kv_budget: int | None       # bytes the KV cache gets (None: device memory unknown)
    capacity_tokens: int | None
    needed_tokens: int
    per_sequence_tokens: int
    decode_batch_size: int
    max_model_len: int


def server_plan(cfg: TrainConfig, inv: Inventory, device_bytes: int | None) -> ServerPlan | None:
    """The server side of the plan in server mode, else None."""
    contract = rollout_contract(cfg)
    if not contract.vllm_mode:
        return None
    v = cfg.vllm
    device = enum_value(v.device)
    tp = v.tensor_parallel_size if device == "cuda" else 1
    b = DTYPE_BYTES[enum_value(v.dtype)]
    d = inv.text
    kv = 2 * d.layers * max(1, d.kv_heads // tp) * d.head_dim * b
    weights = _ceil_div(inv.base_params * b, tp)
    if device == "cuda":
        budget = int(device_bytes * v.gpu_memory_utilization) - weights if device_bytes else None
    else:
        budget = v.cpu_kvcache_space_gib * GIB
    per_seq = token_limit(cfg).limit + cfg.rollout_matching.max_new_tokens
    return ServerPlan(servers=max(1, len(contract.server_base_urls)), device=device, tensor_parallel=tp,
                      weights_per_gpu=weights, kv_bytes_per_token=kv, kv_budget=budget,
                      capacity_tokens=max(0, budget // kv) if budget is not None else None,
                      needed_tokens=max(contract.decode_batch_size * per_seq, v.max_model_len),
                      per_sequence_tokens=per_seq, decode_batch_size=contract.decode_batch_size,
                      max_model_len=v.max_model_len)


def detected_gpu_memory() -> int | None:
    """Bytes of the smallest GPU ``nvidia-smi`` lists (within ``CUDA_VISIBLE_DEVICES``), None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        query = ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    allowed = {x.strip() for x in mask.split(",")} if mask is not None else None
    sizes = []
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit() and (allowed is None or parts[0] in allowed):
            sizes.append(int(parts[1]) * (1 << 20))
    return min(sizes) if sizes else None


@dataclass(frozen=True)
class MemoryPlan:
    inventory: Inventory
    learner: LearnerPlan
    server: ServerPlan | None
    device_bytes: int | None
    device_source: str | None      # "training.device_memory_gib" | "detected GPU" | None (not checked)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        return self.device_bytes is not None

    @property
    def fits(self) -> bool | None:
        return None if not self.checked else not self.problems

    def to_json(self) -> dict[str, Any]:
        inv, lp, sp = self.inventory, self.learner, self.server
        act = dataclasses.asdict(lp.activations)
        return {
            "source": inv.source, "model_type": inv.model_type,
            "parameters": inv.total, "base_parameters": inv.base_params,
            "adapter_parameters": inv.adapter_params,
            "trainable_parameters": inv.trainable,
            "groups": {g: dataclasses.asdict(c) for g, c in inv.groups.items()},
            "learner": {"world_size": lp.world,
                        "sharding": "fsdp" if lp.fsdp else "ddp" if lp.world > 1 else "none",
                        "weights": lp.weights, "gradients": lp.gradients, "optimizer_state": lp.optimizer,
                        "master_copies": lp.master_copies, "fsdp_gathered_units": lp.fsdp_gathered,
                        "activations": act, "optimizer_step_temporary": lp.step_temporary,
                        "total": lp.total},
            "server": dataclasses.asdict(sp) if sp else None,
            "device_memory_bytes": self.device_bytes, "device_memory_source": self.device_source,
            "checked": self.checked, "fits": self.fits, "problems": list(self.problems),
            "fixes": list(self.fixes),
        }


def _problems(lp: LearnerPlan, sp: ServerPlan | None, device: int | None) -> list[str]:
    if device is None:
        return []
    out = []
    if lp.total > device:
        out.append(f"a learner rank needs {size(lp.total)} and the device has {size(device)}")
    if sp is not None and sp.device == "cuda":
        if sp.kv_budget is not None and sp.kv_budget <= 0:
            out.append(f"a server GPU's weights ({size(sp.weights_per_gpu)}) leave no KV cache "
                       "within vllm.gpu_memory_utilization")
        elif sp.capacity_tokens is not None and sp.capacity_tokens < sp.needed_tokens:
            out.append(f"a server engine's KV cache holds {sp.capacity_tokens:,} tokens and decoding needs "
                       f"{sp.needed_tokens:,} (rollout_matching.decode_batch_size {sp.decode_batch_size} x "
                       f"{sp.per_sequence_tokens:,} prompt + new tokens)")
    return out


def size(n: float) -> str:
    """``n`` bytes in GiB (one decimal), or in MiB below 1 GiB (a tiny model's plan would read 0.0 GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _replace(cfg: TrainConfig, section: str, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def _learner_fixes(cfg: TrainConfig, inv: Inventory, config: Any, device: int) -> list[str]:
    """Each change that shrinks a learner rank, with the GiB it gives, then all of them together."""
    t = cfg.training
    steps: list[tuple[str, Any]] = []
    cpu_server = learner_on_cpu(cfg)  # FSDP needs GPUs: not offered where the config check refuses it
    if not t.fsdp and world_size(cfg) > 1 and not cpu_server:
        steps.append(("training.fsdp=true (shard weights, gradients and optimizer state over "
                      f"{world_size(cfg)} ranks)", lambda c: _replace(c, "training", fsdp=True)))
    if not t.fsdp and world_size(cfg) == 1 and not cpu_server:
        steps.append(("training.fsdp=true training.nproc_per_node=8 (8 learner GPUs: vllm.learner_gpus)",
                      lambda c: _replace(c, "training", fsdp=True, nproc_per_node=8)))
    if not t.gradient_checkpointing:
        steps.append(("training.gradient_checkpointing=true (checkpoint activations)",
                      lambda c: _replace(c, "training", gradient_checkpointing=True)))
    if enum_value(cfg.model.adapter.kind) == AdapterKind.none.value:
        lora = dataclasses.replace(cfg.model.adapter, kind=AdapterKind.lora)
        steps.append((f"model.adapter.kind=lora (r {cfg.model.adapter.r}: train adapters, not the weights)",
                      lambda c: _replace(c, "model", adapter=lora)))
    if enum_value(t.precision) == Precision.fp32.value:
        steps.append(("training.precision=bf16 (bf16 autocast)",
                      lambda c: _replace(c, "training", precision=Precision.bf16)))
    if t.packing and t.packing_length > cfg.vllm.max_model_len // 2:
        half = max(cfg.vllm.max_model_len // 2, 1)
        steps.append((f"training.packing_length={half} (shorter packs)",
                      lambda c: _replace(c, "training", packing_length=half)))
    if not t.packing and t.per_device_train_batch_size > 1:
        steps.append(("training.per_device_train_batch_size=1 (raise gradient accumulation)",
                      lambda c: _replace(c, "training", per_device_train_batch_size=1)))

    def total(c: TrainConfig) -> int:
        same = (c.model.adapter == cfg.model.adapter)
        return learner_plan(c, inv if same else inventory(c, config, inv.source, _processor(inv))).total

    out = []
    combined = cfg
    for text, change in steps:
        got = total(change(cfg))
        out.append(f"{text}: {size(got)} per rank ({'fits' if got <= device else 'still over'})")
        combined = change(combined)
    got = total(combined)
    if len(steps) > 1:
        verdict = "fits" if got <= device else "still over"
        out.append(f"all of the above together: {size(got)} per rank ({verdict})")
    if got > device:  # nothing left to turn on fits it: a bigger world or a smaller job
        wider = ("" if cpu_server else "shard over more learner ranks (training.fsdp=true with more "
                 "training.nproc_per_node / training.nnodes), or ")
        out.append(f"{'with all of that' if steps else 'every memory setting is on already'}, a rank needs "
                   f"{size(got)}: {wider}train a smaller model")
    return out


def _processor(inv: Inventory) -> dict[str, Any]:
    v = inv.vision
    return {"max_pixels": v.image_tokens * (v.patch * v.merge) ** 2} if v else {}


def _more_tensor_parallel(cfg: TrainConfig, sp: ServerPlan) -> str:
    """Twice the tensor parallelism, as overrides the config check accepts: the same GPUs per server with
    half the data parallelism when it halves, else twice the servers' GPUs."""
    tp, dp = sp.tensor_parallel * 2, cfg.vllm.data_parallel_size
    if dp % 2 == 0:
        return f"vllm.tensor_parallel_size={tp} vllm.data_parallel_size={dp // 2}"
    return (f"vllm.tensor_parallel_size={tp} with {tp * dp} GPUs per server (vllm.server_gpus: "
            f"{tp * dp * sp.servers} in all)")


def _server_fixes(cfg: TrainConfig, sp: ServerPlan) -> list[str]:
    out = []
    if sp.kv_budget is not None and sp.kv_budget <= 0:
        out.append(f"{_more_tensor_parallel(cfg, sp)} (split the weights over more GPUs), or a higher "
                   "vllm.gpu_memory_utilization")
        return out
    capacity = sp.capacity_tokens or 0
    fit = capacity // sp.per_sequence_tokens
    if fit >= 1 and capacity >= sp.max_model_len:
        out.append(f"rollout_matching.decode_batch_size={fit} (smaller decode batch: "
                   f"{fit * sp.per_sequence_tokens:,} tokens of KV cache)")
    out.append(f"{_more_tensor_parallel(cfg, sp)} (more KV cache per engine), a higher "
               "vllm.gpu_memory_utilization, or a shorter vllm.max_model_len")
    return out


def memory_plan(cfg: TrainConfig, device_bytes: int | None = None, config: Any = None,
                source: str | None = None, processor: dict[str, Any] | None = None) -> MemoryPlan:
    """The plan of ``cfg``. Device memory: ``device_bytes``, else ``training.device_memory_gib``, else the
    detected GPU's; none of them: the plan is made and not checked. Raises PlanError / ConfigError when the
    model cannot be counted (see :mod:`coordexp.planning.inventory`)."""
    if config is None:
        config, source, processor = load_model_config(cfg)
    inv = inventory(cfg, config, source, processor)
    src = "argument" if device_bytes is not None else None
    if device_bytes is None and cfg.training.device_memory_gib is not None:
        device_bytes, src = int(cfg.training.device_memory_gib * GIB), "training.device_memory_gib"
    if device_bytes is None:
        device_bytes = detected_gpu_memory()
        src = "detected GPU" if device_bytes is not None else None
    lp = learner_plan(cfg, inv)
    sp = server_plan(cfg, inv, device_bytes)
    problems = _problems(lp, sp, device_bytes)
    fixes: list[str] = []
    if device_bytes is not None and lp.total > device_bytes:
        fixes += _learner_fixes(cfg, inv, config, device_bytes)
    if problems and sp is not None and any("server" in p for p in problems):
        fixes += _server_fixes(cfg, sp)
    return MemoryPlan(inventory=inv, learner=lp, server=sp, device_bytes=device_bytes, device_source=src,
                      problems=problems, fixes=fixes)

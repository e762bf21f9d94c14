"""Typed schema of the whole config tree.

Every node of the composed Hydra config is one of these dataclasses; the tree is registered in
Hydra's ConfigStore (see ``store.py``) so unknown keys and wrong types fail during composition.
Defaults live here; YAML under ``conf/`` only selects and pins. Each field's ``help`` metadata
feeds the generated config reference (docs/config.md).

This module is pure Python (no torch, no vLLM, no Hydra). ``RepeatTerminateConfig`` belongs to the
repeat-terminate rule engine (pure core) and is registered here as ``rollout_matching.repeat_terminate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from coordexp.protocol import FieldOrder
from coordexp.repeat_rules import RepeatTerminateConfig


def enum_value(value: Any) -> Any:
    """The plain value of a config enum (``RolloutBackend.vllm`` -> ``"vllm"``); other values as they are
    (configs built by hand in tools and tests may carry plain strings)."""
    return value.value if isinstance(value, Enum) else value


def doc(text: str, default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a help text (the config reference is generated from it)."""
    if "default_factory" in kwargs:
        return field(default_factory=kwargs.pop("default_factory"), metadata={"help": text})
    return field(default=default, metadata={"help": text})


class ModelKind(str, Enum):
    tiny = "tiny"
    local = "local"


class TinyArch(str, Enum):
    qwen2 = "qwen2"
    qwen3 = "qwen3"
    qwen2_vl = "qwen2_vl"
    qwen2_5_vl = "qwen2_5_vl"
    qwen3_vl = "qwen3_vl"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DataKind(str, Enum):
    synthetic = "synthetic"
    jsonl = "jsonl"


class ImageCheck(str, Enum):
    all = "all"
    sample = "sample"


class SoftctxGradMode(str, Enum):
    unroll = "unroll"
    em_detach = "em_detach"


class IntervalStrategy(str, Enum):
    no = "no"
    steps = "steps"


class RolloutBackend(str, Enum):
    hf = "hf"
    vllm = "vllm"


class ServerDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class SyncMode(str, Enum):
    full = "full"
    none = "none"


class SyncTransport(str, Enum):
    file = "file"
    nccl = "nccl"


class AdapterKind(str, Enum):
    none = "none"
    lora = "lora"
    dora = "dora"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ReportTo(str, Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


@dataclass
class AdapterConfig:
    kind: AdapterKind = doc(
        "`none`: train the weights themselves; `lora` / `dora`: peft adapters on target_modules (DoRA: "
        "weight-decomposed LoRA, Liu et al. 2024; the original Stage 2 trained DoRA r 16, alpha 32). The "
        "coordinate-token rows of the embedding and head train too (peft trainable_token_indices); an "
        "unfrozen vision tower / aligner trains in full next to the adapter. Checkpoints hold the adapter; "
        "the rollout server gets the merged weights; python -m coordexp.models.export folds it in for "
        "deployment.",
        AdapterKind.none)
    r: int = doc("Adapter rank (>= 1).", 16)
    alpha: int = doc("Adapter scaling numerator (> 0; scale = alpha / r).", 32)
    dropout: float = doc("Dropout on the adapter input, in [0, 1).", 0.05)
    target_modules: list[str] = doc(
        "Linear layers of the language model that get adapters: module-name suffixes (`q_proj`) or dotted "
        "suffixes (`self_attn.q_proj`); the vision tower is never targeted. One that matches no linear layer "
        "is an error at load.",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    modules_to_save: list[str] = doc("Further modules trained in full next to the adapters and saved with "
                                     "them (name suffixes, peft's rule; not the embedding or head).",
                                     default_factory=list)


@dataclass
class ModelConfig:
    kind: ModelKind = doc("`tiny`: build the random tiny local model on demand; `local`: load `path`.",
                          ModelKind.tiny)
    path: str = doc("Checkpoint directory. For `kind: tiny`, the cache dir the tiny model is built in.")
    tiny_arch: TinyArch = doc("Architecture of the tiny model (kind: tiny only); the *_vl ones are "
                              "vision-language models.", TinyArch.qwen2)
    tiny_stage1_steps: int = doc("Channel-A steps that turn the random tiny model into a Stage-1 checkpoint "
                                 "(cached next to it) before Stage 2 starts; 0 = start from random weights "
                                 "(kind: tiny only).", 0)
    dtype: DType = doc("Load/storage dtype of the learner's weights (the optimizer's master copy); compute "
                       "precision is training.precision. The tiny model (kind: tiny) takes float32 only.",
                       DType.float32)
    freeze_llm: bool = doc("Freeze the language model (decoder layers, embeddings, head).", False)
    freeze_vit: bool = doc("Freeze the vision tower (vision-language models only).", False)
    freeze_aligner: bool = doc("Freeze the aligner (Qwen-VL's merger; Qwen3-VL's deepstack mergers too; "
                               "vision-language models only).", False)
    adapter: AdapterConfig = doc("Parameter-efficient adapters (peft).", default_factory=AdapterConfig)


@dataclass
class SyntheticDataConfig:
    train_samples: int = doc("Number of synthetic training records.", 2048)
    val_samples: int = doc("Number of synthetic held-out records.", 64)
    min_objects: int = doc("Fewest objects per synthetic record.", 1)
    max_objects: int = doc("Most objects per synthetic record.", 3)
    seed: int = doc("Generator seed (validation uses seed + 1).", 1234)
    images: bool = doc("Render each scene as a 112x112 image of coloured shapes (the vision-language task, "
                       "images/ next to the generated JSONL) instead of listing the objects in the prompt.",
                       False)
    image_cell: int = doc("Pixels per grid cell of the image task (4x4 cells): patch_size x merge_size of "
                          "the model, 28 for Qwen2/2.5-VL, 32 for Qwen3-VL.", 28)


@dataclass
class DataConfig:
    kind: DataKind = doc("`synthetic`: generate the synthetic task into the run dir; `jsonl`: read files.",
                         DataKind.synthetic)
    train_jsonl: str | None = doc("Training JSONL (kind: jsonl).", None)
    val_jsonl: str | None = doc("Held-out JSONL for rollout eval (kind: jsonl).", None)
    object_field_order: FieldOrder = doc("Key order inside each CoordJSON object.", FieldOrder.desc_first)
    system_prompt: str | None = doc("Optional system turn prepended to every prompt.", None)
    val_sample_limit: int | None = doc("Cap on held-out samples used per eval (null = all).", None)
    image_check: ImageCheck = doc(
        "Training images checked before the first step (data.kind: jsonl; each rank checks its share): "
        "`all`: every record's images exist and the image processor resizes them to the record's width x "
        "height; `sample`: only data.image_check_samples evenly spaced records, the others when the "
        "trainer reads them (a bad one then stops training with its file:line). The held-out split is "
        "always checked whole.", ImageCheck.all)
    image_check_samples: int = doc("Records whose images data.image_check: sample checks up front.", 1000)
    synthetic: SyntheticDataConfig = doc("Synthetic task settings (kind: synthetic).",
                                         default_factory=SyntheticDataConfig)


@dataclass
class TrainingConfig:
    run_name: str = doc("Run name (TensorBoard run, metadata).")
    output_dir: str = doc("Run directory: checkpoints, metrics.jsonl, run_metadata.json. The leaves set it "
                          "to Hydra's run dir (train.log, .hydra/); move a run with hydra.run.dir=<dir>.")
    logging_dir: str = doc("TensorBoard event directory.")
    learning_rate: float = doc("Peak learning rate (AdamW) of the language model (+ head).")
    vit_lr: float | None = doc("Peak learning rate of the vision tower (vision-language models only; "
                               "null = learning_rate).", None)
    aligner_lr: float | None = doc("Peak learning rate of the aligner (vision-language models only; "
                                   "null = learning_rate).", None)
    precision: Precision = doc("Mixed precision of the forward/backward (autocast; master weights stay in "
                               "model.dtype): fp32 | bf16 (CPU and GPU) | fp16 (GPU only).", Precision.fp32)
    gradient_checkpointing: bool = doc("Activation checkpointing (non-reentrant): recompute each decoder "
                                       "layer's activations in the backward.", False)
    fsdp: bool = doc(
        "Shard weights, gradients and optimizer state over every learner rank (FSDP2 through the Trainer: "
        "each decoder layer / vision block is one unit; gradient_checkpointing then checkpoints through "
        "FSDP; weight syncs gather in vllm.sync.bucket_mib buckets). Runs under torchrun, on one GPU too. "
        "GPU only: refused on CPU, where accelerate would silently run plain DDP. A LoRA/DoRA adapter on a "
        "tied-embedding checkpoint is refused (docs/runbook.md 'Sharded learner').", False)
    nnodes: int = doc("Learner nodes (torchrun --nnodes); the same command runs on every node, with an "
                      "explicit hydra.run.dir on a filesystem every node mounts.", 1)
    node_rank: int = doc("This node's rank in [0, nnodes); node 0 starts the servers and writes the run "
                         "metadata, the others run only their learner ranks.", 0)
    rdzv_endpoint: str | None = doc("host:port of node 0's c10d rendezvous (torchrun --rdzv_endpoint), as "
                                    "every node reaches it; required when nnodes > 1.", None)
    rdzv_timeout_s: float = doc(
        "nnodes > 1: how long a node waits for the others to join the rendezvous (node 0 starts its learner "
        "once its servers are ready; the other nodes first wait up to vllm.server.startup_timeout_s for "
        "those servers, then this long for node 0's rendezvous), then fails with a clear message.", 300.0)
    device_memory_gib: float | None = doc(
        "GiB of one learner / server GPU that the preflight's memory plan is checked against (e.g. 80 for an "
        "H100 80GB, to check a plan on a login node); null = the smallest GPU nvidia-smi lists; null and no "
        "GPU: the plan is printed, not checked. A plan above it exits 2 with the table and the fixes "
        "(docs/runbook.md \"Memory plan\").", None)
    effective_batch_size: int = doc(
        "Samples per optimizer step over all learner ranks; gradient accumulation is derived from it.")
    per_device_train_batch_size: int = doc("Samples per rank per micro-step.", 1)
    gradient_accumulation_steps: int | None = doc(
        "Leave null: derived as effective_batch_size / (per_device_train_batch_size * nproc_per_node). "
        "A value that differs from the derived one is an error.", None)
    nproc_per_node: int = doc("Learner processes (torchrun ranks).", 1)
    max_steps: int = doc("Optimizer steps to run.")
    warmup_steps: int = doc("Linear warmup steps.", 0)
    lr_scheduler_type: str = doc("transformers scheduler name (linear, cosine, constant, ...).", "linear")
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    max_grad_norm: float = doc("Gradient clipping norm (0 disables).", 1.0)
    logging_steps: int = doc("Log metrics every N optimizer steps.", 1)
    eval_strategy: IntervalStrategy = doc("`steps`: rollout eval every eval_steps; `no`: never.")
    eval_steps: int = doc("Optimizer steps between rollout evals.")
    save_strategy: IntervalStrategy = doc("`steps`: checkpoint every save_steps; `no`: never.")
    save_steps: int = doc("Optimizer steps between checkpoints.")
    save_total_limit: int | None = doc("Keep at most N checkpoints (null = all).", 2)
    checkpoint_on_sigterm: bool = doc(
        "On SIGTERM (a preemption), finish the current optimizer step, save a checkpoint and exit 143, so a "
        "requeued run (resume_from_checkpoint: latest) loses less than one step. Needs save_strategy: steps; "
        "bounded by the 20 s signal grace (docs/runbook.md).", True)
    metric_for_best_model: str = doc("Metric that picks the best checkpoint.", "eval_rollout/f1")
    report_to: list[ReportTo] = doc(
        "Experiment trackers: `tensorboard` (events in logging_dir), `wandb` (offline, files in the run dir, "
        "unless WANDB_MODE is set), `mlflow` (local file store <run_dir>/mlruns unless MLFLOW_TRACKING_URI "
        "is set); [] = none. wandb and mlflow must be installed (pip install wandb / mlflow).",
        default_factory=lambda: [ReportTo.tensorboard])
    resume_from_checkpoint: str | None = doc(
        "`latest` resumes from the newest checkpoint of this run's lineage (its own dir, or a run dir whose "
        ".hydra/overrides.yaml equals this run's overrides without this key and training.max_steps); a "
        "checkpoint dir or a run dir resumes from it (docs/runbook.md).", None)
    dataloader_num_workers: int = doc("DataLoader worker processes.", 0)
    packing: bool = doc(
        "Post-rollout packing: micro-steps of an accumulation window buffer raw samples; the last one builds "
        "every Channel-A/B segment of the step and trains them padding-free in as few rows of packing_length "
        "tokens as fit (one forward/backward per pack, one optimizer step).", False)
    packing_length: int = doc("Tokens per pack (prompt + target of every segment in it); a longer segment "
                              "is an error naming the sample.", 4096)
    packing_buffer: int = doc("Most segments one rank buffers in a step (bounds memory; every segment of a "
                              "step is consumed in that step).", 256)
    packing_min_fill_ratio: float = doc(
        "Pipelined rollouts start a pack once this fraction of packing_length is buffered; a step whose "
        "mean pack fill is below it logs a warning.", 0.7)


@dataclass
class ScheduleConfig:
    b_ratio: float = doc("Fraction of optimizer steps that run Channel B, in [0, 1]. Step s is B iff "
                         "floor((s+1)*r) > floor(s*r).")


@dataclass
class ChannelBConfig:
    drop_invalid_struct_ce_multiplier: float = doc(
        "Scales structure CE of appended/closure tokens when invalid objects were dropped; in [1, 4].", 1.0)


@dataclass
class Stage2ABConfig:
    schedule: ScheduleConfig = doc("Channel schedule.", default_factory=ScheduleConfig)
    n_softctx_iter: int = doc("Channel-A forward passes: 1 = plain teacher forcing; N >= 2 = soft "
                              "self-context (pass m feeds every coordinate slot the expected coordinate "
                              "embedding of pass m-1; CE from pass 0, geometry from the last).", 1)
    softctx_grad_mode: SoftctxGradMode = doc(
        "`unroll`: gradients through every pass; `em_detach`: expected embeddings detached, CE trains "
        "through pass 0 and geometry through the last pass only.", SoftctxGradMode.unroll)
    softctx_temperature: float = doc("Temperature of the coordinate softmax (expectation decode, "
                                     "soft self-context).", 1.0)
    desc_ce_weight: float = doc("CE weight of desc value tokens.", 1.0)
    bbox_smoothl1_weight: float = doc("Weight of SmoothL1 on expectation-decoded boxes.", 1.0)
    bbox_ciou_weight: float = doc("Weight of (1 - CIoU) on expectation-decoded boxes.", 1.0)
    bbox_smoothl1_beta: float = doc("SmoothL1 transition point in normalized [0, 1] units (beta 1 would "
                                    "make it plain MSE on [0, 1]).", 0.05)
    coord_ce_weight: float = doc("Weight of CE over the 1000 coordinate logits at geometry slots (a "
                                 "geometry regularizer; coordinate tokens never get full-vocab CE).", 0.0)
    coord_gate_weight: float = doc("Weight of the coordinate gate -log P(any coordinate token) at geometry "
                                   "slots (logsumexp(all) - logsumexp(coord)): teaches a model without a "
                                   "Stage-1 checkpoint to emit coordinate tokens there.", 0.0)
    channel_b: ChannelBConfig = doc("Channel-B settings.", default_factory=ChannelBConfig)


@dataclass
class DecodingConfig:
    temperature: float = doc("0 = greedy; > 0 samples.", 0.0)
    top_p: float = doc("Nucleus mass in (0, 1].", 1.0)
    top_k: int = doc("-1 = off, else >= 1.", -1)


@dataclass
class RolloutMatchingConfig:
    rollout_backend: RolloutBackend = doc("`hf`: in-process generate; `vllm`: rollout server.",
                                          RolloutBackend.hf)
    decode_batch_size: int = doc("Sequences per rollout decode call, in training and eval: the single "
                                 "source of truth for rollout micro-batching.", 8)
    max_new_tokens: int = doc("Rollout generation budget.", 128)
    repetition_penalty: float = doc("Multiplicative repetition penalty (1.0 = off).", 1.0)
    decoding: DecodingConfig = doc("Sampling settings.", default_factory=DecodingConfig)
    candidate_top_k: int = doc("GT candidates kept per prediction (by IoU) before Hungarian.", 5)
    iou_gate: float = doc("Pairs with IoU below this are infeasible (counted as gating rejections).", 0.3)
    fp_cost: float = doc("Cost of leaving a prediction unmatched.", 0.5)
    fn_cost: float = doc("Cost of leaving a GT object unmatched.", 2.0)
    repeat_terminate: RepeatTerminateConfig = doc("Repeat-aware forced EOS.",
                                                  default_factory=RepeatTerminateConfig)
    pipeline: bool | None = doc(
        "Pipelined Channel-B rollouts (server mode with training.packing): a producer thread fetches the "
        "step's rollouts chunk by chunk while the learner trains on packs; one optimizer step at the end, so "
        "every rollout still comes from the step's synced weights. null = on in server mode, off with hf.",
        None)


@dataclass
class ServerConfig:
    base_urls: list[str] = doc(
        "Rollout server URLs (http://host:port). Without reuse_existing the launcher starts one server per "
        "URL (on its port), splits vllm.server_gpus evenly between them (CPU: the cores), sends each a share "
        "of the requests weighted by its world size and syncs weights into every one.", default_factory=list)
    reuse_existing: bool = doc("Use servers already running at base_urls instead of starting them.", False)
    host: str = doc(
        "Bind host of the servers the launcher starts. Anything but loopback (127.0.0.1, localhost, ::1) "
        "needs an API key in $COORDEXP_SERVER_API_KEY (so do non-loopback base_urls).", "127.0.0.1")
    python: str | None = doc(
        "The Python that runs `swift rollout` (a separate server environment with coordexp[server-gpu] "
        "installed, e.g. /opt/server-venv/bin/python); null = the learner's own Python.", None)
    template: str | None = doc(
        "ms-swift's chat template for the servers the launcher starts (`swift rollout --template`). null = "
        "the checkpoint's own family for Qwen-VL (config.json model_type qwen2_vl, qwen2_5_vl or qwen3_vl: "
        "ms-swift cannot tell them from look-alikes such as mimo_vl when the folder is renamed), chatml for "
        "the tiny model, else ms-swift's detection. The learner checks that the server's prompt ids equal "
        "its own, so a wrong template fails at the first rollout.", None)
    startup_timeout_s: float = doc("Deadline for /health/ after start.", 600.0)
    infer_timeout_s: float = doc("Per /infer/ call timeout (one retry, then a clear error).", 120.0)
    request_timeout_s: float = doc("Timeout of every other HTTP call.", 30.0)
    log_tail_lines: int = doc("Server log lines printed when the run fails.", 40)
    image_root: str | None = doc(
        "The server's ROOT_IMAGE_DIR: where it finds the image paths the learner sends, which are relative "
        "to the training JSONL's folder. null = that folder (server and learner share the filesystem).", None)


@dataclass
class SyncConfig:
    mode: SyncMode = doc("`full`: push all weights to the server before a Channel-B step whose weights "
                         "changed (required with > 1 learner process); `none`: never sync.", SyncMode.full)
    transport: SyncTransport = doc("`file`: learner writes safetensors, server loads them (CPU and GPU); "
                                   "`nccl`: NCCL broadcast (GPU).", SyncTransport.file)
    timeout_s: float = doc("Timeout of one weight sync (HTTP and collectives).", 120.0)
    bucket_mib: int = doc(
        "Weights gathered per bucket when the learner is sharded (training.fsdp): rank 0 holds at most this "
        "many MiB of gathered weights plus one module at a time; each bucket becomes one shard file (file) "
        "or one broadcast (nccl); unsharded learners: the NCCL broadcast size.", 512)


@dataclass
class VllmConfig:
    device: ServerDevice = doc("Where the rollout server runs.", ServerDevice.cpu)
    server: ServerConfig = doc("Server endpoints and timeouts.", default_factory=ServerConfig)
    sync: SyncConfig = doc("Weight sync.", default_factory=SyncConfig)
    max_model_len: int = doc("Server context length; must exceed rollout_matching.max_new_tokens.", 1024)
    dtype: DType = doc("Server dtype.", DType.float32)
    enforce_eager: bool = doc("Disable CUDA graphs / compilation in the server.", True)
    gpu_memory_utilization: float = doc("Fraction of each server GPU vLLM may use (GPU only).", 0.85)
    cpu_kvcache_space_gib: int = doc("KV cache size for a CPU server (VLLM_CPU_KVCACHE_SPACE).", 1)
    data_parallel_size: int = doc("Data-parallel engines of each server.", 1)
    tensor_parallel_size: int = doc("Tensor parallelism of each server.", 1)
    server_gpus: list[int] = doc(
        "GPU ids of the servers (device: cuda); disjoint from learner_gpus. With N base_urls the launcher "
        "gives server i the i-th of N equal contiguous slices (the count must divide by N, and each slice "
        "holds data_parallel_size x tensor_parallel_size GPUs).", default_factory=list)
    learner_gpus: list[int] = doc("GPU ids of the learner (device: cuda).", default_factory=list)


@dataclass
class TrainConfig:
    experiment: str = doc("Name of the experiment leaf (set by each leaf).")
    seed: int = doc("Global seed.", 17)
    model: ModelConfig = doc("Model to train.", default_factory=ModelConfig)
    data: DataConfig = doc("Data.", default_factory=DataConfig)
    training: TrainingConfig = doc("Optimization, logging and checkpoint policy.",
                                   default_factory=TrainingConfig)
    stage2_ab: Stage2ABConfig = doc("Stage-2 AB channel mix and losses.", default_factory=Stage2ABConfig)
    rollout_matching: RolloutMatchingConfig = doc("Rollout, parsing and matching (canonical rollout "
                                                  "namespace).", default_factory=RolloutMatchingConfig)
    vllm: VllmConfig = doc("Rollout server settings.", default_factory=VllmConfig)
    extra: dict[str, Any] = doc("Free-form user notes; recorded, never read by coordexp. Add a key with a "
                                "leading +: `+extra.note=baseline` (non-ASCII quoted: "
                                "\"+extra.note='猫'\").", default_factory=dict)

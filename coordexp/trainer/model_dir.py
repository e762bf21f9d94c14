"""The one answer to "which checkpoint directory do the learner and the rollout server load?".

`kind: local` -> `model.path`. `kind: tiny` -> the random tiny model built on demand, or, with
`model.tiny_stage1_steps > 0`, a Stage-1 checkpoint made from it by that many Channel-A steps on the
synthetic task (the state a real Stage-2 run starts from: the model already writes CoordJSON). Both are
cached; the key covers everything that changes the weights, so a cache hit is the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from coordexp.config.schema import (
    AdapterConfig,
    IntervalStrategy,
    ModelKind,
    Precision,
    TrainConfig,
)
from coordexp.errors import CoordexpError
from coordexp.models.adapter_checkpoint import is_adapter_checkpoint
from coordexp.models.tiny import ensure_tiny_model
from coordexp.telemetry.record import say


class ModelDirError(CoordexpError):
    """``model.path`` is not a checkpoint, or the tiny Stage-1 build cannot be made."""


def refuse_adapter_checkpoint(path: Path) -> None:
    """ModelDirError (exit 2) with both fixes when ``path`` is an adapter checkpoint: a training run (and its
    preflight) starts from full weights."""
    if is_adapter_checkpoint(path):
        raise ModelDirError(
            f"model.path '{path}' is an adapter checkpoint (LoRA/DoRA weights only): to continue "
            f"training that adapter pass training.resume_from_checkpoint={path}; to start a new run "
            f"from its weights, fold the adapter in first: python -m coordexp.models.export "
            f"--checkpoint {path} --out <folder>, then model.path=<folder>")


def prepare_model_dir(cfg: TrainConfig, allow_adapter: bool = False) -> Path:
    """The checkpoint folder to load. ``allow_adapter``: an adapter checkpoint (a LoRA/DoRA learner's,
    ``adapter_config.json`` without full weights) is accepted (coordexp.eval merges it onto its base);
    training refuses one as ``model.path`` with the fix (export it, or resume it)."""
    if cfg.model.kind == ModelKind.local:
        path = Path(cfg.model.path)
        if is_adapter_checkpoint(path):
            if allow_adapter:
                return path.resolve()
            refuse_adapter_checkpoint(path)
        if not (path / "config.json").is_file():
            raise ModelDirError(f"model.path '{path}' is not a checkpoint directory (no config.json): "
                                f"pass model.path=<local checkpoint dir>")
        return path.resolve()
    base = Path(ensure_tiny_model(cfg.model.path, arch=cfg.model.tiny_arch.value)).resolve()
    if cfg.model.tiny_stage1_steps == 0:
        return base
    stage1 = _stage1_config(cfg, base)
    key = hashlib.sha256(json.dumps(_weights_key(stage1), sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    target = base.parent / f"{base.name}-stage1-{cfg.model.tiny_stage1_steps}-{key}"
    if (target / "config.json").is_file():
        return target
    _train_stage1(stage1, target)
    return target


def _stage1_config(cfg: TrainConfig, base: Path) -> TrainConfig:
    t = dataclasses.replace(cfg.training, max_steps=cfg.model.tiny_stage1_steps,
                            eval_strategy=IntervalStrategy.no, save_strategy=IntervalStrategy.no,
                            resume_from_checkpoint=None, nproc_per_node=1,
                            gradient_accumulation_steps=None, warmup_steps=min(cfg.training.warmup_steps, 10),
                            per_device_train_batch_size=cfg.training.effective_batch_size, packing=False,
                            report_to=[],  # an internal step: no tracker run of its own
                            # plain full fine-tuning in fp32 (the cached checkpoint's key has no group knobs)
                            vit_lr=None, aligner_lr=None, precision=Precision.fp32,
                            gradient_checkpointing=False)
    schedule = dataclasses.replace(cfg.stage2_ab.schedule, b_ratio=0.0)
    # Stage 1 is plain SFT: teacher forcing without soft self-context passes, whatever the leaf runs after
    ab = dataclasses.replace(cfg.stage2_ab, schedule=schedule, n_softctx_iter=1)
    rm = dataclasses.replace(cfg.rollout_matching, pipeline=None,
                             rollout_backend=type(cfg.rollout_matching.rollout_backend).hf)
    # Stage 1 trains the full model (no adapter: the Stage-2 leaf's adapter starts from this checkpoint)
    model = dataclasses.replace(cfg.model, kind=ModelKind.local, path=str(base), tiny_stage1_steps=0,
                                adapter=AdapterConfig(), freeze_llm=False, freeze_vit=False,
                                freeze_aligner=False)
    return dataclasses.replace(cfg, model=model, training=t, stage2_ab=ab, rollout_matching=rm)


def _weights_key(stage1: TrainConfig) -> dict:
    t, ab = stage1.training, stage1.stage2_ab
    # the held-out split never reaches Stage 1 (no evals): its keys do not rebuild the checkpoint
    data = dataclasses.replace(stage1.data, val_jsonl=None, val_sample_limit=None,
                               synthetic=dataclasses.replace(stage1.data.synthetic, val_samples=0))
    # Stage 1 runs Channel A alone with one pass: the schedule, the Channel-B settings and the soft
    # self-context gradient mode cannot change its weights (the coordinate softmax temperature can)
    losses = {k: v for k, v in dataclasses.asdict(ab).items()
              if k not in ("schedule", "channel_b", "softctx_grad_mode", "n_softctx_iter")}
    # the base by its name (its build spec's hash), not its path: a moved repo or cache dir reuses the build
    return {"base": Path(stage1.model.path).name, "seed": stage1.seed, "steps": t.max_steps,
            "lr": t.learning_rate, "batch": t.effective_batch_size, "sched": t.lr_scheduler_type,
            "warmup": t.warmup_steps, "data": dataclasses.asdict(data), "losses": losses}


def _train_stage1(stage1: TrainConfig, target: Path) -> None:
    from coordexp.trainer.learner import train  # the learner imports this module: resolve at call time

    say(f"coordexp: building the tiny Stage-1 checkpoint ({stage1.training.max_steps} Channel-A steps) "
        f"-> {target}", file=sys.stdout)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        run = dataclasses.replace(stage1, training=dataclasses.replace(
            stage1.training, output_dir=str(work / "run"), logging_dir=str(work / "run" / "tb")))
        trainer = train(run, work / "run", summary=False)  # an internal step, not the user's run
        trainer.save_model(str(work / "model"))  # weights, tokenizer and a VLM's image processor
        try:
            os.rename(work / "model", target)
        except OSError:  # another process finished first: theirs is the same model
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

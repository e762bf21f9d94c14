"""The learner process: builds model, data, rollout backend and the Stage-2 trainer from a validated
config and trains. Runs in-process (one learner) or as each torchrun rank:

    python -m coordexp.trainer.learner --config <run_dir>/resolved_config.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from coordexp.config.contract import rollout_contract
from coordexp.config.load import load_saved
from coordexp.config.schema import (
    DataKind,
    ImageCheck,
    IntervalStrategy,
    ReportTo,
    RolloutBackend,
    TrainConfig,
)
from coordexp.config.trackers import tracker_environment
from coordexp.config.validate import config_warnings, derived_grad_accumulation
from coordexp.coordjson import FieldOrder, serialize_objects
from coordexp.data.jsonl import MAX_REPORTED_ERRORS, DataValidationError, load_jsonl
from coordexp.data.lazy_jsonl import LazyJsonlDataset, evenly_spaced
from coordexp.data.lengths import check_lengths, token_limit
from coordexp.data.prompt import PromptSpec
from coordexp.data.special_tokens import check_descs
from coordexp.data.synthetic import write_synthetic_split
from coordexp.errors import (
    CoordexpError,
    LearnerError,
    disk_full_is_an_error,
    exit_on_error,
    report_disk_full_in_threads,
)
from coordexp.models.param_groups import is_vision_language
from coordexp.models.progress import progress_bars_on_a_terminal_only
from coordexp.models.prompts import load_model_and_prompts
from coordexp.protocol import ENV_CONSOLE_LOG
from coordexp.rollout.hf_backend import HFRolloutBackend
from coordexp.rollout.scoring import TokenizerAdapter, gt_objects, stop_ids_of
from coordexp.rollout.server_backend import ServerRolloutBackend
from coordexp.telemetry.console import CompactProgressCallback
from coordexp.telemetry.record import say
from coordexp.telemetry.summary import run_summary, write_summary
from coordexp.telemetry.tensorboard import RegistryTensorBoardCallback
from coordexp.trainer import adapters, fsdp, optim, preemption, resume
from coordexp.trainer.channels import channel_a_sequence
from coordexp.trainer.evaluation import rollout_evaluator
from coordexp.trainer.model_dir import prepare_model_dir
from coordexp.trainer.packing import PackingSettings
from coordexp.trainer.stage2_trainer import Stage2ABTrainer
from coordexp.trainer.weight_sync import WeightSync

#: Timeout of the learner's default process group (every DDP/FSDP collective, the data-check gather): a
#: rank whose peers vanished without closing their sockets (a node lost) gives up after it. Ranks of a killed
#: orchestrator's node die with it (coordexp.launch.supervise) and their peers' next collective fails at once.
#: Long enough for rank 0's longest lone stretch (a full checkpoint write of a 7B model's state).
DDP_TIMEOUT_S = 300

__all__ = ["DDP_TIMEOUT_S", "LearnerError", "check_prompts", "exit_rank", "load_model", "load_samples",
           "main", "train"]


def load_model(cfg: TrainConfig, allow_adapter: bool = False):
    """(model, tokenizer, model_dir, prompt encoder) for the configured checkpoint (text or
    vision-language). ``allow_adapter``: an adapter checkpoint loads merged onto its base (coordexp.eval);
    training refuses one as model.path (coordexp.trainer.model_dir)."""
    try:
        model_dir = prepare_model_dir(cfg, allow_adapter=allow_adapter)
        model, tokenizer, prompts = load_model_and_prompts(model_dir, cfg.model.dtype.value)
    except CoordexpError as err:
        raise LearnerError(str(err)) from None
    return model, tokenizer, model_dir, prompts


def _rank_zero() -> bool:
    """This process is global rank 0 (or the only learner process)."""
    return int(os.environ.get("RANK", "0")) == 0


def announce_groups(model, cfg: TrainConfig, plan) -> None:
    """Rank 0 prints the parameter groups (total / trainable parameters, learning rate or frozen) and the
    config's warnings (``config.validate.config_warnings``)."""
    if not _rank_zero():
        return
    table = "\n  ".join(optim.group_table(model, plan))
    say(f"coordexp: parameter groups ({plan.model_type})\n  {table}", file=sys.stdout)
    for warning in config_warnings(cfg):
        say(f"coordexp: warning: {warning}")


def coord_vocab_adapter(tokenizer, model_dir):
    """The TokenizerAdapter, or a LearnerError saying how to add the coordinate vocabulary."""
    try:
        return TokenizerAdapter(tokenizer)
    except ValueError as err:
        raise LearnerError(
            f"the tokenizer of {model_dir} lacks the coordinate vocabulary: {err}. Fix: python -m "
            f"coordexp.models.add_coord_tokens --src {model_dir} --dst <new folder> adds the 1000 tokens "
            f"<|coord_0|>..<|coord_999|> and resizes the embeddings; then pass model.path=<new folder> "
            f"(docs/own_data.md)") from None


def load_samples(cfg: TrainConfig, run_dir: Path):
    """(train, val) DetectionSamples with their prompt messages; synthetic data is written to the run dir.
    With data.kind: jsonl, train is a LazyJsonlDataset (only the file's line offsets are read here; records
    are parsed on access; :func:`check_train_shard` checks it); otherwise both are lists, checked whole."""
    if cfg.data.kind == DataKind.synthetic:
        data_dir = run_dir / "data"
        train_path = write_synthetic_split(data_dir / "train.jsonl", cfg.data.synthetic, "train")
        val_path = write_synthetic_split(data_dir / "val.jsonl", cfg.data.synthetic, "val")
    else:
        train_path, val_path = Path(cfg.data.train_jsonl), cfg.data.val_jsonl and Path(cfg.data.val_jsonl)
    prompt = PromptSpec(object_field_order=cfg.data.object_field_order.value,
                        system_prompt=cfg.data.system_prompt)
    try:
        train = (list(load_jsonl(train_path, prompt)) if cfg.data.kind == DataKind.synthetic
                 else LazyJsonlDataset(train_path, prompt))
        val = list(load_jsonl(val_path, prompt, limit=cfg.data.val_sample_limit)) if val_path else []
    except (DataValidationError, FileNotFoundError) as err:
        raise LearnerError(str(err)) from None
    return train, val


def check_sample_lengths(cfg: TrainConfig, prompts, adapter: TokenizerAdapter, samples) -> None:
    """At load: no desc holds a special token (coordexp.data.special_tokens), and the one length rule
    (coordexp.data.lengths): prompt + Channel-A answer tokens of every sample within vllm.max_model_len -
    max_new_tokens. Exact counts only where a byte bound does not settle it (a token covers at least one
    byte), so a normal dataset is not tokenized here."""
    order = cfg.data.object_field_order.value

    def bound(sample) -> int:
        text = prompts.render(sample.messages) + serialize_objects(gt_objects(sample), FieldOrder(order))
        return len(text.encode()) + prompts.image_tokens(sample) + 1  # + EOS

    def count(sample) -> int:
        prompt = prompts.encode(sample)
        answer = channel_a_sequence(sample, prompt, adapter, order, cfg.stage2_ab).target_ids
        return len(prompt.ids) + len(answer)

    try:
        check_descs(samples, adapter.special_token_pattern)
    except DataValidationError as err:
        raise LearnerError(f"descs that hold special tokens:\n{err}") from None
    try:
        check_lengths(samples, count, token_limit(cfg), upper_bound=bound)
    except DataValidationError as err:
        raise LearnerError(f"samples too long for the context:\n{err}") from None


def check_train_shard(cfg: TrainConfig, prompts, adapter: TokenizerAdapter, dataset: LazyJsonlDataset,
                      rank: int = 0, world_size: int = 1):
    """Check rank ``rank``'s interleaved share (records rank, rank + world_size, ...) of the lazily read
    training JSONL before the first step, as the eager path checks a whole list: the record contract (every
    record of the share), then the images (existence, and the processor's resize against width/height:
    every record with data.image_check: all, else the share's part of data.image_check_samples evenly spaced
    records of the file), then the one length rule (every record). Same messages as the eager path. Under
    DDP the ranks' findings are gathered: rank 0 raises a LearnerError with every failing rank's list, the
    others a short one. Returns the training dataset for the Trainer: ``dataset`` itself, or with
    data.image_check: sample a view that checks each record's images when it is read."""
    sampled = cfg.data.image_check == ImageCheck.sample
    picks = set(evenly_spaced(len(dataset), cfg.data.image_check_samples)) if sampled else None
    share = range(rank, len(dataset), world_size)
    errors: list[str] = []
    samples, with_images_checked = [], []
    for i in _progress(share, "checking training records", enabled=rank == 0):
        checked = picks is None or i in picks
        try:
            sample = dataset.get(i, check_images=checked)
        except DataValidationError as err:
            errors.extend(err.errors)
            continue
        samples.append(sample)
        if checked:
            with_images_checked.append(sample)
    # every finding in one report: the records that parse are checked too (image sizes, lengths)
    found = [str(DataValidationError(errors[:MAX_REPORTED_ERRORS], len(errors)))] if errors else []
    for check, args in ((check_prompts, (prompts, with_images_checked)),
                        (check_sample_lengths, (cfg, prompts, adapter, samples))):
        try:
            check(*args)
        except LearnerError as err:
            found.append(str(err))
    message = "\n".join(found) or None
    del samples, with_images_checked
    _gather_failures(message, rank, world_size)
    return ImageCheckedOnRead(dataset, prompts) if sampled else dataset


def _progress(items, desc: str, enabled: bool):
    """``items`` with a tqdm bar on stderr (a terminal only; ``enabled``: this rank shows one)."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="rec", file=sys.stderr, disable=None, mininterval=1.0)


def _gather_failures(message: str | None, rank: int, world_size: int) -> None:
    """Raise this rank's ``message``; under DDP every rank fails when one does (rank 0 with all messages)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        if message:
            raise LearnerError(message)
        return
    messages: list[str | None] = [None] * world_size
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if not failed:
        return
    if rank == 0:
        raise LearnerError("\n".join(f"rank {r} (records {r}, {r + world_size}, ... of the file): {m}"
                                     for r, m in failed))
    raise LearnerError(f"the training data check failed on rank(s) {', '.join(str(r) for r, _ in failed)}; "
                       f"rank 0 lists the errors")


class ImageCheckedOnRead:
    """The training dataset under data.image_check: sample: a record's images are checked when the trainer
    reads it (existence, and the processor's resize against width/height), failing with its file:line."""

    def __init__(self, dataset: LazyJsonlDataset, prompts) -> None:
        self.dataset, self.prompts = dataset, prompts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            sample = self.dataset.get(i, check_images=True)
        except DataValidationError as err:
            raise LearnerError(str(err)) from None
        check_prompts(self.prompts, [sample])
        return sample


def check_prompts(prompts, samples) -> None:
    """Fail before training when a sample cannot be encoded for this model (image sizes, images on a text
    model)."""
    try:
        prompts.check(samples)
    except CoordexpError as err:
        raise LearnerError(str(err)) from None


def find_checkpoint(spec: str | None, run_dir: Path) -> str | None:
    """The checkpoint ``training.resume_from_checkpoint`` names (coordexp.trainer.resume: ``latest`` stays in
    the run's lineage), or None."""
    picked = resume.resolve(spec, run_dir, max_steps=0)
    return str(picked.checkpoint) if picked else None


def build_rollout_backend(contract, model, tokenizer, image_token_id=None):
    """The rollout backend: in-process ``generate`` on ``model`` (the very module the Trainer trains; DDP
    wraps it without copying), or the rollout server(s)."""
    if contract.backend == "hf":
        return HFRolloutBackend(lambda: model, tokenizer, contract, image_token_id)
    stop_ids = stop_ids_of(tokenizer)  # the checkpoint's stop-token set, also as the request's stop words
    words = [tokenizer.decode([i], skip_special_tokens=False) for i in stop_ids]
    return ServerRolloutBackend(contract, stop_ids=stop_ids, stop_words=words,
                                checkpoint_dir=getattr(tokenizer, "name_or_path", None))


def metrics_jsonl_callback(path: Path):
    """A callback that appends every log record (rank 0) to ``path`` (<run_dir>/metrics.jsonl)."""
    class MetricsJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsJsonl()


def earlier_run_notice(run_dir: Path, resumed) -> str | None:
    """The console line for a fresh run (``resumed`` None) into a run dir an earlier run left records or
    checkpoints in: the learner appends to ``metrics.jsonl``, ``train.log``, the rollout sample logs and
    TensorBoard's dir, and the Trainer overwrites a ``checkpoint-<N>`` of a step it saves again. None
    otherwise."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    has_records = metrics.is_file() and metrics.stat().st_size > 0
    # checkpoint-2 before checkpoint-10: by length, then by name
    names = [p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()]
    checkpoints = sorted(names, key=lambda n: (len(n), n))
    if resumed is not None or not (has_records or checkpoints):
        return None
    left = ", ".join(filter(None, ["metrics.jsonl records" if has_records else "",
                                   " ".join(checkpoints[:5]) + (" ..." if len(checkpoints) > 5 else "")]))
    return (f"coordexp: note: {run_dir} holds an earlier run ({left}) and no checkpoint is resumed: this run "
            f"appends to its metrics.jsonl, train.log and TensorBoard files and overwrites any checkpoint "
            f"of a step it saves again. For a clean record use a new hydra.run.dir; to continue the earlier "
            f"run pass training.resume_from_checkpoint=latest")


def train(cfg: TrainConfig, run_dir: Path, *, rank: bool = False, summary: bool = True):
    """Train to the end (or to the end of the step a preemption SIGTERM arrived in, with a checkpoint);
    returns the Stage2ABTrainer, or None when the checkpoint to resume from is already at max_steps (nothing
    is trained). ``rank``: this process is a torchrun rank (it handles SIGTERM itself). ``summary``: print
    the end-of-run summary and write it to the run dir (rank 0)."""
    set_seed(cfg.seed)
    t = cfg.training
    progress_bars_on_a_terminal_only()
    report_disk_full_in_threads()
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = resume.resolve(t.resume_from_checkpoint, run_dir, t.max_steps)
    if resumed is not None and resumed.complete:
        if _rank_zero():
            say(f"coordexp: {resumed.describe()}", file=sys.stdout)
        return None
    notice = earlier_run_notice(run_dir, resumed) if _rank_zero() else None  # rank 0 alone reads the dir
    if notice:
        say(notice)
    problem = resumed and adapters.resume_adapter_problem(resumed.checkpoint, cfg.model.adapter)
    if problem:  # the checkpoint's adapter (or its absence) is not what the config builds
        raise LearnerError(problem)
    contract = rollout_contract(cfg)
    if t.fsdp:  # before the model loads: on CPU accelerate would silently run DDP instead
        fsdp.require_cuda(torch.cuda.is_available())
    model, tokenizer, model_dir, prompts = load_model(cfg)
    adapter = coord_vocab_adapter(tokenizer, model_dir)
    # model.adapter: peft LoRA/DoRA on the language model, the coordinate-token rows trainable
    model = adapters.attach_adapter(model, cfg.model.adapter, adapter.coord_token_ids,
                                    full_groups=adapters.unfrozen_vision_groups(cfg.model))
    group_plan = optim.prepare_model(model, cfg)  # freezing, per-group rates (after any adapter is attached)
    announce_groups(model, cfg, group_plan)
    with disk_full_is_an_error("the run's data", run_dir):
        train_samples, val_samples = load_samples(cfg, run_dir)
    eager = list(train_samples) if isinstance(train_samples, list) else []  # lazy JSONL: checked below
    check_prompts(prompts, eager + val_samples)
    check_sample_lengths(cfg, prompts, adapter, eager + val_samples)
    os.environ["TENSORBOARD_LOGGING_DIR"] = t.logging_dir
    tracker_env = tracker_environment(t.report_to, run_dir)  # wandb offline, mlflow local: for this run only
    previous_env = {k: os.environ.get(k) for k in tracker_env}
    os.environ.update(tracker_env)
    trackers = [ReportTo(r).value for r in t.report_to]
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run_dir), run_name=t.run_name, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=contract.decode_batch_size,
        gradient_accumulation_steps=derived_grad_accumulation(cfg),
        learning_rate=t.learning_rate, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,  # TensorBoard and wandb through coordexp's callbacks (registry names)
        report_to=[r for r in trackers if r not in ("tensorboard", "wandb")] or "none",
        eval_strategy=t.eval_strategy.value if val_samples else "no",
        eval_steps=t.eval_steps if t.eval_strategy == IntervalStrategy.steps else None,
        save_strategy=t.save_strategy.value, save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        metric_for_best_model=t.metric_for_best_model, greater_is_better=True,
        remove_unused_columns=False, dataloader_num_workers=t.dataloader_num_workers,
        **optim.precision_arguments(t, torch.cuda.is_available()),
        use_cpu=use_cpu, ddp_timeout=DDP_TIMEOUT_S,
        # every parameter of a text model takes part in every step (soft self-context passes, kept logits,
        # an empty step's zero loss over all parameters): DDP need not search the graph for unused ones (the
        # search costs a graph traversal per step and warns on every rank); a VLM's vision tower sits out a
        # micro-batch without images, so it keeps transformers' default
        ddp_find_unused_parameters=None if is_vision_language(model.config) else False,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        **fsdp.training_arguments(t, model, torch.cuda.is_available()),
    )
    if isinstance(train_samples, LazyJsonlDataset):  # each rank checks its share (the process group is up)
        train_samples = check_train_shard(cfg, prompts, adapter, train_samples, args.process_index,
                                          args.world_size)
    backend = build_rollout_backend(contract, model, tokenizer, prompts.image_token_id)
    weight_sync = (WeightSync.from_contract(contract, run_dir, model_dir=str(model_dir))
                   if contract.backend == "vllm" else None)
    evaluator = rollout_evaluator(val_samples, adapter, prompts, contract, cfg.seed) if val_samples else None
    trainer = Stage2ABTrainer(
        model=model, args=args, train_dataset=train_samples, eval_dataset=val_samples or None,
        data_collator=lambda batch: {"samples": batch}, processing_class=tokenizer,
        callbacks=[metrics_jsonl_callback(run_dir / "metrics.jsonl")],
        stage2_ab=cfg.stage2_ab, contract=contract, adapter=adapter, prompts=prompts, rollout_backend=backend,
        seed=cfg.seed, run_dir=run_dir, evaluator=evaluator, weight_sync=weight_sync,
        packing=PackingSettings.from_training(t), group_plan=group_plan)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback)
    if "tensorboard" in trackers:
        trainer.add_callback(RegistryTensorBoardCallback)
    if "wandb" in trackers:  # wandb is installed (config validation); imported only when asked for
        from coordexp.telemetry.trackers import RegistryWandbCallback

        trainer.add_callback(RegistryWandbCallback)
    if t.checkpoint_on_sigterm and t.save_strategy == IntervalStrategy.steps:
        trainer.add_callback(preemption.PreemptionCallback(install_rank_handler=rank))
    try:
        with disk_full_is_an_error("checkpoints, metrics or weight-sync files", run_dir):
            trainer.train(resume_from_checkpoint=str(resumed.checkpoint) if resumed else None)
    finally:
        preemption.deactivate()
        if len(contract.server_base_urls) > 1 and hasattr(backend, "log_request_counts"):
            backend.log_request_counts()  # how the requests split over the servers (docs/runbook.md)
        for key, value in previous_env.items():  # the next job of an in-process sweep gets its own
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if summary and trainer.is_world_process_zero():
        end_of_run_summary(trainer, cfg, run_dir, resumed, trackers)
    return trainer


def end_of_run_summary(trainer, cfg: TrainConfig, run_dir: Path, resumed, trackers: list[str]) -> str:
    """Print the end-of-run summary (run dir, best checkpoint and metric, final eval numbers, how to open
    TensorBoard) and write it to <run_dir>/summary.txt."""
    state, t = trainer.state, cfg.training
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    signum = preemption.requested()
    text = run_summary(
        run_dir=run_dir, logging_dir=t.logging_dir, global_step=state.global_step, max_steps=t.max_steps,
        log_history=state.log_history, metric=t.metric_for_best_model,
        best_checkpoint=state.best_model_checkpoint, best_metric=state.best_metric,
        last_checkpoint=str(checkpoints[-1]) if checkpoints else None,
        resumed_from=str(resumed.checkpoint) if resumed else None, trackers=trackers,
        console_record=Path(os.environ[ENV_CONSOLE_LOG]) if os.environ.get(ENV_CONSOLE_LOG) else None,
        stopped_by=signal.Signals(signum).name if signum else None, experiment=cfg.experiment,
        rollout="hf" if cfg.rollout_matching.rollout_backend == RolloutBackend.hf else "vllm_server",
        overrides=resume.read_metadata(run_dir).get("overrides") or [])
    with disk_full_is_an_error("summary.txt", run_dir):
        write_summary(text, run_dir)
    say(text, file=sys.stdout)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stage-2 AB learner (one process or one torchrun rank)")
    parser.add_argument("--config", required=True, help="resolved_config.yaml written by coordexp.train")
    ns = parser.parse_args(argv)
    with exit_on_error():
        cfg = load_saved(ns.config)
    try:
        train(cfg, Path(cfg.training.output_dir), rank=True)
        signum = preemption.requested()
        return 128 + signum if signum else 0
    except CoordexpError as err:
        say(f"error: {err}")
        return err.code


def exit_rank(code: int) -> None:
    """End the process with ``code``. A torchrun rank skips interpreter finalization: gloo's worker threads
    keep the last collective's work (and its tensors) a moment after it completes, and a thread that drops
    a Python tensor while the interpreter is finalizing aborts the rank with SIGABRT ("terminate called
    without an active exception") after training has finished. Everything the learner writes is closed by
    then (metrics, samples, checkpoints, TensorBoard on train end)."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())

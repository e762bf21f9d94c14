"""`python -m coordexp.eval +experiment=<leaf> model.kind=local model.path=<checkpoint> [overrides]`

Evaluates a checkpoint on a held-out JSONL split with the run's own config tree (conf/train.yaml):
rollouts through the configured backend, strict parse, Hungarian matching at IoU 0.50:0.05:0.95,
COCO AP (constant score and mean coordinate-token probability), parse/truncation/duplicate/forced-EOS
rates. Writes into the Hydra run dir (default ``runs/<experiment>-eval/<timestamp>/``, apart from
training runs): eval_report.json, predictions.jsonl, qualitative/eval.md and viz/*.png. The split is
``data.val_jsonl`` if set, else (``data.kind: synthetic``) the synthetic held-out split generated exactly
as the learner does. ``-m`` sweeps, e.g. over ``model.path=a,b``.

Backends: ``rollout=hf`` generates in-process. ``rollout=vllm_server`` starts a ``swift rollout`` server
for the checkpoint through the launcher's lifecycle (:class:`coordexp.launch.rollout_server.RolloutServer`:
port check, health wait, activation probe; log ``<out_dir>/server/swift_rollout.log``), rolls out through
:class:`coordexp.rollout.server_backend.ServerRolloutBackend` without weight sync (the server loaded the
checkpoint itself) and stops the server on every exit path (return, error, SIGINT, SIGTERM); with
``vllm.server.reuse_existing=true`` it uses the running server at ``vllm.server.base_urls`` as it is. The
teacher-forced coordinate-probability scorer always runs on the in-process model.

Adapter checkpoints (a LoRA/DoRA learner's ``checkpoint-<N>``: ``adapter_config.json``, no full weights)
load onto their base with the adapter merged (:mod:`coordexp.models.adapter_checkpoint`); the server of
``rollout=vllm_server`` serves their export (``coordexp.models.export``, into ``<out_dir>/merged_model``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from coordexp.cli import run_hydra, run_job
from coordexp.config.contract import rollout_contract
from coordexp.config.paths import CONF_DIR
from coordexp.config.schema import DataKind, ModelKind, TrainConfig
from coordexp.data.jsonl import load_jsonl
from coordexp.data.prompt import PromptSpec
from coordexp.data.synthetic import write_synthetic_split
from coordexp.errors import CoordexpError, EvalError, ServerStartError
from coordexp.evaluation.coco_export import CocoExport, CocoExportError, pop_export_flags
from coordexp.launch.process import terminate_on_signals
from coordexp.launch.rollout_server import RolloutServer
from coordexp.models.adapter_checkpoint import is_adapter_checkpoint
from coordexp.models.progress import progress_bars_on_a_terminal_only

#: Where evals go unless hydra.run.dir / hydra.sweep.dir are given (training runs use runs/<experiment>/...).
DEFAULT_DIRS = {"hydra.run.dir": "runs/${experiment}-eval/${now:%Y-%m-%d_%H-%M-%S}",
                "hydra.sweep.dir": "runs/${experiment}-eval-sweep/${now:%Y-%m-%d_%H-%M-%S}"}
#: ``--coco-results <path>`` [``--coco-categories <path>``]: the COCO results export (docs/evaluation.md).
COCO_EXPORT: CocoExport | None = None


def load_eval_samples(cfg: TrainConfig, out_dir: Path) -> tuple[list, Path]:
    """(samples, split path): data.val_jsonl, else the synthetic held-out split (seed + 1, as the learner)."""
    if cfg.data.val_jsonl:  # a file: checked before the eval started (value_rules.data_file_problems)
        path = Path(cfg.data.val_jsonl)
    elif cfg.data.kind == DataKind.synthetic:
        path = write_synthetic_split(out_dir / "data" / "val.jsonl", cfg.data.synthetic, "val")
    else:
        raise EvalError("no held-out split: pass data.val_jsonl=<file> (data.kind: jsonl has no generated "
                        "split)")
    prompt = PromptSpec(object_field_order=cfg.data.object_field_order.value,
                        system_prompt=cfg.data.system_prompt)
    try:  # the same samples (DetectionSample with prompt messages) the learner evaluates on
        samples = list(load_jsonl(path, prompt, limit=cfg.data.val_sample_limit))
    except (OSError, ValueError) as err:
        raise EvalError(str(err)) from None
    if not samples:
        raise EvalError(f"{path}: no samples to evaluate")
    return samples, path


def build_backend(cfg: TrainConfig, contract, model, tokenizer, prompts, model_dir: Path):
    """A RolloutBackend for the checkpoint: the in-process ``model`` (``rollout=hf``) or the rollout server
    serving ``model_dir`` (``rollout=vllm_server``, started by :func:`start_server`). Any object with
    ``generate(prompt_ids, messages, seed, vision=None)`` works with
    ``coordexp.evaluation.pipeline.evaluate_rollouts``."""
    from coordexp.trainer.learner import build_rollout_backend  # torch and transformers

    # no learner, no weight sync: the server loaded the checkpoint itself
    return build_rollout_backend(contract, model, tokenizer, prompts.image_token_id)


def start_server(stack: contextlib.ExitStack, cfg: TrainConfig, model_dir: Path, out_dir: Path):
    """The rollout server for ``model_dir``, entered on ``stack`` (stopped when the stack closes, on every
    exit path): started as coordexp.train starts it, or the running one for ``vllm.server.reuse_existing``."""
    try:
        server = RolloutServer.from_config(cfg, model_dir=model_dir,
                                           log_path=out_dir / "server" / "swift_rollout.log")
        stack.enter_context(server)
    except ServerStartError as err:
        raise EvalError(str(err), code=3) from None
    if server.reuse_existing:
        print(f"coordexp.eval: rolling out with the weights the server at {server.base_url} holds; it must "
              f"serve {model_dir} (no weight sync)", file=sys.stderr, flush=True)
    return server


def export_for_server(checkpoint: Path, out: Path) -> Path:
    """The deployable export of the adapter checkpoint ``checkpoint`` in ``out`` (a server loads full weights
    only); EvalError when it cannot be written."""
    from coordexp.models.export import export_checkpoint  # torch and transformers: the model is loaded

    print(f"coordexp.eval: {checkpoint} is an adapter checkpoint: the server gets its merged export {out}",
          file=sys.stderr, flush=True)
    try:
        export_checkpoint(checkpoint, out)
    except CoordexpError as err:
        raise EvalError(str(err)) from None
    return out


def _checkpoint_meta(model_dir: Path) -> dict:
    meta = {"checkpoint": str(model_dir)}
    state = model_dir / "trainer_state.json"
    if state.is_file():
        try:
            meta["global_step"] = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError):
            pass
    return meta


def run_eval(cfg: TrainConfig, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    contract = rollout_contract(cfg)
    path = Path(cfg.model.path)
    loadable = (path / "config.json").is_file() or is_adapter_checkpoint(path)
    if cfg.model.kind == ModelKind.local and not loadable:
        raise EvalError(f"model.path '{cfg.model.path}' is not a checkpoint directory (no config.json): pass "
                        f"model.path=<checkpoint dir>, e.g. <run_dir>/checkpoint-<N>")
    samples, split = load_eval_samples(cfg, out_dir)  # data problems fail before torch and the model load
    if COCO_EXPORT is not None:
        try:
            COCO_EXPORT.check(samples, split)
        except CocoExportError as err:
            raise EvalError(str(err)) from None

    # torch, transformers and the model: only after the config and the data passed their checks
    import torch
    from transformers import set_seed

    from coordexp.evaluation.artifacts import (
        PREDICTIONS_NAME,
        VIZ_LIMIT,
        write_predictions,
        write_qualitative,
    )
    from coordexp.evaluation.pipeline import evaluate_rollouts
    from coordexp.evaluation.report import REPORT_NAME, format_summary, write_report
    from coordexp.evaluation.scoring import TeacherForcedScorer
    from coordexp.rollout.scoring import TokenizerAdapter
    from coordexp.trainer.learner import check_prompts, load_model
    from coordexp.viz import write_sample_pngs

    set_seed(cfg.seed)
    try:
        model, tokenizer, model_dir, prompts = load_model(cfg, allow_adapter=True)
        check_prompts(prompts, samples)
    except (CoordexpError, OSError) as err:
        raise EvalError(str(err)) from None
    try:
        adapter = TokenizerAdapter(tokenizer)
    except ValueError as err:
        raise EvalError(f"the tokenizer of {model_dir} lacks the coordinate vocabulary: {err}. Fix: python "
                        f"-m coordexp.models.add_coord_tokens --src {model_dir} --dst <new folder> "
                        f"(docs/own_data.md)") from None
    if torch.cuda.is_available():
        model.to("cuda")
    has_images = any(s.images for s in samples)
    scorer = None if has_images else TeacherForcedScorer(model, adapter.pad_id, contract.decode_batch_size)
    meta = {"experiment": cfg.experiment, **_checkpoint_meta(Path(model_dir)),
            "split": {"path": str(split), "samples": len(samples)}, "seed": cfg.seed}
    if has_images:
        meta["notes"] = ["coord-prob score skipped: the teacher-forced scorer is text-only and the split has "
                         "images"]
    with contextlib.ExitStack() as stack:  # rollout=vllm_server: the server stops when this block is left
        server = None
        if contract.backend == "vllm":
            served = Path(model_dir)
            if is_adapter_checkpoint(served) and not cfg.vllm.server.reuse_existing:
                served = export_for_server(served, out_dir / "merged_model")
                meta["served_export"] = str(served)
            server = start_server(stack, cfg, served, out_dir)
            meta["server"] = server.describe()
        backend = build_backend(cfg, contract, model, tokenizer, prompts, Path(model_dir))
        print(f"coordexp.eval: {len(samples)} samples from {split}, checkpoint {model_dir}", flush=True)
        try:
            result = evaluate_rollouts(samples, backend, adapter, prompts, contract, seed=cfg.seed,
                                       scorer=scorer, meta=meta)
        except CoordexpError as err:  # the server failed, answered garbage or rendered another prompt
            started = server is not None and server.spec is not None
            tail = f"\n--- last lines of {server.log_path} ---\n{server.log_tail()}" if started else ""
            raise EvalError(f"{err}{tail}") from None
    report_path = write_report(result.report, out_dir / REPORT_NAME)
    write_predictions(result.records, out_dir / PREDICTIONS_NAME)
    write_qualitative(result.records, out_dir / "qualitative" / "eval.md",
                      title=f"coordexp.eval: {model_dir}")
    write_sample_pngs(result.records, out_dir / "viz", limit=VIZ_LIMIT, image_root=split.parent)
    print(format_summary(result.report))
    print(f"report: {report_path}")
    if COCO_EXPORT is not None:
        print(COCO_EXPORT.describe(COCO_EXPORT.write(result.records, samples)))
    return 0


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_task(cfg: DictConfig) -> int:
    def job(train_cfg: TrainConfig) -> int:
        try:
            # SIGINT/SIGTERM end the eval as SystemExit(128 + signal): the server stops, no traceback
            with terminate_on_signals():
                return run_eval(train_cfg, Path(HydraConfig.get().runtime.output_dir))
        except EvalError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.code

    return run_job(cfg, job, "eval job", training=False)


#: What ``--help`` shows before Hydra's own help: the flags coordexp.eval takes besides Hydra's.
FLAGS_HELP = """coordexp.eval flags (anywhere on the command line; docs/evaluation.md):
  --coco-results PATH      also write the predictions as a COCO results file (a split converted by
                           python -m coordexp.data.convert, whose records carry metadata.image_id)
  --coco-categories PATH   the desc -> category_id map (default: <split stem>.categories.json next to it)
"""


def main(argv: list[str] | None = None) -> None:
    global COCO_EXPORT
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(FLAGS_HELP)
    try:
        sys.argv[1:], flags = pop_export_flags(sys.argv[1:])
    except CocoExportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.code)
    if flags:
        COCO_EXPORT = CocoExport(Path(flags["--coco-results"]).resolve(), flags.get("--coco-categories"))
    progress_bars_on_a_terminal_only()
    # DEFAULT_DIRS: evals apart from training runs unless told otherwise; no training data needed
    run_hydra(hydra_task, extra=DEFAULT_DIRS, training=False)


if __name__ == "__main__":
    main()

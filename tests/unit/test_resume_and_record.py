"""Resume lineage (issue 17, item 4), the console record and writer, the end-of-run summary and the metric
registry (item 3), on real files. The real-run proofs are tests/integration/test_run_record.py."""

from __future__ import annotations

import importlib.util
import io
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

from coordexp.config.metric_names import DOCUMENTED, documented_names, is_registered
from coordexp.config.schema import ReportTo
from coordexp.config.trackers import tracker_environment, tracker_problems
from coordexp.errors import LearnerError
from coordexp.protocol import ENV_CONSOLE_LOG
from coordexp.telemetry.record import say
from coordexp.telemetry.summary import eval_overrides, run_summary
from coordexp.trainer import resume
from tests.conftest import REPO_ROOT


def make_run(root: Path, name: str, overrides: list[str], steps: tuple[int, ...] = ()) -> Path:
    """A run dir as Hydra and the Trainer leave it: .hydra/overrides.yaml, checkpoint-<N>/trainer_state."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    for step in steps:
        checkpoint(run / f"checkpoint-{step}", step)
    return run


def checkpoint(path: Path, step: int) -> Path:
    """The files of a Trainer checkpoint a resume reads (empty stand-ins but trainer_state.json)."""
    path.mkdir()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


LEAF = "+experiment=smoke/ab_mixed"
LATEST = "training.resume_from_checkpoint=latest"


def test_latest_stays_in_the_runs_lineage(tmp_path):
    """A preempted sweep job requeued: its own earlier attempt is picked, never the job with another
    b_ratio that has a newer, later checkpoint."""
    old = tmp_path / "sweep_old"
    mine_before = make_run(old, "0", [LEAF, "stage2_ab.schedule.b_ratio=0.25"], steps=(2, 4))
    make_run(old, "1", [LEAF, "stage2_ab.schedule.b_ratio=0.5"], steps=(2, 4, 6))
    (old / "multirun.yaml").write_text("{}")
    new = tmp_path / "sweep_new"
    me = make_run(new, "0", [LEAF, "stage2_ab.schedule.b_ratio=0.25", LATEST])
    make_run(new, "1", [LEAF, "stage2_ab.schedule.b_ratio=0.5", LATEST], steps=(8,))
    picked = resume.resolve("latest", me, max_steps=10)
    assert picked.checkpoint == (mine_before / "checkpoint-4").resolve()
    assert (picked.global_step, picked.complete) == (4, False)
    assert picked.searched == (me.resolve(), mine_before.resolve())
    assert picked.describe() == f"resuming from {mine_before.resolve()}/checkpoint-4 (step 4 of 10)"


def test_latest_of_a_single_run_prefers_its_own_dir_and_same_overrides(tmp_path):
    first = make_run(tmp_path, "2026-01-01_00-00-00", [LEAF], steps=(100,))
    make_run(tmp_path, "2026-01-02_00-00-00", [LEAF, "training.learning_rate=1"], steps=(150,))
    me = make_run(tmp_path, "2026-01-03_00-00-00", [LEAF, LATEST])
    assert resume.resolve("latest", me, 150).checkpoint == (first / "checkpoint-100").resolve()
    checkpoint(me / "checkpoint-120", 120)  # its own dir counts too (a restart in place)
    assert resume.resolve("latest", me, 150).checkpoint == (me / "checkpoint-120").resolve()


def test_a_finished_run_trains_on_with_a_higher_max_steps(tmp_path):
    """The "already complete" fix, as the message gives it: the same command with a higher max_steps and
    latest finds the finished run's checkpoint (max_steps is no part of the lineage)."""
    done = make_run(tmp_path, "2026-01-01_00-00-00", [LEAF, "training.max_steps=4", LATEST], steps=(4,))
    complete = resume.resolve("latest", done, 4)
    assert complete.complete and "a higher training.max_steps and training.resume_from_checkpoint=latest" in \
        complete.describe()
    me = make_run(tmp_path, "2026-01-02_00-00-00", [LEAF, "training.max_steps=6", LATEST])
    on = resume.resolve("latest", me, 6)
    assert (on.checkpoint, on.global_step, on.complete) == ((done / "checkpoint-4").resolve(), 4, False)


def test_a_misspelt_latest_is_named(tmp_path):
    with pytest.raises(LearnerError, match=r"'lastest' is neither .* \(did you mean "
                                           r"training.resume_from_checkpoint=latest\?\)$"):
        resume.resolve("lastest", tmp_path, 4)
    with pytest.raises(LearnerError, match=r"did you mean training.resume_from_checkpoint=latest\?"):
        resume.resolve(str(tmp_path / "lastest"), tmp_path, 4)  # as the config passes it: made absolute
    with pytest.raises(LearnerError) as err:
        resume.resolve(str(tmp_path / "no_such_run"), tmp_path, 4)
    assert "did you mean" not in str(err.value)


def test_no_checkpoint_in_the_lineage_is_a_clear_error(tmp_path):
    make_run(tmp_path, "other", [LEAF, "stage2_ab.schedule.b_ratio=0.5"], steps=(4,))
    me = make_run(tmp_path, "me", [LEAF, LATEST])
    with pytest.raises(LearnerError, match=r"no checkpoint-\* in this run's lineage .*\n  .*/me\nStart"):
        resume.resolve("latest", me, 4)


def test_a_checkpoint_at_max_steps_is_complete(tmp_path):
    run = make_run(tmp_path, "r", [LEAF], steps=(4,))
    done = resume.resolve(str(run), run, max_steps=4)
    assert done.complete
    assert done.describe().startswith(f"already complete: {run.resolve()}/checkpoint-4 is at step 4, "
                                      f"training.max_steps is 4; nothing to train")
    assert resume.resolve(str(run / "checkpoint-4"), run, max_steps=5).complete is False
    resume.record(run, done)
    assert json.loads((run / "run_metadata.json").read_text())["resumed_from"] == {
        "checkpoint": str((run / "checkpoint-4").resolve()), "global_step": 4, "max_steps": 4,
        "complete": True}


def test_a_checkpoint_without_its_optimizer_scheduler_or_rng_state_is_refused_by_name(tmp_path):
    """transformers' Trainer resumes from such a checkpoint without a word and restarts the optimizer and the
    learning-rate schedule (warmup again): a partial copy must not resume silently."""
    run = make_run(tmp_path, "r", [LEAF], steps=(3, 6))
    (run / "checkpoint-6" / "optimizer.pt").unlink()
    (run / "checkpoint-6" / "scheduler.pt").unlink()
    assert resume.missing_state(run / "checkpoint-6") == ["optimizer.pt (the optimizer state)",
                                                           "scheduler.pt (the learning-rate schedule)"]
    with pytest.raises(LearnerError) as err:
        resume.resolve(str(run / "checkpoint-6"), run, max_steps=8)
    assert str(err.value) == (
        f"training.resume_from_checkpoint={run / 'checkpoint-6'}: {run / 'checkpoint-6'} lacks optimizer.pt "
        f"(the optimizer state), scheduler.pt (the learning-rate schedule), so a resume would restart what "
        f"it holds without a word. Fix: restore the file(s) (copy the whole checkpoint dir), or pass "
        f"training.resume_from_checkpoint=<an earlier checkpoint dir>")
    # latest passes over it to the newest complete checkpoint, and says so
    picked = resume.resolve("latest", run, max_steps=8)
    assert picked.checkpoint == (run / "checkpoint-3").resolve()
    assert picked.describe().endswith("(step 3 of 8); skipped the newer checkpoint-6 (lacks optimizer.pt "
                                      "(the optimizer state), scheduler.pt (the learning-rate schedule))")
    (run / "checkpoint-3" / "rng_state.pth").unlink()
    with pytest.raises(LearnerError, match=r"latest: no complete checkpoint in this run's lineage; skipped "
                                           r"checkpoint-6 .*; checkpoint-3 \(lacks rng_state.pth"):
        resume.resolve("latest", run, max_steps=8)
    # FSDP saves the optimizer state as a folder
    (run / "checkpoint-3" / "rng_state_0.pth").write_bytes(b"")
    (run / "checkpoint-6" / "optimizer_0").mkdir()
    (run / "checkpoint-6" / "scheduler.pt").write_bytes(b"")
    assert resume.missing_state(run / "checkpoint-6") == [] == resume.missing_state(run / "checkpoint-3")


def test_tied_lm_head_is_not_reported_missing():
    def model(tie: bool):
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=tie))

    tied = model(True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert resume.tied_keys_loaded(tied, ["lm_head.weight"]) == ["lm_head.weight"]
    # the tied tensor itself missing, or an untied head: really missing
    assert resume.tied_keys_loaded(tied, ["lm_head.weight", "model.embed_tokens.weight"]) == []
    assert resume.tied_keys_loaded(model(False), ["lm_head.weight"]) == []
    state = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    result = tied.load_state_dict(state, strict=False)  # what the Trainer does on resume
    assert result.missing_keys == ["lm_head.weight"] and torch.equal(tied.lm_head.weight, state[
        "model.embed_tokens.weight"])


def test_say_goes_through_the_bar_and_into_the_record(tmp_path, monkeypatch):
    record = tmp_path / "train.log"
    monkeypatch.setenv(ENV_CONSOLE_LOG, str(record))
    out = io.StringIO()
    with tqdm(total=3, file=out, ascii=True, ncols=40) as bar:
        bar.update(1)
        say("[coordexp weight sync] step 1: pushed", file=out)
        bar.update(1)
    text = out.getvalue()
    # the line stands alone: the bar was cleared before it and redrawn after it
    assert any(f"{sep}[coordexp weight sync] step 1: pushed\n" in text for sep in ("\r", "\n"))
    assert text.index("pushed\n") < text.rindex("2/3")
    assert record.read_text() == "[coordexp weight sync] step 1: pushed\n"  # no bar in the record
    monkeypatch.delenv(ENV_CONSOLE_LOG)
    say("not recorded", file=io.StringIO())
    assert record.read_text() == "[coordexp weight sync] step 1: pushed\n"


def test_summary_says_why_there_is_no_best_checkpoint(tmp_path):
    """The best eval at step 4 of evals every 2 steps, checkpoints every 3: no checkpoint holds it."""
    history = [{"eval_rollout/f1": 0.582, "step": 2}, {"eval_rollout/f1": 0.642, "step": 4},
               {"eval_rollout/f1": 0.402, "step": 6}]
    last = str(tmp_path / "checkpoint-6")
    kwargs = {"run_dir": tmp_path, "logging_dir": None, "global_step": 6, "max_steps": 6,
              "metric": "eval_rollout/f1", "best_checkpoint": None, "best_metric": None,
              "last_checkpoint": last}
    rows = run_summary(log_history=history, **kwargs).splitlines()
    assert rows[3] == ("  best checkpoint:  none: the best eval (eval_rollout/f1 0.6420 at step 4) fell on a "
                       "step without a checkpoint (a checkpoint at every eval needs training.eval_steps "
                       "to be a multiple of training.save_steps)")
    assert rows[-1].endswith(f"model.path={last}")  # the evaluate line falls back to the last checkpoint
    rows = run_summary(log_history=[{"loss": 1.0, "step": 6}], **kwargs).splitlines()
    assert rows[3] == "  best checkpoint:  none (no eval ran: training.eval_strategy, or no held-out split)"


def test_summary_names_the_run_the_best_checkpoint_and_the_final_eval(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # no Hydra job: relative paths to the cwd
    history = [{"loss": 1.0, "step": 2}, {"eval_rollout/f1": 0.25, "eval_rollout/precision": 0.5, "step": 2},
               {"eval_rollout/f1": 0.5, "eval_rollout/precision": 0.75, "eval_rollout/recall": 0.375,
                "step": 4}]
    best = str(tmp_path / "checkpoint-4")
    text = run_summary(run_dir=tmp_path, logging_dir=str(tmp_path / "tb"), global_step=4, max_steps=4,
                       log_history=history, metric="eval_rollout/f1", best_checkpoint=best, best_metric=0.5,
                       last_checkpoint=best, resumed_from=str(tmp_path / "checkpoint-2"))
    assert text.splitlines() == [
        "coordexp run summary",
        f"  run dir:          {tmp_path}",
        f"  steps:            4/4 (resumed from {tmp_path}/checkpoint-2)",
        f"  best checkpoint:  {tmp_path}/checkpoint-4 (eval_rollout/f1 0.5000)",
        f"  last checkpoint:  {tmp_path}/checkpoint-4",
        "  final eval @4:    f1 0.5000 | precision 0.7500 | recall 0.3750",
        f"  metrics:          {tmp_path}/metrics.jsonl",
        f"  TensorBoard:      tensorboard --logdir {tmp_path}/tb",
        f"  plot:             python -m coordexp.plot {tmp_path}",
        f"  evaluate:         python -m coordexp.eval +experiment=<leaf> model.kind=local "
        f"model.path={tmp_path}/checkpoint-4",
    ]
    # the run's rollout group travels into the eval command (an hf run is evaluated with hf)
    text = run_summary(run_dir=tmp_path, logging_dir=None, global_step=4, max_steps=4, log_history=history,
                       metric="eval_rollout/f1", best_checkpoint=best, best_metric=0.5, last_checkpoint=best,
                       experiment="smoke/ab_mixed", rollout="hf")
    assert text.splitlines()[-1] == ("  evaluate:         python -m coordexp.eval +experiment=smoke/ab_mixed "
                                     f"model.kind=local model.path={tmp_path}/checkpoint-4 rollout=hf")
    # and the run's overrides that shape its eval: its own held-out split, prompt, seed, decoding
    overrides = ["+experiment=smoke/ab_mixed_vl", "rollout=hf", "data=jsonl",
                 "data.train_jsonl=/d/train.jsonl", "data.val_jsonl=/d/val café.jsonl",
                 "data.system_prompt='Réponds en français'", "seed=7", "model.tiny_stage1_steps=0",
                 "model.path=/x", "training.max_steps=4", "stage2_ab.schedule.b_ratio=1",
                 "rollout_matching.max_new_tokens=64", "hydra.run.dir=/r", "hydra/launcher=coordexp",
                 "+extra.note=猫", "vllm.server.image_root=imgs", "model.adapter.kind=dora",
                 "model.adapter.r=8", "model.freeze_vit=true"]
    assert eval_overrides(overrides) == [
        "data=jsonl", "data.train_jsonl=/d/train.jsonl", "data.val_jsonl=/d/val café.jsonl",
        "data.system_prompt='Réponds en français'", "seed=7", "model.tiny_stage1_steps=0",
        "rollout_matching.max_new_tokens=64", "+extra.note=猫", f"vllm.server.image_root={Path.cwd()}/imgs"]
    # a relative data path is made absolute, so the command works pasted in any directory
    assert eval_overrides(["data.val_jsonl=cx/val.jsonl", "data.train_jsonl=~/t.jsonl"]) == [
        f"data.val_jsonl={Path.cwd()}/cx/val.jsonl", "data.train_jsonl=~/t.jsonl"]
    text = run_summary(run_dir=tmp_path, logging_dir=None, global_step=4, max_steps=4, log_history=history,
                       metric="eval_rollout/f1", best_checkpoint=best, best_metric=0.5, last_checkpoint=best,
                       experiment="smoke/ab_mixed_vl", rollout="hf", overrides=overrides)
    command = text.splitlines()[-1].split("evaluate:", 1)[1].strip()
    assert shlex.split(command) == [
        "python", "-m", "coordexp.eval", "+experiment=smoke/ab_mixed_vl", "model.kind=local",
        f"model.path={tmp_path}/checkpoint-4", "rollout=hf", *eval_overrides(overrides)]


def test_the_metric_registry_is_the_docs():
    documented = documented_names((REPO_ROOT / "docs" / "metrics.md").read_text())
    assert documented == set(DOCUMENTED)
    for name in ("rollout/f1", "eval_rollout/f1", "train/samples", "rollout/parse_dropped/bad_bbox",
                 "eval_rollout/parse_dropped/truncated", "train_runtime"):
        assert is_registered(name), name
    for name in ("train/rollout/f1", "eval/rollout/f1", "train/train/samples", "rollout/parse_dropped/"):
        assert not is_registered(name), name


def test_report_to_trackers(tmp_path, monkeypatch):
    assert tracker_problems([ReportTo.tensorboard]) == []
    installed = {t for t in ("wandb", "mlflow") if importlib.util.find_spec(t)}
    problems = tracker_problems([ReportTo.tensorboard, ReportTo.wandb, ReportTo.mlflow, ReportTo.wandb])
    expected = {f"training.report_to[{i}]: '{t}' is not installed in this environment: pip install {t}, or "
                f"drop it from training.report_to (tensorboard needs nothing)"
                for i, t in ((1, "wandb"), (2, "mlflow"), (3, "wandb")) if t not in installed}
    assert set(problems) == expected | {"training.report_to[3]: 'wandb' is listed twice"}
    env = tracker_environment([ReportTo.wandb, ReportTo.mlflow], tmp_path, environ={})
    assert env == {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                   "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").resolve().as_uri(),
                   "MLFLOW_ALLOW_FILE_STORE": "true"}
    assert tracker_environment([ReportTo.wandb], tmp_path, environ={"WANDB_MODE": "online"}) == {
        "WANDB_DIR": str(tmp_path)}
    assert tracker_environment([ReportTo.tensorboard], tmp_path, environ={}) == {}


def test_report_to_a_missing_tracker_is_a_config_error_naming_the_install():
    import subprocess

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = subprocess.run([sys.executable, "-m", "coordexp.train", "+experiment=smoke/a_only", "rollout=hf",
                          "training.report_to=[tensorboard,wandb]", "--cfg", "job"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert ("  - training.report_to[1]: 'wandb' is not installed in this environment: pip install wandb, or "
            "drop it from training.report_to (tensorboard needs nothing)\n") in out.stderr


def test_a_fresh_run_into_a_dir_with_an_earlier_run_says_what_it_appends_and_overwrites(tmp_path):
    from coordexp.trainer.learner import earlier_run_notice

    assert earlier_run_notice(tmp_path, None) is None  # a new dir
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    assert earlier_run_notice(tmp_path, None) is None  # an empty file and no checkpoint: nothing to mix with
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert earlier_run_notice(tmp_path, None) == (
        f"coordexp: note: {tmp_path} holds an earlier run (metrics.jsonl records) and no checkpoint is "
        "resumed: this run appends to its metrics.jsonl, train.log and TensorBoard files and overwrites any "
        "checkpoint of a step it saves again. For a clean record use a new hydra.run.dir; to continue the "
        "earlier run pass training.resume_from_checkpoint=latest")
    for step in (10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert "(metrics.jsonl records, checkpoint-2 checkpoint-10)" in earlier_run_notice(tmp_path, None)
    metrics.unlink()  # checkpoints alone: the Trainer would overwrite them
    alone = earlier_run_notice(tmp_path, None)
    assert f"{tmp_path} holds an earlier run (checkpoint-2 checkpoint-10)" in alone
    resumed = resume.Resume(tmp_path / "checkpoint-10", 10, 20)
    assert earlier_run_notice(tmp_path, resumed) is None  # resuming appends on purpose


@pytest.mark.parametrize("path", ["/runs/smoke/2026-12-01_00-00-00/checkpoint-4", "/tmp/rún 猫/checkpoint-2",
                                  "/tmp/a,b/checkpoint-2", "/tmp/it's/c", "/tmp/$HOME `x` \\ \"q\"/c"])
def test_the_evaluate_lines_model_path_reads_back_exactly(path):
    """Pasted into a shell, the summary's model.path override reaches Hydra as one word that parses back
    to the path (non-ASCII, spaces and commas need Hydra's quotes; the shell must not expand anything)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from coordexp.telemetry.summary import shell_override

    word = shell_override("model.path", path)
    (arg,) = shlex.split(word)
    parsed = OverridesParser.create().parse_override(arg)
    assert (parsed.key_or_group, parsed.value()) == ("model.path", path)
    if path.isascii() and " " not in path and "," not in path and "'" not in path and "$" not in path:
        assert word == f"model.path={path}"  # a plain path stays as it is


def test_a_relative_data_path_under_a_directory_with_spaces_reads_back(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from coordexp.telemetry.summary import shell_word

    here = tmp_path / "mes données"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # no Hydra job: relative to the cwd
    (override,) = eval_overrides(["data.val_jsonl=cx/val.jsonl"])
    (arg,) = shlex.split(shell_word(override))
    parsed = OverridesParser.create().parse_override(arg)
    assert (parsed.key_or_group, parsed.value()) == ("data.val_jsonl", f"{here}/cx/val.jsonl")

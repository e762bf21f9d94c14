"""Hydra's own command line works on coordexp's entry points (issue 17, item 2): every Hydra flag and the
value it takes passes through, shell completion, the user's own --config-dir leaves and groups (with the
leaf contract and unknown-key checks), --cfg of an invalid config, hydra.job.chdir=true."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from coordexp.cli import hydra_overrides
from coordexp.config.cwd import PATH_FIELDS, absolute_paths
from coordexp.config.load import compose, to_train_config
from coordexp.config.schema import TrainConfig
from coordexp.errors import ConfigError
from tests.conftest import REPO_ROOT


def run(*args: str, module: str = "coordexp.train", cwd=REPO_ROOT, env_extra=None, exe=None):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(env_extra or {})
    cmd = [exe] if exe else [sys.executable, "-m", module]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args,overrides", [
    (["--info", "defaults-tree", "+experiment=ab_mixed"], ["+experiment=ab_mixed"]),
    (["-i", "defaults", "+experiment=ab_mixed", "a=1"], ["+experiment=ab_mixed", "a=1"]),
    (["--info", "+experiment=ab_mixed"], None),  # Hydra reads the leaf as the --info value: its usage error
    (["+experiment=x", "-m", "b=1,2", "--cfg", "job"], ["+experiment=x", "b=1,2"]),  # interleaved
    (["--cfg", "job", "-p", "training", "+experiment=x"], ["+experiment=x"]),
    (["--config-dir", "/tmp/c", "+experiment=x", "-m", "b=1,2"], ["+experiment=x", "b=1,2"]),
    (["-sc", "install=bash"], ["install=bash"]),
    (["--experimental-rerun", "f.pickle"], []),
])
def test_overrides_are_what_hydras_own_parser_reads(args, overrides):
    assert hydra_overrides(args) == (overrides if overrides is not None else [])


@pytest.mark.parametrize("module", ["coordexp.train", "coordexp.eval"])
@pytest.mark.parametrize("flags,needle", [
    (["--info", "defaults-tree"], "    experiment: ab_mixed:\n      stage2_ab/schedule: ab_mixed\n"),
    (["--info", "config"], "  run_name: prod_ab_mixed\n"),
    (["-i", "defaults"], "| experiment/ab_mixed "),
])
def test_info_flags_with_a_value_pass_through(module, flags, needle):
    out = run(*flags, "+experiment=ab_mixed", module=module)
    assert out.returncode == 0, out.stderr
    assert needle in out.stdout and "Traceback" not in out.stderr


def test_version_prints_once_and_two_modes_are_one_clear_error():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.count("Hydra ") == 1
    out = run("+experiment=smoke/a_only", "-m", "training.max_steps=1,2", "--cfg", "job")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("error: Invalid command line (1 problem):\n  - --multirun and --cfg cannot be "
                          "combined: Hydra runs one of --run, --multirun, --cfg, --info and "
                          "--shell-completion; drop all but one\nConfig reference: docs/config.md\n")


def test_shell_completion_install_and_query():
    out = run("--shell-completion", "install=bash")
    assert out.returncode == 0, out.stderr
    assert "hydra_bash_completion()" in out.stdout
    exe = str(Path(sys.executable).parent / "coordexp-train")  # the console script completes (python -m
    line = "coordexp-train +experiment=smoke/ab_mixed training.max_st"  # is not an app name to Hydra)
    out = run("-sc", "query=bash", exe=exe, env_extra={"COMP_LINE": line})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["training.max_steps="]


@pytest.fixture
def user_conf(tmp_path):
    """A user's own config dir: one leaf (a copy of smoke/a_only with its own run name) and a sweep group."""
    (tmp_path / "experiment").mkdir()
    leaf = (REPO_ROOT / "conf/experiment/smoke/a_only.yaml").read_text()
    assert "run_name: smoke_a_only" in leaf
    (tmp_path / "experiment" / "my_leaf.yaml").write_text(leaf.replace("smoke_a_only", "my_leaf_run"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "small.yaml").write_text(
        "# @package _global_\ntraining:\n  max_steps: 7\nhydra:\n  sweeper:\n    params:\n"
        "      stage2_ab.schedule.b_ratio: 0.1,0.2\n")
    return tmp_path


@pytest.mark.parametrize("flag", ["--config-dir", "-cd"])
def test_the_users_own_leaf_and_sweep_config_compose(user_conf, flag):
    out = run(flag, str(user_conf), "+experiment=my_leaf", "+sweep=small", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "  run_name: my_leaf_run\n" in out.stdout and "  max_steps: 7\n" in out.stdout
    hydra = run(flag, str(user_conf), "+experiment=my_leaf", "+sweep=small", "--cfg", "hydra")
    assert hydra.returncode == 0, hydra.stderr
    assert "stage2_ab.schedule.b_ratio: 0.1,0.2" in hydra.stdout


def test_the_users_leaf_gets_the_leaf_contract_and_unknown_key_checks(user_conf):
    leaf = user_conf / "experiment" / "my_leaf.yaml"
    text = leaf.read_text().replace("training:\n", "training:\n  lerning_rate: 1\n", 1)
    leaf.write_text(text.replace("  save_steps:", "  # save_steps:"))
    out = run("--config-dir", str(user_conf), "+experiment=my_leaf", "--cfg", "job")
    assert out.returncode == 2 and out.stdout == ""
    assert (f"  - {leaf}: missing required knobs: training.save_steps (every leaf pins them)\n"
            f"  - {leaf}: training.lerning_rate: unknown key (not in TrainingConfig); did you mean "
            f"'training.learning_rate'?\n") in out.stderr
    assert "Traceback" not in out.stderr
    missing = run("-cd", str(user_conf), "+experiment=nope")
    assert missing.returncode == 2
    assert (f"+experiment=nope: no such experiment leaf (conf/experiment/nope.yaml or {user_conf}/experiment/"
            f"nope.yaml); available: a_only, ab_mixed, b_only, my_leaf, smoke/a_only") in missing.stderr


def test_cfg_job_of_an_invalid_config_prints_it_then_reports_and_exits_2():
    out = run("+experiment=smoke/ab_mixed", "training.learning_rate=-1", "--cfg", "job")
    assert out.returncode == 2
    assert "  learning_rate: -1.0\n" in out.stdout and out.stdout.startswith("experiment: smoke/ab_mixed")
    assert out.stderr == ("error: Invalid coordexp config (1 problem):\n"
                          "  - training.learning_rate: must be > 0\nConfig reference: docs/config.md\n")


def test_cfg_job_of_a_composition_error_prints_nothing():
    out = run("+experiment=smoke/ab_mixed", "rollout=nope", "--cfg", "job")
    assert out.returncode == 2 and out.stdout == ""
    assert "rollout" in out.stderr and "Traceback" not in out.stderr


def test_every_path_field_of_the_schema_is_made_absolute():
    def fields(tp, prefix=""):
        for f in dataclasses.fields(tp):
            hint = typing.get_type_hints(tp)[f.name]
            inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] or [hint]
            if dataclasses.is_dataclass(inner[0]):
                yield from fields(inner[0], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hint

    pathish = {name for name, hint in fields(TrainConfig)
               if name.rsplit(".", 1)[-1].endswith(("path", "_dir", "_jsonl", "_root", "_checkpoint"))
               and str in (typing.get_args(hint) or (hint,))}
    assert pathish == set(PATH_FIELDS)


def test_relative_paths_are_taken_from_where_the_command_started(tmp_path, monkeypatch):
    cfg = compose(["+experiment=smoke/a_only", "rollout=hf", "data=jsonl", "data.train_jsonl=d/train.jsonl",
                   "model.tiny_stage1_steps=0", "training.resume_from_checkpoint=latest",
                   "hydra.job.chdir=true"])
    start = cfg.hydra.runtime.cwd
    monkeypatch.chdir(tmp_path)  # what hydra.job.chdir=true does before the job runs
    obj = to_train_config(cfg)
    assert obj.data.train_jsonl == f"{start}/d/train.jsonl"
    cache = os.environ.get("COORDEXP_CACHE_DIR") or f"{start}/.cache/coordexp"
    assert obj.model.path == f"{cache}/tiny-models"
    assert obj.training.resume_from_checkpoint == "latest"
    assert absolute_paths(obj, "/elsewhere").data.train_jsonl == f"{start}/d/train.jsonl"  # absolute stays


def test_chdir_true_moves_no_path(tmp_path):
    """A real Hydra job with hydra.job.chdir=true: the relative model path is the one next to where the
    command started, not inside the run dir the job was moved into."""
    run_dir = tmp_path / "run"
    out = run("+experiment=smoke/a_only", "rollout=hf", "model.kind=local", "model.path=my_ckpt",
              "hydra.job.chdir=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2
    assert f"model.path '{tmp_path}/my_ckpt' is not a checkpoint directory" in out.stderr
    assert f"  path: {tmp_path}/my_ckpt\n" in (run_dir / "resolved_config.yaml").read_text()
    # the console record holds the error line the console showed
    assert f"error: model.path '{tmp_path}/my_ckpt' is not a checkpoint directory" in (
        run_dir / "train.log").read_text()


def test_an_evaluation_needs_no_training_data():
    cfg = compose(["+experiment=smoke/a_only", "rollout=hf", "data=jsonl", "data.val_jsonl=/d/val.jsonl",
                   "model.tiny_stage1_steps=0"])
    with pytest.raises(ConfigError) as err:
        to_train_config(cfg)
    assert err.value.problems == ["data.train_jsonl: is required with data.kind: jsonl"]
    assert to_train_config(cfg, training=False).data.val_jsonl == "/d/val.jsonl"


def test_an_output_dir_apart_from_the_hydra_run_dir_is_said(tmp_path):
    from coordexp.train import split_run_note

    assert split_run_note(str(tmp_path / "r"), str(tmp_path / "x" / ".." / "r")) is None  # the same folder
    assert split_run_note(str(tmp_path / "ckpt"), str(tmp_path / "hydra")) == (
        f"note: training.output_dir={tmp_path}/ckpt is not the run dir Hydra made ({tmp_path}/hydra): "
        "checkpoints, metrics and TensorBoard go to the first, train.log and .hydra/ stay in the second; to "
        f"keep the run in one folder set hydra.run.dir={tmp_path}/ckpt instead")


@pytest.mark.parametrize("module", ["coordexp.train", "coordexp.eval"])
def test_a_usage_error_names_the_command_the_user_ran(module):
    out = run("+experiment=smoke/ab_mixed", "--cfg", "jbo", module=module)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"usage: python -m {module} [--help]")
    assert f"python -m {module}: error: argument --cfg/-c: invalid choice: 'jbo'" in out.stderr
    assert "train.py" not in out.stderr and "eval.py" not in out.stderr


def test_command_name():
    from coordexp.cli import command_name

    assert command_name("/site-packages/coordexp/train.py") == "python -m coordexp.train"
    assert command_name("/venv/bin/coordexp-train") == "coordexp-train"


def test_sweep_values_without_m_are_a_config_error_with_the_fixes():
    out = run("+experiment=smoke/ab_mixed", "rollout=hf", "training.learning_rate=1e-3,2e-3", "seed=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Ambiguous value" not in out.stderr
    assert ("  - training.learning_rate=1e-3,2e-3: several values are a sweep, which needs -m on the command "
            "line; for one run give one value, for a list write training.learning_rate=[a,b], for text with "
            "a comma quote it: training.learning_rate='a,b'\n") in out.stderr


def test_the_submitit_launcher_without_its_package_names_the_install(monkeypatch):
    from coordexp.config import leaf
    from coordexp.config.errors import ConfigError

    monkeypatch.setattr(leaf, "_has_submitit", lambda: False)
    with pytest.raises(ConfigError) as err:
        leaf.check_command_line(["hydra/launcher=submitit_slurm", "+experiment=smoke/ab_mixed"])
    assert err.value.problems == [
        "hydra/launcher=submitit_slurm: Hydra's submitit launcher is not installed: pip install "
        "hydra-submitit-launcher (docs/runbook.md, Clusters)"]
    monkeypatch.setattr(leaf, "_has_submitit", lambda: True)  # installed: Hydra takes it from here
    leaf.check_command_line(["hydra/launcher=submitit_slurm", "+experiment=smoke/ab_mixed"])

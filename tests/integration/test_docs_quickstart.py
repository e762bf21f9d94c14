"""docs/quickstart.md as a newcomer follows it (issue 17, item 5): every command its code blocks show is
either run here, literally (the ones that take under a minute: preflight, --cfg job, the typo example and
its printed output, plot and eval on the session's small run), or listed in NOT_RUN with the reason, so
a command added to the quickstart must be given one of the two. `make smoke` and the training commands are
not run (the smoke test covers them).

The one deviation from the literal text: the eval and plot commands get the session's small run as
``<run_dir>`` (its last checkpoint is 4, not 150), and the eval the small run's held-out size and decode
settings plus its own ``hydra.run.dir``, so it takes seconds."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from tests.integration.conftest import REPO_ROOT, SMALL

QUICKSTART = REPO_ROOT / "docs" / "quickstart.md"

#: Commands of the quickstart this test does not run, and why.
NOT_RUN = {
    "make smoke": "the whole smoke run: tests/integration/test_smoke_training.py",
    "python -m coordexp.train +experiment=smoke/ab_mixed stage2_ab.schedule.b_ratio=0.5 "
    "training.max_steps=100": "a training run",
    "python -m coordexp.train -m hydra/launcher=coordexp +experiment=smoke/ab_mixed "
    "stage2_ab.schedule.b_ratio=0.25,0.5": "a sweep: tests/integration/test_launcher_sweep.py",
    "python -m coordexp.train +experiment=smoke/ab_mixed training.resume_from_checkpoint=latest":
        "a training run; resume: tests/integration/test_run_record.py",
    "python -m coordexp.train +experiment=ab_mixed model.path=/ckpt/stage1 data=jsonl "
    "data.train_jsonl=/data/train.jsonl data.val_jsonl=/data/val.jsonl": "needs 8 GPUs and a checkpoint",
    ".venv/bin/python -m coordexp.train +experiment=smoke/ab_mixed_vl": "a training run: test_smoke_vl.py",
}


def quickstart_commands() -> list[tuple[str, list[str]]]:
    """(command, the indented lines that follow it up to the next blank line) for every command line of the
    quickstart's code blocks (``\\`` continuations joined, ``# comments`` and a ``$ `` prompt dropped)."""
    lines = QUICKSTART.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        text = line[4:] if line.startswith("    ") else ""
        text = text.removeprefix("$ ")
        if re.match(r"(\.venv/bin/)?python -m coordexp\.|make ", text):
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            command = re.split(r"\s{2,}#", text)[0].strip()
            block = []
            while i + 1 < len(lines) and lines[i + 1].startswith("    ") and not re.match(
                    r"\s*(\$ )?(\.venv/bin/)?python -m ", lines[i + 1]):
                i += 1
                block.append(lines[i][4:])
            out.append((command, block))
        i += 1
    return out


def run(command: str, cwd=REPO_ROOT, timeout=120):
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


COMMANDS = quickstart_commands()


def test_every_quickstart_command_is_run_or_listed():
    runnable = [c for c, _ in COMMANDS if c not in NOT_RUN]
    assert sorted(runnable) == sorted([
        "python -m coordexp.train +experiment=smoke/ab_mixed --cfg job",
        "python -m coordexp.preflight +experiment=smoke/ab_mixed",
        "python -m coordexp.train +experiment=smoke/ab_mixed training.lerning_rate=1e-3",
        "python -m coordexp.plot <run_dir>",
        "python -m coordexp.eval +experiment=smoke/ab_mixed rollout=hf model.kind=local "
        "model.path=<run_dir>/checkpoint-150",
    ])
    assert set(NOT_RUN) <= {c for c, _ in COMMANDS}, "NOT_RUN names a command the quickstart no longer shows"


def test_cfg_job_and_preflight():
    out = run("python -m coordexp.train +experiment=smoke/ab_mixed --cfg job")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("experiment: smoke/ab_mixed\n") and "  max_steps: 150\n" in out.stdout
    out = run("python -m coordexp.preflight +experiment=smoke/ab_mixed")
    assert out.returncode == 0, out.stderr
    contract = json.loads(out.stdout)
    assert (contract["rollout_backend"], contract["vllm_mode"], contract["gpu_plan"]["needed"]) == (
        "vllm", "server", 0)


def test_the_typo_example_prints_what_the_quickstart_shows():
    (command, shown), = [(c, b) for c, b in COMMANDS if "lerning_rate" in c]
    out = run(command)
    assert out.returncode == 2
    assert out.stderr.splitlines() == shown


@pytest.mark.slow
def test_plot_and_eval_on_a_small_run(small_run, tmp_path):
    run_dir, _ = small_run
    (plot,) = [c for c, _ in COMMANDS if c.startswith("python -m coordexp.plot")]
    out = run(plot.replace("<run_dir>", str(run_dir)))
    assert out.returncode == 0, out.stderr
    with Image.open(out.stdout.strip()) as im:
        assert im.format == "PNG"
    (evaluate,) = [c for c, _ in COMMANDS if c.startswith("python -m coordexp.eval")]
    small = [o for o in SMALL if o.startswith(("data.", "rollout_matching."))]
    command = evaluate.replace("<run_dir>", str(run_dir)).replace("checkpoint-150", "checkpoint-4")
    out = run(" ".join([command, *small, f"hydra.run.dir={tmp_path / 'eval'}"]), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IoU 0.5:" in out.stdout and (tmp_path / "eval" / "eval_report.json").is_file()

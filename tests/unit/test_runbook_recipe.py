"""docs/runbook.md's 7B recipe and multi-node command, as written: their preflight (the command with
`coordexp.train` replaced by `coordexp.preflight`) against Qwen2.5-VL-7B's published config.json passes on
both nodes, and the recipe fits 80 GiB GPUs, so neither can drift from what the planner and the config
rules accept."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_planning import QWEN25_VL_7B

REPO_ROOT = Path(__file__).resolve().parents[2]


def recipe_command(heading: str = "## 7B recipe") -> str:
    """The first command of a runbook section (continuations joined, comments dropped)."""
    text = (REPO_ROOT / "docs" / "runbook.md").read_text()
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", 1)]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m coordexp.train "))
    command = ""
    for line in lines[start:]:
        command += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    return command.strip()


def preflight_of(command: str, tmp_path: Path, node_rank: int, *extra: str) -> subprocess.CompletedProcess:
    """Run the preflight of a runbook command on node ``node_rank``, its paths replaced by the test's: the
    checkpoint by Qwen2.5-VL-7B's config.json, the data by small files, the run dir by a temporary one."""
    ckpt = tmp_path / "qwen2_5_vl_7b"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    data = tmp_path / "data.jsonl"
    data.write_text("")
    command = command.replace("$NODE_RANK", str(node_rank))
    command = re.sub(r"model\.path=\S+", f"model.path={ckpt}", command)
    command = re.sub(r"(data\.(train|val)_jsonl)=\S+", rf"\1={data}", command)
    command = re.sub(r"hydra\.run\.dir=\S+", f"hydra.run.dir={tmp_path / 'run'}", command)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "coordexp.train"], command
    env = {**os.environ, "COORDEXP_SERVER_API_KEY": "recipe-test-key"}
    argv = [sys.executable, "-m", "coordexp.preflight", *argv[3:], *extra]
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("node_rank", [0, 1])
def test_the_7b_recipe_fits_80gb_gpus_on_both_nodes(tmp_path, node_rank):
    command = recipe_command()
    assert "data=jsonl data.train_jsonl=" in command  # your data, not the leaf's synthetic default
    out = preflight_of(command, tmp_path, node_rank, "training.device_memory_gib=80")
    assert out.returncode == 0, out.stderr
    contract = json.loads(out.stdout)
    plan = contract["memory_plan"]
    learner = plan["learner"]
    assert (plan["fits"], learner["sharding"], learner["world_size"]) == (True, "fsdp", 8)
    # the 8.29B base + DoRA + the trained copies of the vision tower and aligner (peft's modules_to_save)
    assert plan["parameters"] > 8292166656
    gib = learner["total"] / 2**30
    assert 40 < gib < 80, gib
    assert f"{gib:.1f} GiB per learner rank" in (REPO_ROOT / "docs" / "runbook.md").read_text()
    assert len(contract["server_base_urls"]) == 2


@pytest.mark.parametrize("node_rank", [0, 1])
def test_the_multi_node_command_passes_its_preflight_on_both_nodes(tmp_path, node_rank):
    out = preflight_of(recipe_command("## Multi-node learner"), tmp_path, node_rank)
    assert out.returncode == 0, out.stderr
    contract = json.loads(out.stdout)
    assert len(contract["server_base_urls"]) == 2 and "warning: the checkpoint" not in out.stderr

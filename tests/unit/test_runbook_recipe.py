"""docs/runbook.md's 7B recipe, as written: its preflight (the recipe's own command with `coordexp.train`
replaced by `coordexp.preflight`) against Qwen2.5-VL-7B's published config.json fits 80 GiB GPUs on both
nodes, so the recipe cannot drift from what the planner and the config rules accept."""

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


def recipe_command() -> str:
    """The first command of the runbook's "7B recipe" section (continuations joined, comments dropped)."""
    text = (REPO_ROOT / "docs" / "runbook.md").read_text()
    section = text[text.index("## 7B recipe"):]
    section = section[:section.index("\n## ", 1)]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m coordexp.train "))
    command = ""
    for line in lines[start:]:
        command += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    return command.strip()


@pytest.mark.parametrize("node_rank", [0, 1])
def test_the_7b_recipe_fits_80gb_gpus_on_both_nodes(tmp_path, node_rank):
    ckpt = tmp_path / "qwen2_5_vl_7b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    command = recipe_command().replace("$NODE_RANK", str(node_rank))
    command = re.sub(r"model\.path=\S+", f"model.path={ckpt}", command)
    command = re.sub(r"hydra\.run\.dir=\S+", f"hydra.run.dir={tmp_path / 'run'}", command)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "coordexp.train"], command
    env = {**os.environ, "COORDEXP_SERVER_API_KEY": "recipe-test-key"}
    argv = [sys.executable, "-m", "coordexp.preflight", *argv[3:], "training.device_memory_gib=80"]
    out = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
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

"""docs/runbook.md's table "Plans on 80 GiB GPUs", row by row: each figure is what the planner gives today for
the row's configuration (Qwen-VL config.json as published, the production leaf), so the table cannot drift."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from coordexp.planning.memory import GIB, memory_plan
from tests.unit.test_planning import QWEN3_VL_8B, QWEN25_VL_3B, QWEN25_VL_7B, REPO_ROOT, checkpoint, prod_cfg

FREEZE_VIT = ("model.adapter.kind=dora", "model.freeze_vit=true")
ROWS = {  # the table's first column -> (config.json, overrides of +experiment=ab_mixed[, training fields set
    # afterwards: a world size whose node settings the plan does not need)]
    "7B, full fine-tune (`model.adapter.kind=none`), 2 ranks DDP": (QWEN25_VL_7B, ("training.fsdp=false",)),
    "7B, full fine-tune, FSDP over 8 ranks (2 nodes x 4): the recipe with `model.adapter.kind=none`":
        (QWEN25_VL_7B, ("training.fsdp=true",), {"nproc_per_node": 4, "nnodes": 2}),
    "7B, the leaf as it is: DoRA r 16, vision tower and aligner in full, 2 ranks DDP":
        (QWEN25_VL_7B, ("model.adapter.kind=dora",)),
    "7B, the leaf + `training.fsdp=true` (2 ranks)":
        (QWEN25_VL_7B, ("model.adapter.kind=dora", "training.fsdp=true")),
    "7B, DoRA r 16 + `freeze_vit`, 2 ranks DDP": (QWEN25_VL_7B, FREEZE_VIT),
    "7B, DoRA r 16 + `freeze_vit`, 2 ranks DDP, `packing_length=8000`":
        (QWEN25_VL_7B, (*FREEZE_VIT, "training.packing_length=8000")),
    "3B, full fine-tune, 2 ranks DDP": (QWEN25_VL_3B, ()),
    "3B, the leaf as it is: DoRA r 16, vision tower and aligner in full, 2 ranks DDP":
        (QWEN25_VL_3B, ("model.adapter.kind=dora",)),
    "3B, DoRA r 16 + `freeze_vit`, 2 ranks DDP": (QWEN25_VL_3B, FREEZE_VIT),
    "Qwen3-VL-8B, the leaf + `training.fsdp=true` (2 ranks)": (QWEN3_VL_8B, ("model.adapter.kind=dora",
                                                                            "training.fsdp=true")),
}


def documented_rows() -> dict[str, tuple[str, str]]:
    text = (REPO_ROOT / "docs" / "runbook.md").read_text()
    table = text[text.index("Plans on 80 GiB GPUs"):]
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("| "):
            break
        label, gib, fits = (cell.strip() for cell in line.strip("|").split("|"))
        rows[label] = (gib, fits)
    return rows


def test_the_table_lists_exactly_these_rows():
    assert list(documented_rows()) == list(ROWS)


@pytest.mark.parametrize("label", list(ROWS))
def test_each_row_is_the_planners_figure(tmp_path, label):
    config, overrides, *world = ROWS[label]
    cfg = prod_cfg(checkpoint(tmp_path, config), *overrides)
    if world:
        cfg = replace(cfg, training=replace(cfg.training, **world[0]))
    plan = memory_plan(cfg, device_bytes=80 * GIB)
    gib, fits = documented_rows()[label]
    assert gib == f"{plan.learner.total / GIB:.1f} GiB"
    head = plan.learner.activations.head_bytes / GIB
    assert re.fullmatch(r"yes|no( \(logits (\d+\.\d) GiB\))?", fits), fits
    assert fits.startswith("yes" if plan.fits else "no")
    if "logits" in fits:
        assert fits == f"no (logits {head:.1f} GiB)"

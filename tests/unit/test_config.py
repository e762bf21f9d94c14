"""Config schema, legacy keys, leaf contract, validation and normalization (no subprocesses)."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coordexp.config.contract import rollout_contract
from coordexp.config.keys import key_problems
from coordexp.config.leaf import REQUIRED_LEAF_KNOBS, check_command_line, leaf_file_problems, leaf_problems
from coordexp.config.load import compose, load_saved, save_resolved, to_train_config
from coordexp.config.paths import available_experiments
from coordexp.errors import ConfigError

LEAVES = available_experiments()


def resolved(*overrides: str):
    return to_train_config(compose(list(overrides)))


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        resolved(*overrides)
    return err.value.problems


def test_expected_leaves_exist():
    assert {"a_only", "b_only", "ab_mixed", "smoke/a_only", "smoke/b_only", "smoke/ab_mixed"} <= set(LEAVES)


@pytest.mark.parametrize("leaf", LEAVES)
def test_every_leaf_meets_the_contract_and_validates(leaf):
    assert leaf_problems(leaf) == []
    cfg = resolved(f"+experiment={leaf}")
    assert cfg.experiment == leaf


@pytest.mark.parametrize("leaf,ratio", [("a_only", 0.0), ("b_only", 1.0), ("ab_mixed", 0.85),
                                        ("smoke/a_only", 0.0), ("smoke/b_only", 1.0),
                                        ("smoke/ab_mixed", 0.85)])
def test_leaf_b_ratios(leaf, ratio):
    assert resolved(f"+experiment={leaf}").stage2_ab.schedule.b_ratio == ratio


def test_leaf_missing_knobs_are_listed_at_once(tmp_path):
    leaf = tmp_path / "bad.yaml"
    leaf.write_text("# @package _global_\ntraining:\n  run_name: x\n")
    problems = leaf_file_problems(leaf, "bad.yaml")
    missing = [k for k in REQUIRED_LEAF_KNOBS if k != "training.run_name"]
    assert problems == [f"bad.yaml: missing required knobs: {', '.join(missing)} (every leaf pins them)"]


def test_leaf_including_another_leaf_is_rejected(tmp_path):
    body = Path("conf/experiment/smoke/ab_mixed.yaml").read_text().replace(
        "defaults:\n", "defaults:\n  - /experiment/smoke/a_only\n")
    leaf = tmp_path / "two_hop.yaml"
    leaf.write_text(body)
    (problem,) = leaf_file_problems(leaf, "two_hop.yaml")
    assert problem.startswith("two_hop.yaml: defaults entry '/experiment/smoke/a_only' includes another leaf")


def test_leaf_legacy_and_unknown_keys(tmp_path):
    body = Path("conf/experiment/smoke/ab_mixed.yaml").read_text() + (
        "custom:\n  extra:\n    rollout_matching:\n      decode_batch_size: 2\n"
        "rollout_matching:\n  decodng:\n    temperature: 0.0\n")
    leaf = tmp_path / "legacy.yaml"
    leaf.write_text(body)
    assert leaf_file_problems(leaf, "legacy.yaml") == [
        "legacy.yaml: custom.extra.rollout_matching: legacy key: move rollout settings to top-level "
        "rollout_matching.*",
        "legacy.yaml: rollout_matching.decodng: unknown key (not in RolloutMatchingConfig); did you mean "
        "'rollout_matching.decoding'?",
    ]


@pytest.mark.parametrize("override,expected", [
    ("bogus=1", "bogus: unknown key (not in TrainConfig)"),
    ("training.lerning_rate=1", "training.lerning_rate: unknown key (not in TrainingConfig); did you mean "
                                "'training.learning_rate'?"),
    ("+rollout_matching.repeat_terminate.ngram=3", "rollout_matching.repeat_terminate.ngram: unknown key "
                                                   "(not in RepeatTerminateConfig); did you mean "
                                                   "'rollout_matching.repeat_terminate.ngram_size'?"),
    ("stage2_ab.schedule.pattern=AABB", "stage2_ab.schedule.pattern: legacy key: use "
                                        "stage2_ab.schedule.b_ratio (float in [0,1])"),
    ("+custom.extra.rollout_matching.decode_batch_size=2",
     "custom.extra.rollout_matching: legacy key: move rollout settings to top-level rollout_matching.*"),
])
def test_command_line_key_problems(override, expected):
    with pytest.raises(ConfigError) as err:
        check_command_line(["+experiment=smoke/ab_mixed", override])
    assert err.value.problems == [f"{expected} (from command-line override '{override}')"]


def test_missing_experiment_is_reported():
    with pytest.raises(ConfigError) as err:
        check_command_line(["training.max_steps=3"])
    assert err.value.problems[0].startswith("no experiment selected: add +experiment=<name>; "
                                            "available: a_only")


@dataclasses.dataclass
class Item:
    url: str = ""


@dataclasses.dataclass
class Root:
    items: list[Item] = dataclasses.field(default_factory=list)


def test_unknown_keys_inside_lists_have_indexed_paths():
    raw = {"items": [{"url": "a"}, {"url": "b", "port": 1}]}
    assert key_problems(raw, root=Root) == ["items[1].port: unknown key (not in Item)"]


def test_wrong_type_and_enum_name_the_key():
    assert problems_of("+experiment=smoke/ab_mixed", "training.learning_rate=fast") == [
        "training.learning_rate: Value 'fast' of type 'str' could not be converted to Float "
        "(Error merging override training.learning_rate=fast)"]
    assert problems_of("+experiment=smoke/ab_mixed", "vllm.device=tpu") == [
        "vllm.device: Invalid value 'tpu', expected one of [cpu, cuda] "
        "(Error merging override vllm.device=tpu)"]


def test_range_and_cross_field_violations_are_reported_together():
    problems = problems_of(
        "+experiment=smoke/ab_mixed", "rollout=vllm_server", "stage2_ab.schedule.b_ratio=1.5",
        "rollout_matching.max_new_tokens=4096", "training.nproc_per_node=2", "vllm.sync.mode=none",
        "training.per_device_train_batch_size=16", "training.packing=false",
        "vllm.server.base_urls=[]", "rollout_matching.repeat_terminate.ngram_repeats=1",
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier=5")
    assert problems == [
        "stage2_ab.schedule.b_ratio: 1.5 is outside [0, 1]",
        "stage2_ab.channel_b.drop_invalid_struct_ce_multiplier: 5.0 is outside [1, 4]",
        "training.effective_batch_size: 16 is not divisible by per_device_train_batch_size x "
        "nproc_per_node x nnodes = 32",
        "rollout_matching.max_new_tokens: 4096 must be < vllm.max_model_len (1024)",
        "rollout_matching.repeat_terminate.ngram_repeats: must be 0 (off) or >= 2: "
        "one occurrence is not a repeat",
        "vllm.server.base_urls: server mode needs at least one URL",
        "vllm.sync.mode: must be full with more than one learner process (nproc_per_node=2, nnodes=1)",
    ]


@pytest.mark.parametrize("override, advice", [
    ("vllm.mode=server", "removed: select rollout=vllm_server (or rollout=hf); the server mode follows from "
                         "rollout_matching.rollout_backend"),
    ("training.per_device_eval_batch_size=16", "removed: rollout evals decode in micro-batches of "
                                               "rollout_matching.decode_batch_size; delete the key"),
])
def test_retired_knobs_fail_with_migration_text(override, advice):
    """Knobs that did nothing (vllm.mode duplicated the backend; rollout evals never used the HF eval batch
    size) are legacy keys now."""
    key = override.split("=")[0]
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", override) == [
        f"{key}: legacy key: {advice} (from command-line override '{override}')"]


def test_gpu_sets_must_be_disjoint():
    problems = problems_of("+experiment=ab_mixed", "vllm.learner_gpus=[5,6]")
    assert problems == ["vllm.server_gpus: overlaps vllm.learner_gpus on GPUs [5]"]


def test_gradient_accumulation_is_derived_and_conflicts_fail():
    from coordexp.config.validate import derived_grad_accumulation

    cfg = resolved("+experiment=ab_mixed")
    assert derived_grad_accumulation(cfg) == 56 // (1 * 2)
    assert problems_of("+experiment=ab_mixed", "training.gradient_accumulation_steps=4") == [
        "training.gradient_accumulation_steps: 4 conflicts with the derived value 28; leave it null"]


def test_decode_batch_size_is_the_single_rollout_batching_knob():
    cfg = resolved("+experiment=smoke/ab_mixed", "rollout_matching.decode_batch_size=4")
    contract = rollout_contract(cfg)
    assert contract.decode_batch_size == 4
    assert not hasattr(cfg.training, "per_device_eval_batch_size")


def test_contract_normalizes_server_settings():
    contract = rollout_contract(resolved("+experiment=smoke/ab_mixed", "rollout=vllm_server"))
    assert (contract.backend, contract.vllm_mode, contract.server_base_urls) == (
        "vllm", "server", ("http://127.0.0.1:8000",))
    assert contract.repeat_terminate.enabled is True
    hf = rollout_contract(resolved("+experiment=smoke/ab_mixed", "rollout=hf"))
    assert (hf.backend, hf.vllm_mode, hf.server_base_urls) == ("hf", None, ())


@pytest.mark.parametrize("leaf", ["smoke/a_only", "smoke/b_only", "smoke/ab_mixed"])
def test_smoke_leaves_default_to_the_server_with_hf_as_the_fallback(leaf):
    cfg = resolved(f"+experiment={leaf}")
    contract = rollout_contract(cfg)
    assert (contract.backend, contract.vllm_mode, contract.server_base_urls) == (
        "vllm", "server", ("http://127.0.0.1:8000",))
    assert (cfg.vllm.device.value, contract.sync_mode, contract.sync_transport) == ("cpu", "full", "file")
    assert cfg.vllm.server.reuse_existing is False  # the launcher starts (and stops) the server itself
    hf = rollout_contract(resolved(f"+experiment={leaf}", "rollout=hf"))
    assert (hf.backend, hf.vllm_mode, hf.server_base_urls) == ("hf", None, ())


def test_saved_config_round_trips_through_the_same_schema(tmp_path):
    cfg = resolved("+experiment=smoke/ab_mixed", "training.max_steps=7")
    path = save_resolved(cfg, tmp_path / "resolved_config.yaml")
    assert load_saved(path) == cfg
    raw = OmegaConf.load(path)
    raw.training.max_steps = -1
    OmegaConf.save(raw, path)
    with pytest.raises(ConfigError) as err:
        load_saved(path)
    assert err.value.problems == ["training.max_steps: must be >= 1"]


def test_saved_config_with_unknown_key_fails(tmp_path):
    path = save_resolved(resolved("+experiment=smoke/ab_mixed"), tmp_path / "c.yaml")
    path.write_text(path.read_text() + "surprise: 1\n")
    with pytest.raises(ConfigError) as err:
        load_saved(path)
    assert err.value.problems[0].startswith("surprise: Key 'surprise' not in 'TrainConfig'")


def test_config_reference_matches_schema():
    from coordexp.config.reference import render

    assert Path("docs/config.md").read_text() == render(), "run `make docs` to regenerate docs/config.md"


def test_soft_self_context_and_packing_settings_are_checked():
    assert resolved("+experiment=smoke/ab_mixed", "stage2_ab.n_softctx_iter=2").stage2_ab.n_softctx_iter == 2
    for bad in (0, 17, 1000):
        assert problems_of("+experiment=smoke/ab_mixed", f"stage2_ab.n_softctx_iter={bad}") == [
            f"stage2_ab.n_softctx_iter: {bad} must be in [1, 16] (1 = plain teacher forcing; each pass is a "
            f"full forward, the production leaves use 2)"]
    assert problems_of("+experiment=smoke/ab_mixed", "training.packing=true", "training.packing_buffer=4",
                       "training.packing_min_fill_ratio=1.5") == [
        "training.packing_buffer: 4 < the 16 samples one rank trains per step (effective_batch_size / "
        "(nproc_per_node x nnodes)); raise it",
        "training.packing_min_fill_ratio: must be in [0, 1]"]
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", "rollout_matching.pipeline=true") == [
        "rollout_matching.pipeline: pipelined rollouts need rollout=vllm_server (the hf backend generates on "
        "the learner's own device: nothing to overlap); set it to null or false"]


def test_tiny_model_rules_name_the_fix(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", f"model.path={ckpt}") == [
        f"model.path: '{ckpt}' is a checkpoint (it has config.json), but model.kind is tiny, for which "
        "model.path is the cache dir the tiny model is built in: add model.kind=local to load that "
        "checkpoint"]
    assert resolved("+experiment=smoke/ab_mixed", "rollout=hf", f"model.path={ckpt}",
                    "model.kind=local", "model.dtype=float32").model.path == str(ckpt)
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", "data.kind=jsonl",
                       f"data.train_jsonl={tmp_path / 't.jsonl'}") == [
        "model.tiny_stage1_steps: 300 Stage-1 steps train the tiny model on its own synthetic task, so they "
        "need data.kind: synthetic; set model.tiny_stage1_steps=0 to train it on your data from random "
        "weights, or train your checkpoint: model.kind=local model.path=<checkpoint>"]
    assert problems_of("+experiment=smoke/ab_mixed_vl", "model.tiny_arch=qwen3_vl") == [
        "data.synthetic.image_cell: 28 px cells make 112x112 px images, but the tiny qwen3_vl reads images "
        "in 32 px units (patch x merge): set data.synthetic.image_cell=32"]
    assert resolved("+experiment=smoke/ab_mixed_vl", "model.tiny_arch=qwen3_vl",
                    "data.synthetic.image_cell=32").data.synthetic.image_cell == 32


def test_the_tiny_image_units_are_the_tiny_models_patch_times_merge():
    from coordexp.config.validate import TINY_VL_IMAGE_UNIT
    from coordexp.models.tiny import VL_ARCHS, TinyModelSpec

    assert set(TINY_VL_IMAGE_UNIT) == set(VL_ARCHS)
    for arch, unit in TINY_VL_IMAGE_UNIT.items():
        vision = TinyModelSpec(arch=arch).vision
        assert vision.patch_size * vision.merge_size == unit, arch


def test_the_pack_and_the_context_must_leave_room_for_a_prompt():
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", "training.packing_length=64") == [
        "training.packing_length: 64 leaves no room for a prompt: a Channel-B segment is the prompt + up to "
        "rollout_matching.max_new_tokens (96) tokens and must fit one pack; raise it above 96 + your longest "
        "prompt + answer, or lower rollout_matching.max_new_tokens"]
    assert problems_of("+experiment=smoke/ab_mixed", "rollout=hf", "vllm.max_model_len=96") == [
        "rollout_matching.max_new_tokens: 96 must be < vllm.max_model_len (96)"]  # the hf backend too


def test_preflight_checks_the_run_dir_and_the_data_files_as_the_run_does(tmp_path, capsys):
    """The preflight passes only what the run would start: a run dir below a file and a missing JSONL are
    refused with the key (the run itself failed there, after loading the model for the JSONL)."""
    from coordexp.preflight import main as preflight_main

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_:
        preflight_main(["+experiment=smoke/ab_mixed", "rollout=hf", f"hydra.run.dir={tmp_path}/afile/x",
                        "model.tiny_stage1_steps=0", "data=jsonl", f"data.train_jsonl={tmp_path}/nope.jsonl",
                        f"data.val_jsonl={tmp_path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"hydra.run.dir: '{tmp_path}/afile/x' cannot be created: '{tmp_path}/afile' is a file" in err
    assert f"data.train_jsonl: '{tmp_path}/nope.jsonl' does not exist" in err
    assert f"data.val_jsonl: '{tmp_path}' is a folder, not a JSONL file" in err


@pytest.mark.parametrize("gib", ["0", "-1"])
def test_a_cpu_server_needs_kv_cache(gib):
    assert problems_of("+experiment=smoke/ab_mixed", f"vllm.cpu_kvcache_space_gib={gib}") == [
        f"vllm.cpu_kvcache_space_gib: {gib} must be >= 1 (GiB of KV cache the CPU server allocates)"]

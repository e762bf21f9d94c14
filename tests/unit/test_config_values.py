"""Every config value checked before anything starts (issue 14, items 3 and 4): the one-hop leaf contract,
values by kind (finite, named, typed list items, strict booleans), library choices, run directories, and
command lines Hydra cannot parse. In-process; the CLI side is tests/unit/test_cli_config_errors.py."""

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from coordexp.config.leaf import check_command_line, leaf_file_problems, leaf_problems
from coordexp.config.load import check_before_start, compose, sweep_jobs, to_train_config
from coordexp.config.metric_names import BEST_MODEL_METRICS, EVAL_METRICS
from coordexp.config.value_rules import LR_SCHEDULERS, UNSUPPORTED_LR_SCHEDULERS, dir_problems
from coordexp.errors import ConfigError

LEAF = "+experiment=smoke/ab_mixed"
SCHEDULERS = ", ".join(LR_SCHEDULERS)
BEST = ", ".join(BEST_MODEL_METRICS)


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        to_train_config(compose([LEAF, *overrides]))
    return err.value.problems


# ---- item 3: one hop, and nothing from outside conf/experiment/ --------------------------------------------

@pytest.mark.parametrize("entry,target", [
    ("smoke/b_only", "experiment/smoke/b_only"),                 # relative: the leaf's own group
    ("/experiment/smoke/a_only", "experiment/smoke/a_only"),
    ("{/experiment: smoke/b_only}", "experiment/smoke/b_only"),
    ("{smoke: b_only}", "experiment/smoke/b_only"),
    ("../experiment/a_only", "experiment/a_only"),
    ("{override /experiment: a_only}", "experiment/a_only"),
])
def test_a_leaf_including_another_leaf_is_refused_however_it_is_spelled(tmp_path, entry, target):
    body = Path("conf/experiment/smoke/ab_mixed.yaml").read_text().replace(
        "defaults:\n", f"defaults:\n  - {entry}\n")
    leaf = tmp_path / "two_hop.yaml"
    leaf.write_text(body)
    (problem,) = leaf_file_problems(leaf, "two_hop.yaml")
    assert problem.startswith("two_hop.yaml: defaults entry ")
    assert f" includes another leaf (conf/{target}.yaml); leaves are one hop: " in problem


def test_a_defaults_entry_outside_conf_is_refused(tmp_path):
    body = Path("conf/experiment/smoke/ab_mixed.yaml").read_text().replace(
        "defaults:\n", "defaults:\n  - ../../../etc/x\n")
    leaf = tmp_path / "escape.yaml"
    leaf.write_text(body)
    assert leaf_file_problems(leaf, "escape.yaml") == [
        "escape.yaml: defaults entry '../../../etc/x' loads a config from outside conf/ (../../etc/x)"]


def test_group_selections_of_the_real_leaves_are_not_leaves():
    for leaf in ("smoke/ab_mixed", "smoke/b_only", "ab_mixed"):
        assert leaf_problems(leaf) == []


@pytest.mark.parametrize("name", ["../model/tiny", "smoke/../../model/tiny", "smoke/../ab_mixed",
                                  "/etc/passwd", "smoke//b_only"])
def test_experiment_names_with_dot_dot_or_absolute_paths_are_refused(name):
    with pytest.raises(ConfigError) as err:
        check_command_line([f"+experiment={name}"])
    (problem,) = err.value.problems
    assert problem.startswith(f"+experiment={name}: no such experiment leaf (conf/experiment/{name}.yaml) "
                              "(a leaf name is a path below conf/experiment/, without '..'); available: "
                              "a_only")


# ---- item 4: values by kind -------------------------------------------------------------------------------

@pytest.mark.parametrize("override,problem", [
    ("training.learning_rate=inf", "training.learning_rate: inf is not a finite number"),
    ("vllm.server.infer_timeout_s=inf", "vllm.server.infer_timeout_s: inf is not a finite number"),
    ("vllm.sync.timeout_s=inf", "vllm.sync.timeout_s: inf is not a finite number"),
    ("rollout_matching.fp_cost=inf", "rollout_matching.fp_cost: inf is not a finite number"),
    ("training.max_grad_norm=inf", "training.max_grad_norm: inf is not a finite number"),
    ("training.weight_decay=inf", "training.weight_decay: inf is not a finite number"),
    ("stage2_ab.bbox_ciou_weight=-inf", "stage2_ab.bbox_ciou_weight: -inf is not a finite number"),
    ("stage2_ab.bbox_ciou_weight=nan", "stage2_ab.bbox_ciou_weight: nan is not a finite number"),
    ("training.learning_rate=nan", "training.learning_rate: nan is not a finite number"),
    ("stage2_ab.bbox_smoothl1_weight=inf", "stage2_ab.bbox_smoothl1_weight: inf is not a finite number"),
    ("training.output_dir=''", "training.output_dir: is empty, but it names something: set it"),
    ("training.run_name=''", "training.run_name: is empty, but it names something: set it"),
    ("training.run_name='  '", "training.run_name: is empty, but it names something: set it"),
    ("vllm.server.host=''", "vllm.server.host: is empty, but it names something: set it"),
    ("training.resume_from_checkpoint=''",
     "training.resume_from_checkpoint: is empty, but it names something: set it (or null to leave it unset)"),
    ("data.val_sample_limit=0", "data.val_sample_limit: 0: must be >= 1, or null for every held-out sample "
                                "(training.eval_strategy: no turns eval off)"),
    ("data.val_sample_limit=-1", "data.val_sample_limit: -1: must be >= 1, or null for every held-out sample "
                                 "(training.eval_strategy: no turns eval off)"),
    ("vllm.server.log_tail_lines=-1", "vllm.server.log_tail_lines: must be >= 0 (0 prints no log tail)"),
    ("seed=-1", "seed: -1 is outside [0, 2**32 - 1] (numpy's seed range)"),
    ("vllm.server.startup_timeout_s=1e9", "vllm.server.startup_timeout_s: 1000000000.0 s is longer than "
                                          "604800 s (7 days), the longest wait coordexp accepts"),
    ("training.lr_scheduler_type=bogus",
     "training.lr_scheduler_type: 'bogus' is not a transformers scheduler (transformers.SchedulerType); use "
     f"one of {SCHEDULERS}"),
    ("training.lr_scheduler_type=warmup_stable_decay",
     "training.lr_scheduler_type: 'warmup_stable_decay' needs lr_scheduler_kwargs (num_decay_steps), which "
     f"coordexp does not pass; use one of {SCHEDULERS}"),
    ("training.lr_scheduler_type=reduce_lr_on_plateau",
     "training.lr_scheduler_type: 'reduce_lr_on_plateau' steps on an eval metric in 'min' mode, while every "
     f"metric_for_best_model coordexp accepts is higher-is-better; use one of {SCHEDULERS}"),
    ("training.metric_for_best_model=bogus", "training.metric_for_best_model: 'bogus' is not a metric the "
                                             f"rollout eval logs (docs/metrics.md); use one of {BEST}"),
    ("training.metric_for_best_model=eval_rollout/fp",
     "training.metric_for_best_model: 'eval_rollout/fp' is a metric where higher is not better, but the "
     f"learner keeps the checkpoint with the highest value; use one of {BEST}"),
    ("vllm.server.base_urls=[http://127.0.0.1:abc]",
     "vllm.server.base_urls[0]: 'http://127.0.0.1:abc' is not http(s)://host:port (Port could not be cast to "
     "integer value as 'abc'; the port is an integer 1..65535)"),
    ("vllm.server.base_urls=[http://127.0.0.1:99999]",
     "vllm.server.base_urls[0]: 'http://127.0.0.1:99999' is not http(s)://host:port (Port out of range "
     "0-65535; the port is an integer 1..65535)"),
    ("vllm.server.base_urls=[http://127.0.0.1:0]",
     "vllm.server.base_urls[0]: 'http://127.0.0.1:0': port 0 is not a port a server listens on (use "
     "1..65535)"),
    ("vllm.server.base_urls=[{host:a,port:1}]",
     "vllm.server.base_urls[0]: a mapping {'host': 'a', 'port': 1} is not a URL: each item is one string "
     "http(s)://host:port"),
    ("vllm.server_gpus=[[0]]", "vllm.server_gpus[0]: a list [0] where a list item of type int belongs"),
])
def test_bad_values_are_refused_with_the_key(override, problem):
    assert problems_of("rollout=vllm_server", override) == [problem]


@pytest.mark.parametrize("value", ["2", "0", "yes", "no", "on", "'true'", "1.0"])
def test_booleans_are_strict_on_the_command_line(value):
    override = f"rollout_matching.repeat_terminate.enabled={value}"
    with pytest.raises(ConfigError) as err:
        check_command_line([LEAF, override])
    (problem,) = err.value.problems
    assert problem.startswith("rollout_matching.repeat_terminate.enabled: ")
    assert problem.endswith(f" is not a boolean: use true or false (from command-line override '{override}')")


def test_booleans_are_strict_in_a_sweep_and_in_a_leaf(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_command_line([LEAF, "vllm.server.reuse_existing=true,2"])
    assert err.value.problems == ["vllm.server.reuse_existing: 2 is not a boolean: use true or false "
                                  "(from command-line override 'vllm.server.reuse_existing=true,2')"]
    leaf = tmp_path / "flag.yaml"
    leaf.write_text(Path("conf/experiment/smoke/ab_mixed.yaml").read_text()
                    + "vllm:\n  enforce_eager: 1\n")
    assert leaf_file_problems(leaf, "flag.yaml") == [
        "flag.yaml: vllm.enforce_eager: 1 is not a boolean: use true or false"]
    assert check_command_line([LEAF, "rollout_matching.repeat_terminate.enabled=false"]) is None


def test_every_problem_of_one_command_line_is_reported_at_once():
    assert problems_of("training.learning_rate=inf", "training.run_name=''", "data.val_sample_limit=0") == [
        "training.run_name: is empty, but it names something: set it",
        "training.learning_rate: inf is not a finite number",
        "data.val_sample_limit: 0: must be >= 1, or null for every held-out sample (training.eval_strategy: "
        "no turns eval off)",
    ]


def test_free_text_may_be_empty():
    assert to_train_config(compose([LEAF, "data.system_prompt=''"])).data.system_prompt == ""


def test_scheduler_tables_cover_transformers_and_every_accepted_one_builds():
    import torch
    from transformers import SchedulerType, get_scheduler

    assert set(LR_SCHEDULERS) | set(UNSUPPORTED_LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert not set(LR_SCHEDULERS) & set(UNSUPPORTED_LR_SCHEDULERS)
    for name in LR_SCHEDULERS:  # what the learner passes: the name, warmup and max steps, nothing else
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)


def test_metric_registry_is_what_the_eval_emits():
    from coordexp.evaluation.detection import DetectionAggregate
    from coordexp.telemetry.metrics import MetricBuffer, reduce_buffers
    from coordexp.trainer.evaluation import (  # the producers the in-training eval calls
        add_detection_metrics,
        finish_detection_metrics,
        record_rollout_metrics,
    )

    one_sample = SimpleNamespace(gen_tokens=5, triggered=0, hit_max_new_tokens=0, truncated=0,
                                 invalid_rollout=0, valid_pred=1, dropped_invalid=0, dropped=defaultdict(int),
                                 gt=1, matched=1, fp=0, fn=0, matched_iou_sum=0.9, gating_rejections=0,
                                 target_dropped=0)
    buf = MetricBuffer()
    record_rollout_metrics(buf, [one_sample], prefix="eval_rollout")
    add_detection_metrics(buf, DetectionAggregate(), prefix="eval_rollout")
    buf.add_max("eval_rollout/repeat_terminate_active", 1)  # what trainer/evaluation.py adds
    buf.add_max("eval_time/rollout_s", 0.1)
    emitted = set(finish_detection_metrics(reduce_buffers([buf.to_payload()]), prefix="eval_rollout"))
    assert emitted == set(EVAL_METRICS)
    assert "eval_rollout/f1" in BEST_MODEL_METRICS and "eval_rollout/fp" not in BEST_MODEL_METRICS


def test_every_shipped_leaf_and_group_file_has_strict_booleans():
    import yaml

    from coordexp.config.value_rules import flatten, raw_value_problems

    for path in Path("conf").rglob("*.yaml"):
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
        if "# @package _global_" not in text and path.parent != Path("conf"):  # a group file: at its group
            for part in reversed(path.parent.relative_to("conf").parts):
                raw = {part: raw}
        body = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
        assert raw_value_problems(flatten(body)) == [], path


# ---- item 4: directories a run writes ---------------------------------------------------------------------

def test_run_dirs_that_cannot_be_created_are_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert dir_problems([("hydra.run.dir", f"{blocker}/run"), ("training.logging_dir", f"{blocker}/run/tb"),
                         ("training.output_dir", str(blocker)), ("x", str(tmp_path / "new/deeper"))]) == [
        f"hydra.run.dir: '{blocker}/run' cannot be created: '{blocker}' is a file",
        f"training.output_dir: '{blocker}' exists and is not a directory",
    ]
    assert dir_problems([("hydra.run.dir", "/proc/coordexp-run")]) == [
        "hydra.run.dir: '/proc/coordexp-run' is not writable (nothing can be created in '/proc'): No such "
        "file or directory"]
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_before_start_covers_run_dirs_and_every_sweep_job(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as err:
        check_before_start([LEAF, f"hydra.run.dir={blocker}/run"])
    assert err.value.problems == [f"hydra.run.dir: '{blocker}/run' cannot be created: '{blocker}' is a file"]
    check_before_start([LEAF, f"hydra.run.dir={blocker}/run"], writes=False)  # --cfg job writes nothing
    with pytest.raises(ConfigError) as err:
        check_before_start([LEAF, "stage2_ab.schedule.b_ratio=0.5,2", "training.learning_rate=inf",
                            f"hydra.sweep.dir={tmp_path}/sweep"], multirun=True)
    assert err.value.problems == [
        "training.learning_rate: inf is not a finite number",
        "stage2_ab.schedule.b_ratio: 2.0 is outside [0, 1] (sweep job stage2_ab.schedule.b_ratio=2)"]
    assert [label for _, label in sweep_jobs([LEAF, "seed=1,2", "data.val_sample_limit=range(3,5)"])] == [
        "seed=1 data.val_sample_limit=3", "seed=1 data.val_sample_limit=4",
        "seed=2 data.val_sample_limit=3", "seed=2 data.val_sample_limit=4"]


# ---- item 4: command lines Hydra cannot parse -------------------------------------------------------------

@pytest.mark.parametrize("override,problem", [
    ("training.run_name=${oops",
     "training.run_name: cannot parse the value of override 'training.run_name=${oops': mismatched input '{' "
     "expecting <EOF>. An unterminated '${' or an unbalanced bracket or quote? Quote the value or close it"),
    ("training.max_steps",
     "training.max_steps: not an override: write key=value (+key=value adds a key, ~key deletes one); Hydra: "
     "missing EQUAL at '<EOF>'"),
    ("data.system_prompt=Réponds",
     "data.system_prompt: cannot parse the value of override 'data.system_prompt=Réponds': Hydra reads "
     "unquoted values in ASCII only; quote it (the shell's double quotes keep Hydra's single quotes): "
     "\"data.system_prompt='Réponds'\""),
    ("+extra.note=猫🚗",
     "+extra.note: cannot parse the value of override '+extra.note=猫🚗': Hydra reads unquoted values in "
     "ASCII only; quote it (the shell's double quotes keep Hydra's single quotes): \"+extra.note='猫🚗'\""),
])
def test_unparsable_overrides_name_their_key(override, problem):
    with pytest.raises(ConfigError) as err:
        check_command_line([LEAF, override])
    assert err.value.problems == [problem]


def test_the_quoting_the_non_ascii_hint_suggests_parses():
    check_command_line([LEAF, "data.system_prompt='Réponds en français'", "+extra.note='猫🚗'"])


@pytest.mark.parametrize("override,problem", [
    ("training.run_name=${nope.key}", "training.run_name: Interpolation key 'nope.key' not found"),
    ("training.run_name=${oc.env:COORDEXP_SURELY_UNSET}",
     "training.run_name: KeyError raised while resolving interpolation: \"Environment variable "
     "'COORDEXP_SURELY_UNSET' not found\""),
])
def test_unresolvable_interpolations_name_their_key(override, problem):
    with pytest.raises(ConfigError) as err:
        check_before_start([LEAF, override], writes=False)
    assert err.value.problems == [problem]


def test_an_invalid_value_does_not_hide_the_run_dir_rule():
    with pytest.raises(ConfigError) as err:
        check_before_start([LEAF, "training.nnodes=2", "training.rdzv_endpoint=n0:29400",
                            "training.device_memory_gib=0"], multirun=True, writes=False)
    assert [p.split(":")[0] for p in err.value.problems] == ["training.device_memory_gib", "training.nnodes"]
    assert err.value.problems[1] == (
        "training.nnodes: 2 nodes cannot run a sweep (-m); start each job as its own run")

"""Rollout evaluation during training: each rank decodes its shard of the held-out set (micro-batch =
decode_batch_size), parses strictly, matches, and the counts are reduced globally into eval_rollout/*.
Rank 0 also writes qualitative dumps and PNGs of its first samples (coordexp.evaluation.artifacts).
The trainer's ``rollouts`` syncs the weights first (server mode) and rolls out through its backend."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from transformers.trainer_utils import speed_metrics

from coordexp.config.contract import RolloutContract
from coordexp.evaluation.artifacts import find_tensorboard_writer, write_eval_artifacts
from coordexp.evaluation.detection import add_detection_metrics, finish_detection_metrics
from coordexp.evaluation.scoring import score_rollouts
from coordexp.models.prompts import TextPromptEncoder
from coordexp.rollout.scoring import TokenizerAdapter, record_rollout_metrics, sample_record, score_rollout
from coordexp.telemetry.metrics import MetricBuffer, gather_and_reduce
from coordexp.telemetry.record import say


def rollout_evaluator(val_samples: Sequence, adapter: TokenizerAdapter, prompts: TextPromptEncoder,
                      contract: RolloutContract, seed: int) -> Callable:
    def evaluate(trainer) -> dict[str, float]:
        rank, world = trainer.args.process_index, trainer.args.world_size
        shard = list(val_samples[rank::world])
        started = time.time()  # transformers' speed_metrics reads time.time()
        start = time.perf_counter()
        batch = trainer.rollouts(shard, [prompts.encode(s) for s in shard], seed)
        scored = [score_rollout(s, r, adapter, contract) for s, r in zip(shard, batch.rollouts)]
        records = [sample_record(s, r, *sc, target_dropped=False)
                   for s, r, sc in zip(shard, batch.rollouts, scored)]
        predictions, agg, _ = score_rollouts(shard, batch.rollouts, adapter, contract, scored=scored)
        buf = MetricBuffer()
        record_rollout_metrics(buf, records, prefix="eval_rollout")
        add_detection_metrics(buf, agg, prefix="eval_rollout")
        buf.add_max("eval_rollout/repeat_terminate_active", batch.repeat_terminate_active)
        buf.add_max("eval_time/rollout_s", time.perf_counter() - start)
        metrics = finish_detection_metrics(gather_and_reduce(buf), prefix="eval_rollout")
        # the Trainer's own eval timing keys (eval_runtime, eval_samples_per_second, eval_steps_per_second):
        # every sample of the held-out split, in decode batches of this rank's shard
        metrics.update(speed_metrics("eval", started, num_samples=len(val_samples),
                                     num_steps=math.ceil(len(shard) / contract.decode_batch_size)))
        if trainer.is_world_process_zero():
            try:
                write_eval_artifacts(predictions, trainer.run_dir, trainer.state.global_step,
                                     tb_writer=find_tensorboard_writer(trainer))
            except Exception as err:  # noqa: BLE001 - artifacts are secondary: report, never stop training
                say(f"warning: eval artifacts at step {trainer.state.global_step} failed: "
                    f"{type(err).__name__}: {err}")
        return metrics

    return evaluate

"""Rollout evaluation during training: each rank decodes its shard of the held-out set (micro-batch =
decode_batch_size), parses strictly, matches, and the counts are reduced globally into eval_rollout/*."""

from __future__ import annotations

import time
from typing import Callable, Dict, Sequence

from coordexp.config.contract import RolloutContract
from coordexp.telemetry.metrics import MetricBuffer, gather_and_reduce
from coordexp.trainer.channels import TokenizerAdapter, record_rollout_metrics, sample_record, score_rollout
from coordexp.trainer.rollouts import RolloutBackend


def rollout_evaluator(val_samples: Sequence, adapter: TokenizerAdapter, backend: RolloutBackend,
                      contract: RolloutContract, seed: int) -> Callable:
    def evaluate(trainer) -> Dict[str, float]:
        rank, world = trainer.args.process_index, trainer.args.world_size
        shard = list(val_samples[rank::world])
        start = time.perf_counter()
        prompts = [adapter.prompt_ids(s.messages) for s in shard]
        batch = backend.generate(prompts, [s.messages for s in shard], seed)
        records = [sample_record(s, r, *score_rollout(s, r, adapter, contract), target_dropped=False)
                   for s, r in zip(shard, batch.rollouts)]
        buf = MetricBuffer()
        record_rollout_metrics(buf, records, prefix="eval_rollout")
        buf.add_max("eval_rollout/repeat_terminate_active", batch.repeat_terminate_active)
        buf.add_max("eval_time/rollout_s", time.perf_counter() - start)
        return gather_and_reduce(buf)

    return evaluate

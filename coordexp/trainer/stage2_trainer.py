"""The Stage-2 AB trainer: a `transformers.Trainer` whose loss step runs Channel A or Channel B.

The Trainer provides DDP, gradient accumulation, optimizer/scheduler, checkpoints/resume, logging
callbacks (TensorBoard, progress bars). This subclass supplies the per-micro-step sequences and the
losses, buffers metrics over the logging window, and reduces them globally when the Trainer logs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import Trainer

from coordexp.config.contract import RolloutContract
from coordexp.config.schema import Stage2ABConfig
from coordexp.models.prompts import TextPromptEncoder
from coordexp.rollout.batch import RolloutBackend, RolloutBatch, generate_rollouts
from coordexp.rollout.scoring import TokenizerAdapter, record_as_dict, record_rollout_metrics
from coordexp.rollout.server_backend import ServerBackendError
from coordexp.telemetry.metrics import MetricBuffer, gather_and_reduce
from coordexp.trainer.batch import APPENDED, PREFIX, collate
from coordexp.trainer.channels import channel_a_sequence, channel_b_sequence
from coordexp.trainer.losses import (
    coord_distribution,
    coord_gate,
    geometry_losses,
    slot_logits,
    weighted_token_ce,
)
from coordexp.trainer.positions import mrope_position_ids
from coordexp.trainer.schedule import is_channel_b, realized_b_ratio
from coordexp.trainer.softctx import coord_slot_mask, soft_self_context
from coordexp.trainer.weight_sync import WeightSync, WeightSyncError


class Stage2ABTrainer(Trainer):
    def __init__(self, *args, stage2_ab: Stage2ABConfig, contract: RolloutContract, adapter: TokenizerAdapter,
                 prompts: TextPromptEncoder, rollout_backend: RolloutBackend, seed: int, run_dir: Path,
                 evaluator=None, weight_sync: WeightSync | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage2_ab = stage2_ab
        self.contract = contract
        self.adapter = adapter
        self.prompts = prompts
        self.rollout_backend = rollout_backend
        self.weight_sync = weight_sync
        self.seed = seed
        self.run_dir = Path(run_dir)
        self.evaluator = evaluator
        self.metric_buffer = MetricBuffer()
        self._coord_ids = torch.tensor(adapter.coord_token_ids, dtype=torch.long)
        self._sample_log = self.run_dir / f"rollout_samples.rank{self.args.process_index}.jsonl"

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and saved models also carry a vision-language model's image processor (the Trainer
        saves the tokenizer only), so the folder loads on its own: coordexp.eval, resume, a server."""
        super().save_model(output_dir, _internal_call)
        if self.prompts.image_processor is not None and self.args.should_save:
            self.prompts.image_processor.save_pretrained(output_dir or self.args.output_dir)

    # ---- one micro-step -------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples = inputs["samples"]
        step = self.state.global_step
        channel_b = is_channel_b(step, self.stage2_ab.schedule.b_ratio)
        buf = self.metric_buffer
        prompts = [self.prompts.encode(s) for s in samples]
        if channel_b:
            seqs = self._channel_b_sequences(samples, prompts, step)
        else:
            seqs = [channel_a_sequence(s, p, self.adapter, self.contract.object_field_order, self.stage2_ab)
                    for s, p in zip(samples, prompts)]
        buf.add_max("stage2/channel_b", float(channel_b))
        buf.add_max("stage2/channel_a", float(not channel_b))
        buf.add_max("stage2_ab/b_ratio_realized", realized_b_ratio(step + 1, self.stage2_ab.schedule.b_ratio))
        buf.add_sum("train/samples", len(samples))
        start = time.perf_counter()
        loss = self._loss(model, seqs, soft_context=not channel_b)
        buf.add_max("time/forward_s", time.perf_counter() - start)
        return loss

    def sync_rollout_weights(self) -> None:
        """Before any rollout: push the current weights to the rollout server(s) if they changed since the
        last push. A collective under DDP (Channel-B steps and rollout evals reach it on every rank at the
        same step); every rank records ``time/weight_sync_s`` (rank 0: the push; others: the wait)."""
        if self.weight_sync is None:
            return
        step = int(self.state.global_step)
        if not self.weight_sync.needed(step):
            return
        t0 = time.perf_counter()
        try:
            self.weight_sync.maybe_sync(lambda: self.accelerator.unwrap_model(self.model), step)
        except WeightSyncError as exc:
            raise ServerBackendError(f"{exc} (optimizer step {step})") from None
        self.metric_buffer.add_max("time/weight_sync_s", time.perf_counter() - t0)

    def rollouts(self, samples, prompts, seed: int) -> RolloutBatch:
        """The rollouts of ``samples`` (Channel B and the rollout eval): sync the weights, then roll out. A
        server failure names the optimizer step it happened at."""
        self.sync_rollout_weights()
        try:
            return generate_rollouts(self.rollout_backend, samples, prompts, seed)
        except ServerBackendError as exc:
            raise ServerBackendError(f"{exc} (optimizer step {self.state.global_step})") from None

    def _channel_b_sequences(self, samples, prompts, step):
        buf = self.metric_buffer
        seed = (self.seed + step * 1000003 + self.args.process_index * 7919) & 0x7FFFFFFF
        batch = self.rollouts(samples, prompts, seed)
        buf.add_max("time/rollout_generate_s", batch.seconds)
        buf.add_max("rollout/repeat_terminate_active", batch.repeat_terminate_active)
        start = time.perf_counter()
        seqs, records = [], []
        for sample, prompt, rollout in zip(samples, prompts, batch.rollouts):
            seq, record = channel_b_sequence(sample, prompt, rollout, self.adapter, self.contract,
                                             self.stage2_ab)
            records.append(record)
            if seq is not None:
                seqs.append(seq)
        buf.add_max("time/rollout_parse_match_s", time.perf_counter() - start)
        record_rollout_metrics(buf, records)
        with self._sample_log.open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record_as_dict(record)}) + "\n")
        return seqs

    def _logits(self, model, batch: dict, model_inputs: dict, soft_context: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits for CE, logits for geometry): one plain forward, or the Channel-A soft self-context
        passes (``stage2_ab.n_softctx_iter >= 2``; CE from pass 0, geometry from the last)."""
        ab = self.stage2_ab
        if not soft_context or ab.n_softctx_iter == 1:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **model_inputs).logits
            return logits, logits
        inner = self.accelerator.unwrap_model(model)
        kwargs = {"attention_mask": batch["attention_mask"], **model_inputs}
        positions = mrope_position_ids(inner, batch["input_ids"], batch["attention_mask"], model_inputs)
        if positions is not None:
            kwargs["position_ids"] = positions
        ids = batch["input_ids"]
        slots = coord_slot_mask(tuple(ids.shape), batch["geometry_slots"], ids.device)
        return soft_self_context(model, inner, inner.get_input_embeddings(), ids, slots,
                                 self._coord_ids.to(ids.device), n_iter=ab.n_softctx_iter,
                                 temperature=ab.softctx_temperature, grad_mode=ab.softctx_grad_mode.value,
                                 **kwargs)

    def _loss(self, model, seqs, soft_context: bool = False) -> torch.Tensor:
        buf = self.metric_buffer
        ab = self.stage2_ab
        if not seqs:  # every sample failed its target invariants: keep DDP in step with a zero loss
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            buf.add_mean("loss/total", 0.0)
            return zero
        batch = collate(seqs, self.adapter.pad_id, self.prompts.image_token_id)
        model_inputs = {k: v.to(self.args.device) for k, v in batch.pop("model_inputs").items()}
        batch = {k: v.to(self.args.device) for k, v in batch.items()}
        ce_logits, geo_logits = self._logits(model, batch, model_inputs, soft_context)
        ce = weighted_token_ce(ce_logits, batch["input_ids"], batch["ce_weights"])
        slots = slot_logits(geo_logits, batch["geometry_slots"])
        coord_ids = self._coord_ids.to(geo_logits.device)
        probs = coord_distribution(slots, coord_ids, ab.softctx_temperature)
        sl1, ciou, coord_ce = geometry_losses(probs, batch["geometry_bins"], ab.bbox_smoothl1_beta)
        gate = coord_gate(slots, coord_ids)
        total = (ce + ab.bbox_smoothl1_weight * sl1 + ab.bbox_ciou_weight * ciou
                 + ab.coord_ce_weight * coord_ce + ab.coord_gate_weight * gate)
        buf.add_mean("loss/ce", ce.item())
        buf.add_mean("loss/bbox_smoothl1", sl1.item())
        buf.add_mean("loss/bbox_ciou", ciou.item())
        buf.add_mean("loss/coord_ce", coord_ce.item())
        buf.add_mean("loss/coord_gate", gate.item())
        buf.add_mean("loss/total", total.item())
        kinds = batch["geometry_kinds"]
        buf.add_sum("stage2/geometry_groups_prefix", int((kinds == PREFIX).sum()))
        buf.add_sum("stage2/geometry_groups_appended", int((kinds == APPENDED).sum()))
        buf.add_sum("stage2/supervised_tokens", int((batch["ce_weights"] > 0).sum()))
        return total

    # ---- logging: every metric is global ---------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval") for k in logs):
            reduced = gather_and_reduce(self.metric_buffer)  # collective: every rank logs at this step
            self.metric_buffer = MetricBuffer()
            if reduced.get("time/rollout_generate_s"):
                reduced["rollout/gen_tokens_per_s"] = (reduced["rollout/gen_new_tokens_total"]
                                                       / reduced["time/rollout_generate_s"])
            logs = {**logs, **reduced}
        super().log(logs, start_time)

    # ---- rollout evaluation ------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.evaluator is None:
            return {}
        metrics = self.evaluator(self)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

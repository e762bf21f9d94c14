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
from coordexp.trainer.kept_logits import accepts_logits_to_keep, forward_logits, supervised_positions
from coordexp.trainer.losses import sample_losses
from coordexp.trainer.optim import GroupPlan, optimizer_param_groups
from coordexp.trainer.packing import NextFitPacker, PackingSettings, check_fits, pack, segment_length
from coordexp.trainer.pipeline import ChunkProducer
from coordexp.trainer.positions import mrope_position_ids
from coordexp.trainer.resume import load_renamed_checkpoint, tied_keys_loaded
from coordexp.trainer.schedule import is_channel_b, realized_b_ratio
from coordexp.trainer.softctx import coord_slot_mask, soft_self_context
from coordexp.trainer.weight_sync import WeightSync, WeightSyncError


class Stage2ABTrainer(Trainer):
    def __init__(self, *args, stage2_ab: Stage2ABConfig, contract: RolloutContract, adapter: TokenizerAdapter,
                 prompts: TextPromptEncoder, rollout_backend: RolloutBackend, seed: int, run_dir: Path,
                 evaluator=None, weight_sync: WeightSync | None = None,
                 packing: PackingSettings | None = None, group_plan: GroupPlan | None = None, **kwargs):
        self.group_plan = group_plan  # per-group learning rates (coordexp.trainer.optim)
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
        self.packing = packing  # training.packing_*, or None without packing
        self._step_samples: list = []
        self._keeps_logits: bool | None = None  # the model takes logits_to_keep (asked at the first forward)
        self._forward_tokens = 0  # tokens the model read since the last floating_point_ops
        self._flop_parameters: int | None = None
        self._sample_log = self.run_dir / f"rollout_samples.rank{self.args.process_index}.jsonl"

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings (``args.optim``), with one param group per parameter
        group x decay/no-decay, each at its group's learning rate (``optimizer_param_groups``)."""
        if self.group_plan is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = optimizer_param_groups(opt_model, self.group_plan, self.args.weight_decay,
                                        self.get_decay_parameter_names(opt_model))
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and saved models also carry a vision-language model's image processor (the Trainer
        saves the tokenizer only), so the folder loads on its own: coordexp.eval, resume, a server."""
        super().save_model(output_dir, _internal_call)
        if self.prompts.image_processor is not None and self.args.should_save:
            self.prompts.image_processor.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume loads a full checkpoint under the model's own parameter names (a vision-language checkpoint
        is saved in the released layout; coordexp.trainer.resume.load_renamed_checkpoint); adapters, FSDP and
        models saved as they are go through the Trainer."""
        model = self.model if model is None else model
        result = None
        if not self.is_fsdp_enabled and not hasattr(model, "peft_config"):
            result = load_renamed_checkpoint(model, resume_from_checkpoint)
        if result is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self._issue_warnings_after_load(result)

    def _issue_warnings_after_load(self, load_result) -> None:
        """On resume: a tied weight (``lm_head.weight`` of a tied-embedding model, stored once by safetensors)
        is loaded through the tensor it is tied to; only keys that are really missing are reported."""
        tied = set(tied_keys_loaded(self.model, list(load_result.missing_keys)))
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[k for k in load_result.missing_keys if k not in tied]))

    # ---- one micro-step -------------------------------------------------------------------------
    def floating_point_ops(self, inputs) -> int:
        """transformers' estimate of a micro-step's floating-point operations, forward and backward: 6 x
        non-embedding parameters x tokens (Kaplan et al. 2020, the rule of ``PreTrainedModel.
        floating_point_ops``), over the tokens the model read in the micro-step (rollout and packed segments,
        each soft self-context pass); the Trainer sums it into ``total_flos``. Its own rule reads
        ``inputs["input_ids"]``, which raw samples do not have, so it gave 0."""
        if self._flop_parameters is None:
            inner = self.accelerator.unwrap_model(self.model)
            self._flop_parameters = (inner.num_parameters(exclude_embeddings=True)
                                     if hasattr(inner, "num_parameters")
                                     else sum(p.numel() for p in inner.parameters()))
        tokens, self._forward_tokens = self._forward_tokens, 0
        return 6 * self._flop_parameters * tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples = inputs["samples"]
        step = self.state.global_step
        channel_b = is_channel_b(step, self.stage2_ab.schedule.b_ratio)
        buf = self.metric_buffer
        buf.add_max("stage2/channel_b", float(channel_b))
        buf.add_max("stage2/channel_a", float(not channel_b))
        buf.add_max("stage2_ab/b_ratio_realized", realized_b_ratio(step + 1, self.stage2_ab.schedule.b_ratio))
        buf.add_sum("train/samples", len(samples))
        if self.packing is not None:
            return self._packed_micro_step(model, samples, channel_b, step)
        seqs = self._sequences(samples, channel_b, step)
        start = time.perf_counter()
        losses = self._sample_losses(model, seqs, soft_context=not channel_b)
        loss = self._mean_loss(model, losses, len(samples))
        buf.add_max("time/forward_s", time.perf_counter() - start)
        return loss

    def _sequences(self, samples, channel_b: bool, step: int):
        prompts = [self.prompts.encode(s) for s in samples]
        if channel_b:
            return self._channel_b_sequences(samples, prompts, step)
        return [channel_a_sequence(s, p, self.adapter, self.contract.object_field_order, self.stage2_ab)
                for s, p in zip(samples, prompts)]

    def _packed_micro_step(self, model, samples, channel_b: bool, step: int) -> torch.Tensor:
        """Micro-steps of the window buffer raw samples (loss 0); the last builds every segment of the step,
        packs them and runs one forward/backward per pack (intermediate packs under ``no_sync``). The
        returned loss trains the last pack and reports the whole step's loss."""
        self._step_samples += samples
        if not self.accelerator.sync_gradients:  # not the window's last micro-step
            return torch.zeros((), device=self.args.device, requires_grad=True)
        samples, self._step_samples = self._step_samples, []
        t0 = time.perf_counter()
        prompts = [self.prompts.encode(s) for s in samples]
        if channel_b:
            chunks = self._channel_b_chunks(samples, prompts, step)
        else:
            chunks = iter([[channel_a_sequence(s, p, self.adapter, self.contract.object_field_order,
                                               self.stage2_ab) for s, p in zip(samples, prompts)]])
        loss = self._train_packs(model, chunks, len(samples), soft_context=not channel_b, step=step)
        self.metric_buffer.add_max("time/step_s", time.perf_counter() - t0)
        return loss

    def _train_packs(self, model, chunks, n_samples: int, soft_context: bool, step: int) -> torch.Tensor:
        """Pack the segments of ``chunks`` (lists, in order) next-fit as they arrive; train every closed pack
        now (forward + backward under ``no_sync``, its loss weighted by its share of the step's
        ``n_samples``) and return the last pack's loss for the Trainer's synced backward."""
        cap = self.packing.length
        packer = NextFitPacker(cap)
        gas = self.current_gradient_accumulation_steps
        scale = self.accelerator.gradient_accumulation_steps  # accelerator.backward divides by it
        done, packs, tokens, segments, busy = 0.0, 0, 0, 0, 0.0
        for seqs in chunks:
            for q in seqs:
                length = segment_length(q)
                check_fits(length, cap, f"step {step}: sample {q.source}")
                tokens, segments = tokens + length, segments + 1
                closed = packer.add(q, length)
                if closed:
                    t0 = time.perf_counter()
                    with self.accelerator.no_sync(model):
                        part = self._pack_loss(model, closed, n_samples, soft_context)
                        self.accelerator.backward(part * scale)
                    done += float(part.detach())
                    packs += 1
                    busy += time.perf_counter() - t0
        t0 = time.perf_counter()
        if packer.open:
            part = self._pack_loss(model, packer.open, n_samples, soft_context)
            packs += 1
        else:  # every sample failed its target invariants: keep DDP in step with a zero loss
            part = self._mean_loss(model, None, 0)
        busy += time.perf_counter() - t0
        self._record_packs(segments, packs, tokens)
        self.metric_buffer.add_max("time/forward_s", busy)
        # The Trainer divides by the window's micro-step count before backward: undo it for the last pack;
        # the packs already trained join as a constant, so the logged loss is the step's loss.
        return (part + done) * gas

    def _record_packs(self, segments: int, packs: int, tokens: int) -> None:
        buf = self.metric_buffer
        buf.add_sum("packing/segments", segments)
        buf.add_sum("packing/packs", packs)
        buf.add_ratio("packing/fill", tokens, packs * self.packing.length)
        fill = tokens / (packs * self.packing.length) if packs else 1.0
        buf.add_sum("packing/underfilled_steps", int(fill < self.packing.min_fill_ratio))

    def _pack_loss(self, model, seqs, n_step: int, soft_context: bool) -> torch.Tensor:
        """Sum of the pack's per-sample losses over the step's ``n_step`` samples (its share of the mean)."""
        model_ = self.accelerator.unwrap_model(model)
        batch = pack(seqs, self.prompts.image_token_id, model_ if self.prompts.image_token_id else None)
        losses = self._forward_losses(model, batch, len(seqs), soft_context)
        return self._weighted(losses).sum() / n_step

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
        """All Channel-B segments of ``samples`` (serial: one rollout call, then parse/match/target)."""
        return [q for chunk in self._channel_b_chunks(samples, prompts, step, pipelined=False) for q in chunk]

    def _channel_b_chunks(self, samples, prompts, step, pipelined: bool | None = None):
        """The step's Channel-B segments, chunk by chunk: after the weight sync, either one rollout call for
        every sample (serial), or ``decode_batch_size`` samples per call on a producer thread while the
        caller trains (``rollout_matching.pipeline`` in server mode, with packing). Records the rollout
        metrics and the per-sample log once the last chunk is through."""
        buf = self.metric_buffer
        seed = (self.seed + step * 1000003 + self.args.process_index * 7919) & 0x7FFFFFFF
        self.sync_rollout_weights()  # collective: every rank, before any request of this step
        records, active, parse_s = [], [], [0.0]

        def fetch(a: int, b: int):
            batch = self.rollouts(samples[a:b], prompts[a:b], seed + a)
            active.append(batch.repeat_terminate_active)
            t0 = time.perf_counter()
            seqs = []
            for sample, prompt, rollout in zip(samples[a:b], prompts[a:b], batch.rollouts):
                seq, record = channel_b_sequence(sample, prompt, rollout, self.adapter, self.contract,
                                                 self.stage2_ab)
                records.append(record)
                if seq is not None:
                    seqs.append(seq)
            parse_s[0] += time.perf_counter() - t0
            return seqs, batch.seconds

        if pipelined is None:
            pipelined = self.contract.pipeline and self.packing is not None
        if pipelined:
            producer = ChunkProducer(fetch, len(samples), self.contract.decode_batch_size)
            generate_s = 0.0
            for seqs, seconds in producer:
                generate_s += seconds
                yield seqs
            buf.add_max("time/rollout_wait_s", producer.waited)
        else:
            seqs, generate_s = fetch(0, len(samples))
            yield seqs
        buf.add_max("stage2/rollout_pipelined", float(pipelined))
        buf.add_max("time/rollout_generate_s", generate_s)
        buf.add_max("rollout/repeat_terminate_active", min(active) if active else 0)
        buf.add_max("time/rollout_parse_match_s", parse_s[0])
        record_rollout_metrics(buf, records)
        with self._sample_log.open("a") as f:
            for record in records:
                # the step's number in metrics.jsonl and on the console (global_step counts finished steps)
                f.write(json.dumps({"step": step + 1, **record_as_dict(record)}) + "\n")

    def _logits(self, model, batch: dict, model_inputs: dict, soft_context: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits for CE, logits for geometry, the positions of each): one plain forward, or the Channel-A
        soft self-context passes (``stage2_ab.n_softctx_iter >= 2``; CE from pass 0, geometry from the
        last). Only the positions that predict a supervised token get logits (coordexp.trainer.kept_logits).
        A packed batch carries its own ``position_ids`` and no attention mask (block-diagonal by
        positions)."""
        ab = self.stage2_ab
        packed = batch.get("position_ids") is not None
        kwargs = {"attention_mask": batch["attention_mask"], **model_inputs}
        if packed:
            kwargs.update(position_ids=batch["position_ids"], use_cache=False)
        ids = batch["input_ids"]
        inner = self.accelerator.unwrap_model(model)
        if self._keeps_logits is None:
            self._keeps_logits = accepts_logits_to_keep(inner)
        positions, slot_positions = supervised_positions(batch["ce_weights"], batch["geometry_slots"])
        self._forward_tokens += ids.numel() * (ab.n_softctx_iter if soft_context else 1)
        if not soft_context or ab.n_softctx_iter == 1:
            logits = forward_logits(model, positions, self._keeps_logits, input_ids=ids, **kwargs)
            return logits, logits, positions, positions
        if not packed:
            mrope = mrope_position_ids(inner, ids, batch["attention_mask"], model_inputs)
            if mrope is not None:
                kwargs["position_ids"] = mrope
        kwargs.pop("use_cache", None)
        slots = coord_slot_mask(tuple(ids.shape), batch["geometry_slots"], ids.device)
        first, last = soft_self_context(model, inner, inner.get_input_embeddings(), ids, slots,
                                        self._coord_ids.to(ids.device), n_iter=ab.n_softctx_iter,
                                        temperature=ab.softctx_temperature,
                                        grad_mode=ab.softctx_grad_mode.value,
                                        keep=(positions, slot_positions), keeps_logits=self._keeps_logits,
                                        **kwargs)
        return first, last, positions, slot_positions

    def _forward_losses(self, model, batch: dict, n_segments: int, soft_context: bool
                        ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms of a collated or packed batch (and its per-batch metrics)."""
        device = self.args.device
        model_inputs = {k: v.to(device) for k, v in batch.pop("model_inputs").items()}
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        ce_logits, geo_logits, ce_at, geo_at = self._logits(model, batch, model_inputs, soft_context)
        ab = self.stage2_ab
        coord_ids = self._coord_ids.to(geo_logits.device)
        losses = sample_losses(ce_logits, geo_logits, batch, coord_ids, n_segments,
                               temperature=ab.softctx_temperature, smoothl1_beta=ab.bbox_smoothl1_beta,
                               ce_positions=ce_at, geo_positions=geo_at)
        buf = self.metric_buffer
        for name, per_sample in losses.items():
            buf.add_ratio(f"loss/{name}", float(per_sample.detach().sum()), n_segments)
        buf.add_ratio("loss/total", float(self._weighted(losses).detach().sum()), n_segments)
        kinds = batch["geometry_kinds"]
        buf.add_sum("stage2/geometry_groups_prefix", int((kinds == PREFIX).sum()))
        buf.add_sum("stage2/geometry_groups_appended", int((kinds == APPENDED).sum()))
        buf.add_sum("stage2/supervised_tokens", int((batch["ce_weights"] > 0).sum()))
        return losses

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sample's total loss ``[S]``: its CE plus the weighted box-mean geometry terms."""
        ab = self.stage2_ab
        return (losses["ce"] + ab.bbox_smoothl1_weight * losses["bbox_smoothl1"]
                + ab.bbox_ciou_weight * losses["bbox_ciou"] + ab.coord_ce_weight * losses["coord_ce"]
                + ab.coord_gate_weight * losses["coord_gate"])

    def _sample_losses(self, model, seqs, soft_context: bool) -> dict[str, torch.Tensor] | None:
        if not seqs:
            return None
        batch = collate(seqs, self.adapter.pad_id, self.prompts.image_token_id)
        return self._forward_losses(model, batch, len(seqs), soft_context)

    def _mean_loss(self, model, losses: dict[str, torch.Tensor] | None, n: int) -> torch.Tensor:
        """The step loss: the sum of the samples' totals over the ``n`` samples of the micro-step (a sample
        whose target failed its invariants trains nothing and counts as 0), the one definition packed or
        not."""
        if losses is None:  # every sample failed its target invariants: keep DDP in step with a zero loss
            self.metric_buffer.add_ratio("loss/total", 0.0, 1)
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return self._weighted(losses).sum() / n

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

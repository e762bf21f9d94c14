"""The memory plan as a table a person reads (the preflight prints it on stderr; docs/runbook.md "Memory plan"
explains each row)."""

from __future__ import annotations

from coordexp.config.schema import TrainConfig, enum_value
from coordexp.planning.memory import GIB, MemoryPlan

__all__ = ["group_table", "plan_table"]


MIB = 1 << 20


def group_table(plan: MemoryPlan) -> list[str]:
    """Per parameter group: total / trainable parameters and the learning rate (or frozen)."""
    lines = [f"  {'group':<8} {'parameters':>16} {'trainable':>16}  learning rate"]
    for group, c in plan.inventory.groups.items():
        rate = "frozen" if c.frozen else f"{c.lr:g}"
        lines.append(f"  {group:<8} {c.total:>16,d} {c.trainable:>16,d}  {rate}")
    return lines


def plan_table(plan: MemoryPlan, cfg: TrainConfig) -> str:
    """The whole plan: groups, per learner rank, per server, the verdict and the fixes."""
    inv, lp, sp, t = plan.inventory, plan.learner, plan.server, cfg.training
    act = lp.activations
    div, unit = (GIB, "GiB") if lp.total >= GIB else (MIB, "MiB")  # MiB for a plan under 1 GiB (tiny models)

    def _gib(n: int) -> str:
        return f"{n / div:9.2f}"

    adapter = enum_value(cfg.model.adapter.kind)
    dtype, precision = enum_value(cfg.model.dtype), enum_value(t.precision)
    shard = f"/{lp.world}" if lp.fsdp else "full"
    lines = [
        f"memory plan: {inv.source} ({inv.model_type}), {inv.total:,d} parameters "
        + (f"(the checkpoint's {inv.base_params:,d} + {inv.adapter_params:,d} the adapter adds: LoRA/DoRA, "
           f"coordinate rows, trained copies of unfrozen groups; {inv.trainable:,d} trainable)"
           if adapter != "none" else f"({inv.trainable:,d} trainable)"),
        *group_table(plan),
        f"  learner: {lp.world} rank(s) = training.nproc_per_node {t.nproc_per_node} x nnodes {t.nnodes}, "
        f"{'FSDP' if lp.fsdp else 'DDP' if lp.world > 1 else 'one process'}; model.dtype {dtype}, "
        f"training.precision {precision}",
        f"  {'per learner rank':<22}{unit:>9}  how",
        f"  {'weights':<22}{_gib(lp.weights)}  {inv.total:,d} params in {dtype} ({shard})",
        f"  {'gradients':<22}{_gib(lp.gradients)}  trainable params"
        f"{' x2 (DDP all-reduce buckets)' if lp.world > 1 and not lp.fsdp else ''} ({shard})",
        f"  {'optimizer state':<22}{_gib(lp.optimizer)}  AdamW exp_avg + exp_avg_sq ({shard})",
        f"  {'master copies':<22}{_gib(lp.master_copies)}  "
        + (f"{precision} autocast copies of {inv.matmul_params:,d} matmul weights" if lp.master_copies
           else "none (compute in the storage dtype, or inside the FSDP units)"),
    ]
    if lp.fsdp:
        lines.append(f"  {'FSDP gathered units':<22}{_gib(lp.fsdp_gathered)}  root unit "
                     f"{inv.root_params:,d} + 2 x largest block {inv.largest_block:,d} params, one block's "
                     "gradient")
    how = (f"{act.tokens:,d} tokens/micro-batch"
           + (f" ({act.image_tokens:,d} image tokens, {act.patches:,d} patches)" if inv.vision else "")
           + f", {act.passes} pass(es), checkpointing {'on' if act.checkpointing else 'off'}")
    lines += [
        f"  {'activations':<22}{_gib(act.total)}  {how}",
        f"  {'':<22}{'':>9}  layers {_gib(act.text_bytes).strip()}, vision {_gib(act.vision_bytes).strip()}, "
        f"logits+loss {_gib(act.head_bytes).strip()} {unit}; {act.layer_bytes_per_token:,d} B/token/layer",
        f"  {'optimizer step temp':<22}{_gib(lp.step_temporary)}  (in step(), instead of activations)",
    ]
    device = (f"{plan.device_bytes / GIB:.1f} GiB ({plan.device_source})" if plan.checked
              else "unknown (no GPU, training.device_memory_gib unset): not checked")
    verdict = "" if not plan.checked else ("  fits" if lp.total <= plan.device_bytes else "  DOES NOT FIT")
    lines.append(f"  {'total per rank':<22}{_gib(lp.total)}  device {device}{verdict}")
    if sp is not None:
        engine = f"tensor_parallel_size {sp.tensor_parallel}" if sp.device == "cuda" else "CPU"
        lines += [
            f"  rollout server(s): {sp.servers} x swift rollout ({engine}, "
            f"vllm.dtype {enum_value(cfg.vllm.dtype)})",
            f"  {'weights per GPU':<22}{_gib(sp.weights_per_gpu)}  {inv.base_params:,d} params",
        ]
        if sp.capacity_tokens is None:
            lines.append(f"  {'KV cache':<22}{'?':>9}  {sp.kv_bytes_per_token:,d} B/token; decoding needs "
                         f"{sp.needed_tokens:,d} tokens; capacity unknown without the device memory")
        else:
            where = (f"gpu_memory_utilization {cfg.vllm.gpu_memory_utilization}" if sp.device == "cuda"
                     else f"vllm.cpu_kvcache_space_gib {cfg.vllm.cpu_kvcache_space_gib}")
            lines.append(f"  {'KV cache':<22}{_gib(max(sp.kv_budget or 0, 0))}  {sp.capacity_tokens:,d} "
                         f"tokens at {where} ({sp.kv_bytes_per_token:,d} B/token); decoding needs "
                         f"{sp.needed_tokens:,d} = decode_batch_size {sp.decode_batch_size} x "
                         f"{sp.per_sequence_tokens:,d}")
    if plan.problems:
        lines.append("  does not fit:")
        lines += [f"    - {p}" for p in plan.problems]
    if plan.fixes:
        together = any(f.startswith("all of the above together") for f in plan.fixes)
        lines.append("  fixes (each alone, then together):" if together else "  fixes:")
        lines += [f"    - {f}" for f in plan.fixes]
    return "\n".join(lines)

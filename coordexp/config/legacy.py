"""Removed and renamed config keys, with migration text. Data, not if-chains.

A raw key path matches an entry when it equals the entry's path or lies below it.
"""

from __future__ import annotations

from collections.abc import Iterable

LEGACY_KEYS: tuple[tuple[str, str], ...] = (
    ("custom.extra.rollout_matching", "move rollout settings to top-level rollout_matching.*"),
    ("custom", "the `custom` section is gone: data keys live under data.*, loss weights under stage2_ab.*, "
               "free-form notes under extra.*"),
    ("stage2_ab.schedule.pattern", "use stage2_ab.schedule.b_ratio (float in [0,1])"),
    ("stage2_ab.bbox_l1_weight", "use stage2_ab.bbox_smoothl1_weight"),
    ("stage2_ab.bbox_giou_weight", "use stage2_ab.bbox_ciou_weight"),
    ("stage2_ab.channel_b.rollouts_per_step", "use training.effective_batch_size"),
    ("stage2_ab.channel_b.rollout_decode_batch_size", "use rollout_matching.decode_batch_size"),
    ("stage2_ab.channel_b.mode", "removed: Channel B is step-budgeted; delete the key"),
    ("stage2_ab.channel_b.async", "use rollout_matching.pipeline (a step's rollouts are fetched while the "
                                  "learner trains on its packs; still on-policy: one optimizer step)"),
    ("rollout_matching.temperature", "use rollout_matching.decoding.temperature"),
    ("rollout_matching.top_p", "use rollout_matching.decoding.top_p"),
    ("rollout_matching.top_k", "use rollout_matching.decoding.top_k"),
    ("rollout_matching.rollout_generate_batch_size", "use rollout_matching.decode_batch_size"),
    ("rollout_matching.rollout_infer_batch_size", "use rollout_matching.decode_batch_size"),
    ("rollout_matching.maskiou_gate", "use rollout_matching.iou_gate (exact box IoU)"),
    ("rollout_matching.vllm", "server settings moved to top-level vllm.* (e.g. vllm.server.base_urls)"),
    ("rollout_matching.rollout_buffer", "removed: delete the key"),
    ("vllm.server.servers", "use vllm.server.base_urls: [http://host:port, ...]"),
    ("vllm.server.base_url", "use vllm.server.base_urls: [http://host:port, ...]"),
    ("global_max_length", "use training.packing_length (pack size) and vllm.max_model_len (server context)"),
    ("training.packing_drop_last", "removed: every segment of a step is trained in that step; delete it"),
    ("training.packing_allow_single_long", "removed: a segment longer than training.packing_length is an "
                                           "error naming the sample; raise training.packing_length"),
    ("training.gradient_accumulation", "use training.effective_batch_size (accumulation is derived)"),
    ("training.per_device_eval_batch_size", "removed: rollout evals decode in micro-batches of "
                                            "rollout_matching.decode_batch_size; delete the key"),
    ("vllm.mode", "removed: select rollout=vllm_server (or rollout=hf); the server mode follows from "
                  "rollout_matching.rollout_backend"),
)


def legacy_problems(paths: Iterable[str]) -> list[str]:
    """One message per legacy subtree; the most specific entry wins (custom.extra.rollout_matching over
    custom)."""
    paths = list(paths)
    hit = [legacy for legacy, _ in LEGACY_KEYS
           if any(p == legacy or p.startswith(legacy + ".") for p in paths)]
    specific = [h for h in hit if not any(o != h and o.startswith(h + ".") for o in hit)]
    return [f"{legacy}: legacy key: {advice}" for legacy, advice in LEGACY_KEYS if legacy in specific]

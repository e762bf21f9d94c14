"""Activation memory of one training micro-batch: the bytes autograd keeps from the forward to the backward.

Method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (section 4.1)
count, per transformer layer, every tensor the backward needs, per token. Their total (``34 s b h`` bytes
for a GPT layer in 16-bit, plus ``5 a s^2 b`` for materialized attention scores) assumes a LayerNorm / GELU /
dropout GPT; the terms below redo the same count for the Qwen decoder layer as transformers 5.19 runs it
(RMSNorm computed in float32, SwiGLU MLP, grouped-query attention, no dropout) with a fused attention kernel
(SDPA flash / FlashAttention: no ``s^2`` term; eager attention would add it). Per token of one layer, with
``h`` hidden, ``q = heads x head_dim``, ``kv = kv_heads x head_dim``, ``I`` intermediate, ``s`` the bytes of
the residual stream (the weights' dtype, float32 under autocast of float32 weights), ``a`` the bytes of
the matmul inputs (the autocast dtype, else ``s``), ``c`` the autocast dtype's bytes:

* each RMSNorm: its float32 input and normalized value (``8h``), the normalized value cast back when the
  stream is not float32 (``s h``), and its output as the next matmuls save it: once (``s h``), or under
  autocast with a cast, one copy per consuming linear (``3 c h`` before q/k/v, ``2 c h`` before gate/up);
  plus the float32 ``rsqrt`` (4 bytes);
* attention: the rotated q and k, v (saved by SDPA) and its output, which the output projection reuses
  (``(2q + 2kv) a``), plus the float32 log-sum-exp per head (``4 x heads``);
* SwiGLU MLP: gate output, its SiLU, up output, their product (``4 I a``); a two-layer GELU MLP (the Qwen2-VL
  and Qwen3-VL vision towers): ``2 I a``.

Measured on CPU (tests/unit/test_planning.py): the bytes of the tensors autograd saves inside a decoder
layer of a Qwen2 model (``torch.autograd.graph.saved_tensors_hooks``) equal this count exactly, in float32
and under bfloat16 autocast. Outside the layers: the rotary cos/sin (``2 head_dim s``, shared by all
layers), the final norm, and the loss head: the logits (``V a``), their float32 copy (when ``a != 4``), the
selected rows and their log-softmax (``8 V``) (coordexp.trainer.losses.token_ce_per_segment), per token that
gets logits: the learner computes them only at positions that predict a supervised token
(coordexp.trainer.kept_logits), so never at an image placeholder; the count takes every other token (the
prompt's text share is unknown here, so an upper bound). The vision
tower's blocks use the same count with their width and a fused qkv projection (``qkv`` output kept as the
storage of v: ``3w``; rotated q, k; output and projection input: ``7 w a``): an estimate, within 10% of
the bytes saved in a Qwen2.5-VL vision tower (measured -1.2% in float32, +6.1% under bf16 autocast; the
Qwen2-VL / Qwen3-VL LayerNorm + GELU blocks are not measured).

Activation checkpointing (non-reentrant, one checkpoint per decoder layer / vision block, as transformers'
``gradient_checkpointing_enable`` and FSDP's ``activation_checkpointing`` place them) keeps only each
layer's input (``s h`` per token per layer) and recomputes one layer at a time in the backward, so the
total becomes ``layers x s h + one layer's full count`` (Korthikanti et al.'s "full recomputation").
Soft self-context (``stage2_ab.n_softctx_iter``) keeps the graphs of its passes alive together: all of
them with ``softctx_grad_mode: unroll``, the first and the last with ``em_detach``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ActivationEstimate", "layer_bytes_per_token", "norm_bytes_per_token",
           "vision_block_bytes_per_token"]

FP32 = 4


def norm_bytes_per_token(h: int, s: int, c: int | None, consumers: int) -> int:
    """Bytes one transformers RMSNorm (``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)``) and the
    casts of its output for ``consumers`` linear layers keep per token. ``s``: stream bytes, ``c``: autocast
    bytes or None."""
    out = consumers * c * h if (c is not None and c != s) else s * h
    return 8 * h + (s * h if s != FP32 else 0) + out + FP32


def layer_bytes_per_token(h: int, q: int, kv: int, intermediate: int, heads: int, s: int,
                          c: int | None) -> int:
    """Bytes one Qwen decoder layer keeps for the backward, per token (see the module docstring)."""
    a = c if c is not None else s
    return (norm_bytes_per_token(h, s, c, 3) + (2 * q + 2 * kv) * a + FP32 * heads
            + norm_bytes_per_token(h, s, c, 2) + 4 * intermediate * a)


def vision_block_bytes_per_token(w: int, intermediate: int, heads: int, gated: bool, s: int,
                                 c: int | None) -> int:
    """Bytes one vision block keeps per patch (an estimate: fused qkv, SwiGLU or GELU MLP)."""
    a = c if c is not None else s
    mlp = (4 if gated else 2) * intermediate * a
    return (norm_bytes_per_token(w, s, c, 1) + 7 * w * a + FP32 * heads
            + norm_bytes_per_token(w, s, c, 2 if gated else 1) + mlp)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of the largest micro-batch the config allows, and how they were counted."""

    tokens: int            # language-model tokens per micro-batch (image tokens included)
    image_tokens: int      # of those, image placeholders
    patches: int           # vision-tower tokens (image_tokens x merge^2)
    passes: int            # forward passes whose graphs are alive together
    checkpointing: bool
    layer_bytes_per_token: int   # one decoder layer, without checkpointing
    vision_bytes_per_patch: int  # one vision block, without checkpointing
    text_bytes: int        # decoder layers (+ rotary tables, final norm), all passes
    vision_bytes: int      # vision blocks, all passes
    head_bytes: int        # logits and the loss
    total: int

"""Channel-A soft self-context: N teacher-forced forwards in which every assistant coordinate slot is fed the
model's own expected coordinate embedding from the previous pass.

Iteration 0 is the plain teacher-forced forward (the model embeds ``input_ids`` itself). Iteration m >= 1
rebuilds the base embeddings and replaces the embedding at every coordinate slot p, all slots in parallel, by

    softmax(z_{m-1}[p - 1, coord_ids] / tau) @ E[coord_ids]

(z: logits, tau: ``stage2_ab.softctx_temperature``). Every other position (text, image placeholders, whose
embeddings the vision tower fills in inside the model's forward) keeps iteration 0's input. No KV cache.
CE comes from iteration 0's logits, geometry from the last iteration's (the caller picks them).

Gradient modes (``stage2_ab.softctx_grad_mode``):

* ``unroll``: gradients flow through every iteration (the expected embeddings keep their graph).
* ``em_detach``: the expected embeddings are detached; iteration 0 keeps its graph (the CE anchor trains
  through it), iterations 1..N-2 run without grad, and the last iteration carries the geometry gradient.
  The original trainer ran every iteration but the last without grad here, which left CE without any
  gradient for N > 1; coordexp keeps the CE anchor trainable.

Under DDP only the last forward goes through the DDP wrapper (one wrapper forward per backward, as DDP's
reducer expects); earlier iterations call the wrapped module directly. Their parameters are the same
tensors, so their gradients reach the same buckets in the one backward.

Under FSDP2 (``training.fsdp``) the embedding is a sharded unit of its own (accelerate carves it out, with
the tied head), so two rules keep every pass correct: iteration 0 feeds ``input_ids`` (the model looks up
``E[input_ids]`` itself, the same values), so the first module FSDP runs is the root - calling the embedding
first makes FSDP2 take it for the root and fail ("FSDP requires a single root module"); and the coordinate
rows ``E[coord_ids]`` come from the embedding's forward, never from its ``weight``, which is a sharded
DTensor outside a forward (and, under peft, the wrapper's forward adds the trainable coordinate rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from coordexp.trainer.kept_logits import forward_logits, predicting_logits

__all__ = ["coord_slot_mask", "soft_context_embeds", "soft_self_context"]


def coord_slot_mask(shape: tuple[int, int], slots: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean ``[B, T]`` mask of the coordinate slots given as ``(row, position)`` pairs ``[N, 4, 2]``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if slots.numel():
        flat = slots.reshape(-1, 2).to(device)
        mask[flat[:, 0], flat[:, 1]] = True
    return mask


def soft_context_embeds(base: torch.Tensor, prev_logits: torch.Tensor, slot_mask: torch.Tensor,
                        coord_ids: torch.Tensor, coord_embeds: torch.Tensor,
                        temperature: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The next iteration's ``inputs_embeds [B, T, H]``: ``base`` with every slot p (``slot_mask [B, T]``)
    replaced by ``softmax(prev_logits[p - 1, coord_ids] / temperature) @ coord_embeds``.

    ``prev_logits [B, T, V]``, or ``[B, K, V]`` at ``positions [K]`` (coordexp.trainer.kept_logits; they must
    include every slot's p - 1); ``coord_embeds [K_coord, H]`` are the embedding rows of ``coord_ids``.
    Position 0 is never a slot (a slot is predicted from the position before it). The softmax and the
    expectation are float32 with autocast off (``training.precision`` bf16/fp16 cannot lower them); the mix
    is then cast to ``base``'s dtype."""
    slot_mask = slot_mask.clone()
    slot_mask[:, 0] = False
    rows, slots = slot_mask.nonzero(as_tuple=True)
    with torch.autocast(device_type=base.device.type, enabled=False):
        prev = predicting_logits(prev_logits, rows, slots, positions)      # [M, V]
        probs = torch.softmax(prev.index_select(-1, coord_ids).float() / temperature, dim=-1)
        mix = (probs @ coord_embeds.float()).to(base.dtype)                # [M, H]
    return base.index_put((rows, slots), mix)


def soft_self_context(forward: Callable[..., Any], inner_forward: Callable[..., Any], embed: torch.nn.Module,
                      input_ids: torch.Tensor, slot_mask: torch.Tensor, coord_ids: torch.Tensor, *,
                      n_iter: int, temperature: float, grad_mode: str,
                      keep: tuple[torch.Tensor, torch.Tensor] | None = None, keeps_logits: bool = False,
                      **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(iteration-0 logits, last-iteration logits) of ``n_iter >= 2`` passes: ``[B, T, V]`` each, or with
    ``keep = (positions, slot_positions)`` (coordexp.trainer.kept_logits.supervised_positions) iteration 0's
    at ``positions`` (CE and the next pass's expectations) and every later one's at ``slot_positions`` only.

    ``forward``: the (possibly DDP-wrapped) model, used for the last pass; ``inner_forward``: the module
    itself, for the earlier passes; ``embed``: its input embedding layer; ``keeps_logits``: the model takes
    ``logits_to_keep``. ``model_kwargs`` (attention mask, position ids, vision inputs) go to every pass
    unchanged."""
    if n_iter < 2:
        raise ValueError(f"soft self-context needs n_iter >= 2, got {n_iter}")
    if grad_mode not in ("unroll", "em_detach"):
        raise ValueError(f"softctx_grad_mode must be unroll or em_detach, got {grad_mode!r}")
    detach = grad_mode == "em_detach"
    first_at, later_at = keep if keep is not None else (None, None)

    first = forward_logits(inner_forward, first_at, keeps_logits, input_ids=input_ids, use_cache=False,
                           **model_kwargs)
    logits, at = first, first_at
    for m in range(1, n_iter):
        last = m == n_iter - 1
        prev = logits.detach() if detach else logits
        with contextlib.nullcontext() if (last or not detach) else torch.no_grad():
            coord_embeds = embed(coord_ids)
            if detach:
                coord_embeds = coord_embeds.detach()
            base = embed(input_ids)
            embeds = soft_context_embeds(base, prev, slot_mask, coord_ids, coord_embeds, temperature, at)
            run = forward if last else inner_forward
            logits = forward_logits(run, later_at, keeps_logits, inputs_embeds=embeds, use_cache=False,
                                    **model_kwargs)
            at = later_at
    return first, logits

"""Checkpoint on preemption: a SIGTERM (what Slurm sends before it kills a preempted job) makes the learner
finish the optimizer step it is in, save a checkpoint and stop, so a requeued job resumed with
``training.resume_from_checkpoint=latest`` loses less than one step. ``training.checkpoint_on_sigterm``
(default true) turns it off; it needs a save strategy (``training.save_strategy: steps``).

The signal only records a request: the orchestrator's handler does it for the in-process learner, and
:func:`install_rank_handler` for a torchrun rank. :class:`PreemptionCallback` reads the request at the end of
every optimizer step; under DDP the ranks agree through one all-reduce (max) so that they save the same step
together. Bounded: if the step does not end within the signal grace, the process watchdog
(:mod:`coordexp.launch.process`) ends the process without a checkpoint.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

__all__ = ["PreemptionCallback", "active", "deactivate", "install_rank_handler", "request",
           "requested"]

_REQUESTS: list[int] = []
_ACTIVE: list[bool] = [False]


def active() -> bool:
    """True while a learner with the preemption checkpoint on is in its training loop (steps end, a
    checkpoint can be saved); a signal outside that window ends the process at once instead."""
    return _ACTIVE[0]


def request(signum: int) -> None:
    """Ask the running learner to checkpoint and stop at the end of its step (signal-handler safe)."""
    _REQUESTS.append(int(signum))


def requested() -> int | None:
    """The first signal that asked for a stop, or None."""
    return _REQUESTS[0] if _REQUESTS else None


def deactivate() -> None:
    """The training loop is over (also when it raised): a signal now ends the process at once."""
    _ACTIVE[0] = False


def install_rank_handler() -> None:
    """In a torchrun rank: SIGTERM records a request instead of killing the rank mid-step (torchrun and the
    orchestrator both signal the ranks: repeats only add to the record; the orchestrator's KILL after its
    grace still ends a rank that does not finish)."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: request(signum))


class PreemptionCallback(TrainerCallback):
    """Turns a recorded request into ``should_save`` + ``should_training_stop`` at the end of a step.
    ``install_rank_handler``: this process is a torchrun rank and takes SIGTERM itself from the first step."""

    def __init__(self, install_rank_handler: bool = False) -> None:
        self.install_rank_handler = install_rank_handler
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        _REQUESTS.clear()
        if self.install_rank_handler:
            install_rank_handler()
        _ACTIVE[0] = True

    def on_train_end(self, args, state, control, **kwargs):
        deactivate()

    def on_step_end(self, args, state, control, **kwargs):
        flag = 1 if _REQUESTS else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if flag:
            self.stopped_at = state.global_step
            control.should_save = args.save_strategy != "no"
            control.should_evaluate = False
            control.should_training_stop = True
        return control

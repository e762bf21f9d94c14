"""How long a CPU server's vLLM worker busy-waits for its next command.

vLLM's multiprocess executor hands each command to its worker through a shared-memory queue whose reader
spins (``sched_yield``) for ``busy_loop_s`` = 1 s after every message before it sleeps on a socket
(``vllm.distributed.device_communicators.shm_broadcast.SpinCondition``; vLLM has no setting for it). A
rollout server next to the learner gets a request every fraction of a second, so its worker never sleeps
and holds a core the learner's forward needs: measured on 2 cores, the learner's Channel-B forward took
1.8x as long as with ``rollout=hf`` (docs/benchmarks.md). Within a generation the worker's commands come
milliseconds apart, so :data:`IDLE_AFTER_S` keeps it spinning there and lets it sleep as soon as a request
is done. 20 ms, not less: at 5 ms the worker also slept within generations and the tiny model's rollouts
were 9 % slower; at 1 ms generations stalled for seconds.

:func:`apply` runs in each vLLM worker process of a CPU server (from the worker extension,
:mod:`coordexp.rollout.server.worker`); GPU servers keep vLLM's own behaviour.
"""

from __future__ import annotations

import logging
import os

from coordexp.protocol import ENV_SERVER_DEVICE

__all__ = ["IDLE_AFTER_S", "apply"]

#: seconds a worker keeps spinning after a command before it sleeps until the next one
IDLE_AFTER_S = 0.02

logger = logging.getLogger("coordexp.rollout.server.idle_wait")


def apply(environ: dict[str, str] | None = None) -> bool:
    """Shorten the reader busy-wait of every shared-memory queue of this process to :data:`IDLE_AFTER_S`
    when the server runs on CPU (``COORDEXP_SERVER_DEVICE=cpu`` in ``environ``, default ``os.environ``).
    Returns whether it is in effect; a vLLM without the queue class logs a warning and changes nothing."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SERVER_DEVICE) != "cpu":
        return False
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError as err:
        logger.warning("coordexp: the vLLM worker will busy-wait between requests (%s); the learner's "
                       "forwards next to this CPU server run slower", err)
        return False
    if getattr(SpinCondition, "_coordexp_idle_after_s", None) is not None:
        return True
    wait = SpinCondition.wait

    def short_wait(self, timeout_ms: int | None = None) -> None:
        if self.is_reader and self.busy_loop_s > IDLE_AFTER_S:
            self.busy_loop_s = IDLE_AFTER_S
        return wait(self, timeout_ms)

    SpinCondition.wait = short_wait
    SpinCondition._coordexp_idle_after_s = IDLE_AFTER_S
    print(f"coordexp: vLLM worker idle wait {IDLE_AFTER_S * 1000:g} ms (pid {os.getpid()})", flush=True)
    return True

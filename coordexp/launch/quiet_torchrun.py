"""``torchrun`` for the learner, without the launcher's own traceback when a rank fails.

``python -m coordexp.launch.quiet_torchrun <torchrun arguments>`` runs ``torch.distributed.run`` unchanged.
When a rank exits non-zero, torchrun raises ``ChildFailedError`` and Python prints the launcher's traceback
under the rank's own message (for a user error such as a bad model path, the rank has already said what is
wrong and how to fix it). Here the failure becomes one line naming the first failed rank, and the process
exits with that rank's exit code (2 for a coordexp error, as the in-process learner) instead of 1; the
elastic agent's own ``failed (exitcode: N) local_rank ...`` log line, which that line replaces, is dropped. A
SIGTERM or SIGINT torchrun receives (the orchestrator stopping the group: preemption, Ctrl-C) raises
``SignalException`` once torchrun has stopped the ranks; it exits 128 + the signal number, quietly too.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


class _DropRankFailureLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode:")


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropRankFailureLine())
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"coordexp: learner rank {rank} exited with code {failure.exitcode} (its message is above)",
              file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:
        print(f"coordexp: torchrun got {err.sigval.name}: the learner ranks are stopped", file=sys.stderr,
              flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

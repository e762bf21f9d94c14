"""One error hierarchy for problems a user can fix, with the exit code each one ends a command with.

Every entry point (train, eval, preflight, the server CLI, a learner rank) prints such an error as one
``error: <message>`` screen without a traceback and exits with its ``code``. Anything else that escapes is a
bug and keeps its traceback. Stdlib only: every layer may import this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

#: Bad config, bad data, unusable checkpoint, a learner-side failure (server failure mid-training included).
EXIT_USER_ERROR = 2
#: The rollout server could not be started or probed, or died while the orchestrator watched it.
EXIT_SERVER_ERROR = 3

DOCS_HINT = "Config reference: docs/config.md"
T = TypeVar("T")


class CoordexpError(Exception):
    """A problem the user can fix. ``code`` is the process exit code it ends a command with."""

    code: int = EXIT_USER_ERROR

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(CoordexpError, ValueError):
    """A config is invalid; ``problems`` holds one line per finding (dotted path first)."""

    def __init__(self, problems: Sequence[str], title: str = "Invalid coordexp config"):
        self.problems = list(problems)
        self.title = title
        n = len(self.problems)
        lines = [f"{title} ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(DOCS_HINT)
        super().__init__("\n".join(lines))


class LearnerError(CoordexpError):
    """A learner-side problem: missing model, bad data, unusable checkpoint, a failed rollout or sync."""


class LaunchError(CoordexpError):
    """Something the orchestrator checks before starting processes."""


class ServerStartError(CoordexpError):
    """The rollout server could not be started, did not become healthy, or failed its probe."""

    code = EXIT_SERVER_ERROR


class EvalError(CoordexpError):
    """A problem of ``coordexp.eval`` (exit 2, or 3 when its rollout server could not be started)."""


def run_reporting(fn: Callable[[], T]) -> T | int:
    """``fn()``, or for a :class:`CoordexpError` / ``OSError`` (a folder that is not writable, a full disk)
    the exit code after one ``error:`` line: the error handling of the data and model CLIs."""
    try:
        return fn()
    except CoordexpError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.code
    except OSError as err:
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Print a :class:`CoordexpError` as one screen of text and exit with its code (the traceback only with
    ``HYDRA_FULL_ERROR=1``)."""
    try:
        yield
    except CoordexpError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(err.code)


class DiskFullError(CoordexpError):
    """The disk filled up while coordexp wrote run data, a checkpoint or a weight-sync file (exit 2)."""


def is_disk_full(err: BaseException, where: object = None) -> bool:
    """An error that says the disk (or the quota) is full, whichever library raised it: OSError ENOSPC/EDQUOT,
    a wrapper that keeps the OS message, or an I/O error of a writer that keeps neither (torch's stream
    writer: "iostream error", "unexpected pos") while the filesystem of ``where`` has (almost) no room
    left."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    if where is None or not isinstance(err, (OSError, RuntimeError)):
        return False
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return False
    return usage.free < min(1 << 20, usage.total // 20)


@contextlib.contextmanager
def disk_full_is_an_error(what: str, where: object) -> Iterator[None]:
    """Within the block, a full disk raises :class:`DiskFullError` naming ``what`` was written ``where``."""
    try:
        yield
    except Exception as err:
        if isinstance(err, CoordexpError) or not is_disk_full(err, where):
            raise
        raise DiskFullError(f"no space left on the disk while writing {what} under {where} "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}): free space there, or "
                            f"point training.output_dir at a disk with room") from None


_THREAD_HOOK = [False]


def report_disk_full_in_threads() -> None:
    """A background thread (TensorBoard's event writer) that hits a full disk prints one line instead of a
    traceback; the main thread's own write then ends the command with :class:`DiskFullError`."""
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and is_disk_full(args.exc_value):
            name = args.thread.name if args.thread is not None else "a thread"
            print(f"warning: {name} could not write: {args.exc_value}", file=sys.stderr, flush=True)
            return
        default(args)

    if not _THREAD_HOOK[0]:
        _THREAD_HOOK[0] = True
        threading.excepthook = hook

"""Pipelined rollouts within one optimizer step: a producer thread fetches the step's rollouts chunk by chunk
(``rollout_matching.decode_batch_size`` per call) and turns each chunk into Channel-B segments, while the
learner trains on packs in the main thread.

Every chunk is fetched after the step's weight sync and before the step's one optimizer update, so every
rollout still comes from the same weights: the result is the serial step's, overlapped. The hand-off queue
holds one chunk, so the producer runs at most one chunk ahead. An exception in the producer (server death,
timeout, prompt mismatch) is raised in the main thread as itself; a producer that dies without a word is an
error too, and the main thread never waits on a dead producer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from coordexp.errors import LearnerError

__all__ = ["ChunkProducer"]

_DONE = object()


class ChunkProducer:
    """Iterate ``fetch(start, stop)`` over ``[0, n)`` in chunks of ``chunk``, computed on a daemon thread one
    chunk ahead of the consumer. ``seconds`` sums the time spent inside ``fetch``; ``waited`` the time the
    consumer blocked waiting for a chunk (0 when the producer keeps up)."""

    def __init__(self, fetch: Callable[[int, int], Any], n: int, chunk: int, poll_s: float = 0.5):
        self.fetch, self.n, self.chunk, self.poll_s = fetch, int(n), max(1, int(chunk)), poll_s
        self.seconds = 0.0
        self.waited = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordexp-rollout-producer", daemon=True)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self.poll_s)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for start in range(0, self.n, self.chunk):
                t0 = time.perf_counter()
                result = self.fetch(start, min(self.n, start + self.chunk))
                self.seconds += time.perf_counter() - t0
                if not self._put(("ok", result)):
                    return
            self._put(("ok", _DONE))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(("error", exc))

    def __iter__(self) -> Iterator[Any]:
        self._thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                while True:
                    try:
                        kind, item = self._queue.get(timeout=self.poll_s)
                        break
                    except queue.Empty:
                        if not self._thread.is_alive() and self._queue.empty():
                            raise LearnerError("the rollout producer thread ended without a result") from None
                self.waited += time.perf_counter() - t0
                if kind == "error":
                    raise item
                if item is _DONE:
                    return
                yield item
        finally:
            self._stop.set()

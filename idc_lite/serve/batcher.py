"""Micro-batching: pairs from concurrent requests described together, in one model call.

Ray Serve's ``@serve.batch`` in miniature, on the server's event loop. A request submits its pairs
and awaits them; one worker task takes the oldest pending pair, waits at most ``max_wait_s`` after
its arrival for others with the same generation settings, and hands up to ``max_batch`` of them to
the model in one call on a thread of its own, so the event loop keeps accepting requests meanwhile.
While the model is busy, pairs gather, and the next batch leaves at once: batches grow with the load
and a lone request waits ``max_wait_s`` at most.

Pairs with different generation settings are never mixed (a batch has one setting), which is what
keeps a caption the same whether its request was batched or not (:class:`idc_lite.Captioner`
guarantees it for one setting). The queue is bounded: a submission that does not fit raises
:class:`QueueFull` (the server's 503 with ``Retry-After``); a request whose pairs are not done
within ``timeout_s`` raises :class:`WaitTimeout` (504), and its pairs not yet started are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

logger = logging.getLogger("idc_lite.serve")


class QueueFull(Exception):
    """The queue has no room for a request's pairs; ``retry_after_s`` estimates when it will."""

    def __init__(self, pending: int, capacity: int, retry_after_s: int):
        self.pending, self.capacity, self.retry_after_s = pending, capacity, retry_after_s
        super().__init__(f"{pending} pairs are waiting, the queue holds {capacity}")


class WaitTimeout(Exception):
    """A request's pairs were not described within the time it may wait."""


@dataclass
class _Job:
    item: Any
    key: Hashable
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Describe submitted items in batches of at most ``max_batch`` sharing one ``key``.

    ``run_batch(items, key)`` is called on the model thread and returns one result per item, in
    order. Start with :meth:`start` on the running loop and end with :meth:`stop`.
    """

    def __init__(
        self, run_batch: Callable[[list, Hashable], Sequence], *, max_batch: int = 8, max_wait_s: float = 0.010,
        max_queue: int = 64, timeout_s: float = 60.0,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or timeout_s <= 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_s at least 0, timeout_s above 0")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue, self.timeout_s = max_batch, max_wait_s, max_queue, timeout_s
        self._pending: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idc-lite-model")
        self._worker: asyncio.Task | None = None
        #: Seconds the last batches took per pair (for ``Retry-After``), and counters for /v1/info.
        self._seconds_per_pair = 0.05
        self.batches = 0
        self.pairs = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="idc-lite-batcher")

    async def stop(self) -> None:
        """Stop the worker; pairs still pending fail with :class:`QueueFull` (the server is going away)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(QueueFull(0, self.max_queue, 1))
        self._executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return sum(1 for job in self._pending if not job.future.done())

    # ------------------------------------------------------------------ submitting
    async def submit(self, items: Sequence, key: Hashable) -> list:
        """Queue ``items`` (all or none) and return their results in order, once all are done."""
        if self._worker is None or self._worker.done():
            raise QueueFull(len(self._pending), self.max_queue, 1)
        self._drop_cancelled()  # pairs whose requests timed out or went away hold no place
        if len(self._pending) + len(items) > self.max_queue:
            raise QueueFull(len(self._pending), self.max_queue, self.retry_after_s(len(items)))
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, key, loop.create_future()) for item in items]
        self._pending.extend(jobs)
        self._arrived.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), self.timeout_s))
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            # Timed out, or the client went away: pairs not started are dropped (the worker skips
            # cancelled jobs); a batch already running finishes and its result is discarded.
            for job in jobs:
                job.future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise WaitTimeout(f"not described within {self.timeout_s:g} s") from None
            raise

    def retry_after_s(self, extra: int = 0) -> int:
        """Whole seconds until the queue has likely drained enough for ``extra`` more pairs."""
        return max(1, math.ceil((len(self._pending) + extra) * self._seconds_per_pair))

    # ------------------------------------------------------------------ the worker
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.monotonic()
            try:
                items = [job.item for job in batch]
                results = await loop.run_in_executor(self._executor, self.run_batch, items, batch[0].key)
            except Exception as exc:  # run_batch records per-pair errors itself; this is a bug or a dead model
                logger.exception("a batch of %d pairs failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self._seconds_per_pair = 0.8 * self._seconds_per_pair + 0.2 * elapsed / len(batch)
            self.batches += 1
            self.pairs += len(batch)
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)

    async def _next_batch(self) -> list[_Job]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        self._drop_cancelled()
        if not self._pending:
            return []
        first = self._pending[0]
        deadline = first.enqueued + self.max_wait_s
        while self._matching(first.key) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
        self._drop_cancelled()
        batch, rest = [], deque()
        while self._pending:
            job = self._pending.popleft()
            if job.key == first.key and len(batch) < self.max_batch:
                batch.append(job)
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _matching(self, key: Hashable) -> int:
        return sum(1 for job in self._pending if job.key == key)

    def _drop_cancelled(self) -> None:
        if any(job.future.done() for job in self._pending):
            self._pending = deque(job for job in self._pending if not job.future.done())

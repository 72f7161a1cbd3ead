"""Gather concurrent requests into batches: up to `max_batch_size`, waiting at most `max_wait_ms`.

One worker task takes the first queued request, then keeps taking more until the batch is full or
the first one has waited `max_wait_ms`, and runs the batch in a worker thread (the event loop keeps
accepting requests and answering /health meanwhile). Requests whose client went away before their
batch started are dropped; a batch that fails fails only its own requests.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class ServeStats:
    """Counters for /metrics: requests by outcome, batch sizes, and latency of recent requests."""

    def __init__(self, window: int = 10_000) -> None:
        self.requests = collections.Counter()  # outcome ("ok", "rejected", "failed", "cancelled") -> count
        self.batch_sizes = collections.Counter()  # size -> batches of that size
        self.latencies_s: collections.deque[float] = collections.deque(maxlen=window)
        self.started = time.time()

    def snapshot(self, queue_depth: int) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        batches = sum(self.batch_sizes.values())

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None

        return {
            "requests": dict(self.requests),
            "batches": batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": sum(k * v for k, v in self.batch_sizes.items()) / batches if batches else None,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "count": len(lat)},
            "queue_depth": queue_depth,
            "uptime_s": time.time() - self.started,
        }


class Batcher:
    """Call `submit(item)` from request handlers; `run_batch(items) -> answers` runs one batch."""

    def __init__(
        self, run_batch: Callable[[list[Any]], list[Any]], max_batch_size: int, max_wait_ms: float
    ) -> None:
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_ms / 1e3
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
        self.stats = ServeStats()
        # One thread: batches run one after another, as on one accelerator.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: Any) -> Any:
        """The answer to `item`, once its batch has run (raises what the batch raised)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [(item, fut) for item, fut in batch if not fut.done()]  # done = the client went away
            self.stats.requests["cancelled"] += len(batch) - len(live)
            if not live:
                continue
            self.stats.batch_sizes[len(live)] += 1
            try:
                answers = await loop.run_in_executor(self.executor, self.run_batch, [i for i, _ in live])
            except Exception as err:  # noqa: BLE001 - the batch's requests get the error, the server lives on
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), answer in zip(live, answers):
                if not fut.done():
                    fut.set_result(answer)

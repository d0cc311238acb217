"""Dynamic batching: concurrent requests are gathered into one forward pass.

The first waiting request opens a batch; it closes when ``max_batch`` requests are in or ``max_wait_ms``
has passed since it opened. The forward pass runs in a worker thread, so the event loop keeps accepting
and decoding requests meanwhile. At most ``max_queue`` requests wait; more are refused (``Overloaded``)
rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import torch

from resnetlab.inference import Prediction, Predictor


class Overloaded(Exception):
    """The queue of requests waiting for the model is full: the caller should retry later (HTTP 503)."""


class DynamicBatcher:
    def __init__(self, predictor: Predictor, *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256) -> None:  # fmt: skip
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.queue: asyncio.Queue[tuple[torch.Tensor, int, asyncio.Future]] = asyncio.Queue(max(1, max_queue))
        self.refused = 0
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, tensor: torch.Tensor, top_k: int) -> Prediction:
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((tensor, top_k, future))
        except asyncio.QueueFull:
            self.refused += 1
            waiting = self.queue.maxsize
            raise Overloaded(f"{waiting} requests are already waiting for the model; retry shortly") from None
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(items) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            items = [item for item in items if not item[2].cancelled()]  # clients that went away
            if not items:
                continue
            batch = torch.stack([tensor for tensor, _, _ in items])
            top_k = max(k for _, k, _ in items)
            try:
                predictions = await asyncio.to_thread(self.predictor.predict_tensors, batch, top_k)
            except Exception as err:  # a failed batch fails its requests, not the server
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batch_sizes[len(items)] += 1
            self.requests += len(items)
            for (_, k, future), prediction in zip(items, predictions):
                if not future.done():
                    future.set_result(Prediction(prediction.labels[:k], prediction.indices[:k],
                                                 prediction.probabilities[:k]))  # fmt: skip

    def stats(self) -> dict[str, Any]:
        batches = sum(self.batch_sizes.values())
        return {"requests": self.requests, "batches": batches,
                "mean_batch_size": self.requests / batches if batches else 0.0,
                "max_batch_size": max(self.batch_sizes, default=0),
                "batch_sizes": dict(sorted(self.batch_sizes.items())), "queued": self.queue.qsize(),
                "refused_queue_full": self.refused}  # fmt: skip

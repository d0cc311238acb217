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
from collections.abc import Callable

import torch

from resnetlab.inference import Prediction, Predictor


class Overloaded(Exception):
    """The queue of requests waiting for the model is full: the caller should retry later (HTTP 503)."""


def _ignore_batch(size: int, seconds: float) -> None:
    pass


def _ignore_refusal() -> None:
    pass


class DynamicBatcher:
    """Gathers queued requests into batches; ``on_batch(size, seconds)`` hears of each forward pass and
    ``on_refused()`` of each request refused because the queue was full (the service's metrics)."""

    def __init__(self, predictor: Predictor, *, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int, float], None] = _ignore_batch,
                 on_refused: Callable[[], None] = _ignore_refusal) -> None:  # fmt: skip
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.queue: asyncio.Queue[tuple[torch.Tensor, int, asyncio.Future]] = asyncio.Queue(max(1, max_queue))
        self.on_batch, self.on_refused = on_batch, on_refused
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
            self.on_refused()
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
            start = time.perf_counter()
            try:
                predictions = await asyncio.to_thread(self.predictor.predict_tensors, batch, top_k)
            except Exception as err:  # a failed batch fails its requests, not the server
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.on_batch(len(items), time.perf_counter() - start)
            for (_, k, future), prediction in zip(items, predictions):
                if not future.done():
                    future.set_result(Prediction(prediction.labels[:k], prediction.indices[:k],
                                                 prediction.probabilities[:k]))  # fmt: skip

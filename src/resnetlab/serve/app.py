"""The HTTP service: ``create_app(predictor)`` returns a FastAPI app.

Endpoints: ``POST /predict`` (an image as the raw body or as a multipart ``file``; ``?top_k=5``),
``GET /health``, ``GET /metadata``, ``GET /metrics``.

Every resource a request can hold is bounded, so abusive or unlucky clients cannot harm the others:

- body size (413, refused by header or while streaming), time between body chunks (408), and total time
  to send the body (408: a client dripping a byte at a time cannot hold a slot for long);
- request headers must arrive within ``header_timeout`` (``serve`` only: the connection is closed);
- ``/predict`` requests in flight, and requests waiting for the model: above the limit, 503 with
  ``Retry-After`` at once, before the body is read;
- decoded pixels per image (413 for more, checked from the header before decoding) and images decoded at
  once (the others wait their turn).

Images that are not images, truncated or decompression bombs get 415/400/413 with a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from resnetlab.data.images import ImageBoundsError
from resnetlab.errors import DataError
from resnetlab.inference import Predictor
from resnetlab.serve.batcher import DynamicBatcher, Overloaded

#: Largest image decoded for a request (width x height): a 48-Mpx phone photo fits; ~150 MB as RGB.
SERVE_MAX_PIXELS = 50_000_000
RETRY_AFTER_S = 1


class RequestGuard:
    """ASGI middleware: body size and time limits, a cap on ``/predict`` requests in flight, and a count of
    the responses sent by status (for ``/metrics``)."""

    def __init__(self, app: Any, *, max_bytes: int, read_timeout: float, body_timeout: float,
                 max_in_flight: int, statuses: Counter[str]) -> None:  # fmt: skip
        self.app, self.max_bytes, self.read_timeout, self.body_timeout = app, max_bytes, read_timeout, body_timeout
        self.max_in_flight, self.statuses = max(1, max_in_flight), statuses
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responded = False

        async def tracking_send(message: dict) -> None:
            nonlocal responded
            if message["type"] == "http.response.start":
                responded = True
                self.statuses[str(message["status"])] += 1
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}"
            await _send_error(tracking_send, 413, message)
            return
        limited = scope["path"] == "/predict"
        if limited and self.in_flight >= self.max_in_flight:
            message = f"the server is busy ({self.in_flight} requests in flight); retry in {RETRY_AFTER_S} s"
            await _send_error(tracking_send, 503, message, retry_after=True)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received, body_done = 0, False

        async def limited_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # after the body, only a disconnect can come: no deadline applies
                return await receive()
            wait = min(self.read_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                if wait < self.read_timeout:
                    raise _ClientError(408, f"the request body took longer than {self.body_timeout:g} s") from None
                raise _ClientError(408, f"no data from the client for {self.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _ClientError(413, f"request body exceeds the limit of {self.max_bytes} bytes")
                body_done = not message.get("more_body", False)
            return message

        self.in_flight += limited
        try:
            await self.app(scope, limited_receive, tracking_send)
        except _ClientError as err:
            if not responded:
                await _send_error(tracking_send, err.status, err.message)
        finally:
            self.in_flight -= limited


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _send_error(send: Any, status: int, message: str, *, retry_after: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    if retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def status_for(error: DataError) -> int:
    if isinstance(error, ImageBoundsError):
        return 400  # an image too thin to resize (aspect ratio), refused from its header
    text = str(error)
    if text.startswith("refusing image"):
        return 413  # declared dimensions too large: a decompression bomb
    if text.startswith("not a readable image"):
        return 415
    return 400


def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = 10 * 2**20,
    read_timeout: float = 10.0,
    body_timeout: float = 60.0,
    max_concurrent: int = 64,
    max_queue: int = 256,
    max_pixels: int = SERVE_MAX_PIXELS,
    decode_workers: int | None = None,
) -> Any:
    """The ASGI app. Worst-case memory is about ``max_concurrent x max_body_bytes`` (bodies held) plus
    ``decode_workers x max_pixels x ~8 bytes`` (images being decoded and resized) plus the model."""
    batcher = DynamicBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    statuses: Counter[str] = Counter()
    workers = decode_workers or max(1, min(4, os.cpu_count() or 1))
    decode_slots = asyncio.Semaphore(workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="resnetlab", description="ResNet image classification", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(_ClientError)
    async def client_error(request: Request, err: _ClientError) -> JSONResponse:
        # raised by RequestGuard's receive() while an endpoint reads the body
        return JSONResponse({"error": err.message}, status_code=err.status, headers={"connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody is listening; counted in /metrics as 499 (nginx's code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.model.name, "classes": len(predictor.labels),
                "device": str(predictor.device)}  # fmt: skip

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return predictor.metadata

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {**batcher.stats(), "in_flight": guard.in_flight, "responses": dict(sorted(statuses.items()))}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return JSONResponse({"error": "multipart upload needs a 'file' field"}, status_code=400)
            data, name = await upload.read(), upload.filename or "upload"
        else:
            data, name = await request.body(), "request body"
        if not data:
            return JSONResponse({"error": "empty body: send an image"}, status_code=400)
        try:
            async with decode_slots:  # bounds the memory of images being decoded at once
                tensor = await asyncio.to_thread(predictor.preprocess, data, name, max_pixels=max_pixels)
        except DataError as err:
            return JSONResponse({"error": str(err)}, status_code=status_for(err))
        try:
            prediction = await batcher.submit(tensor, min(top_k, len(predictor.labels)))
        except Overloaded as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"retry-after": str(RETRY_AFTER_S)})
        return prediction.to_dict()

    guard = RequestGuard(app, max_bytes=max_body_bytes, read_timeout=read_timeout, body_timeout=body_timeout,
                         max_in_flight=max_concurrent, statuses=statuses)  # fmt: skip
    return guard


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived ``seconds``
    after it opened (or after its first byte, between keep-alive requests). uvicorn itself has no such
    limit: a client sending headers a byte at a time would hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._between_requests():
                self._disarm()  # the headers are in: the body has its own limits
            elif self._header_timer is None:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def serve(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = 10.0,
          **options: Any) -> None:  # fmt: skip
    """Run the service with uvicorn until interrupted (``options`` go to ``create_app``)."""
    import uvicorn

    uvicorn.run(create_app(predictor, **options), host=host, port=port, timeout_keep_alive=5, log_level="info",
                http=header_timeout_protocol(header_timeout))  # fmt: skip

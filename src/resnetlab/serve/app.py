"""The HTTP service: ``create_app(predictor)`` returns a FastAPI app.

Endpoints: ``POST /predict`` (an image as the raw body or as a multipart ``file``; ``?top_k=5``),
``GET /health``, ``GET /metadata``, ``GET /metrics``. Bodies over the limit are refused with 413 before
they are read whole; a client that stalls mid-body gets 408; images that are not images, truncated or
decompression bombs get 415/400/413 with a JSON ``{"error": ...}``. None of these affect other requests.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from resnetlab.errors import DataError
from resnetlab.inference import Predictor
from resnetlab.serve.batcher import DynamicBatcher


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by header, or while streaming) and stalled uploads."""

    def __init__(self, app: Any, max_bytes: int, read_timeout: float) -> None:
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}")
            return
        received = 0
        responded = False

        async def limited_receive() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise _ClientError(408, f"no data from the client for {self.read_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _ClientError(413, f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _ClientError as err:
            if not responded:
                await _send_error(send, err.status, err.message)


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def status_for(error: DataError) -> int:
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
) -> Any:
    batcher = DynamicBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="resnetlab", description="ResNet image classification", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(_ClientError)
    async def client_error(request: Request, err: _ClientError) -> JSONResponse:
        # raised by BodyLimit's receive() while an endpoint reads the body
        return JSONResponse({"error": err.message}, status_code=err.status, headers={"connection": "close"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.model.name, "classes": len(predictor.labels),
                "device": str(predictor.device)}  # fmt: skip

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return predictor.metadata

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return batcher.stats()

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
            tensor = await asyncio.to_thread(predictor.preprocess, data, name)
        except DataError as err:
            return JSONResponse({"error": str(err)}, status_code=status_for(err))
        prediction = await batcher.submit(tensor, min(top_k, len(predictor.labels)))
        return prediction.to_dict()

    return BodyLimit(app, max_body_bytes, read_timeout)


def serve(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(predictor, **options), host=host, port=port, timeout_keep_alive=5, log_level="info")

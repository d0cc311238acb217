"""The HTTP service: ``create_app(predictor)`` returns a FastAPI app.

Endpoints: ``POST /predict`` (an image as the raw body or as one multipart ``file``; ``?top_k=5``),
``POST /explain`` (the same input; top-k and a Grad-CAM overlay, as JSON or PNG), ``GET /`` (a web page
over ``/explain``, shipped in ``resnetlab/serve/static``), ``GET /health``, ``GET /metadata``,
``GET /metrics`` (Prometheus text format) and ``GET /stats`` (the same numbers as JSON).

Every resource a request can hold is bounded, so abusive or unlucky clients cannot harm the others:

- request line and headers: 16 KB (431), body size (413, refused by header or while streaming), time
  between body chunks (408), and total time to send the body (408: a client dripping a byte at a time
  cannot hold a slot for long);
- request headers must arrive within ``header_timeout`` (``serve`` only: the connection is closed);
- ``/predict`` and ``/explain`` requests in flight, and requests waiting for the model: above the limit,
  503 with ``Retry-After`` at once, before the body is read;
- ``/explain`` runs one image at a time, outside the batcher (it needs gradients, and its hook on the
  shared model must see no other pass); at most ``max_explain_queue`` wait for it, more get 503;
- decoded pixels per image (413 for more, checked from the header before decoding) and images decoded at
  once (the others wait their turn).

Every error, FastAPI's own 404/405/422 included, is answered as JSON ``{"error": "..."}``: a body that is
no image format gets 415, an image that cannot be decoded (truncated, corrupt) 400, a bomb 413.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from resnetlab.data.images import ImageBoundsError
from resnetlab.errors import DataError, ResNetLabError
from resnetlab.inference import Predictor
from resnetlab.serve.batcher import DynamicBatcher, Overloaded
from resnetlab.serve.metrics import PROMETHEUS_CONTENT_TYPE, ServiceMetrics

#: Largest image decoded for a request (width x height): a 48-Mpx phone photo fits; ~150 MB as RGB.
SERVE_MAX_PIXELS = 50_000_000
#: Largest request line plus headers, in bytes (h11's default, which uvicorn only enforces on headers that
#: arrive in several pieces: the app checks the whole request head too).
MAX_HEADER_BYTES = 16 * 1024
RETRY_AFTER_S = 1
#: Endpoints that take an image: capped in flight, their bodies bounded.
IMAGE_ENDPOINTS = frozenset({"/predict", "/explain"})
#: The web page's files (package data), by the name they are served under: ``/`` and ``/static/NAME``.
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}  # fmt: skip
# "<_io.BytesIO object at 0x7f...>" and the like: Python object reprs say nothing to a client
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def error_body(message: str) -> bytes:
    """The one error shape of the service: ``{"error": message}``, with Python object reprs removed."""
    return json.dumps({"error": _OBJECT_REPR.sub("the upload", message)}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def is_image_format(data: bytes) -> bool:
    """Whether ``data`` starts like a format Pillow reads (its own signature checks): a client that sent
    an image, however broken, gets 400; one that sent something else gets 415."""
    Image.init()
    prefix = data[:16]
    return any(accept is not None and accept(prefix) for _, accept in Image.OPEN.values())


def status_for(error: DataError, data: bytes) -> int:
    """413 for a declared size over the limit (a decompression bomb), 400 for an image that cannot be
    decoded (truncated, corrupt, too thin), 415 for a body in no image format."""
    if isinstance(error, ImageBoundsError):
        return 400  # too thin to resize (aspect ratio), refused from its header
    if str(error).startswith("refusing image"):
        return 413
    return 400 if is_image_format(data) else 415


class RequestGuard:
    """ASGI middleware: request-head, body size and time limits, a cap on ``/predict`` and ``/explain``
    requests in flight, and the status and latency of every response (for ``/metrics``)."""

    def __init__(self, app: Any, *, max_bytes: int, read_timeout: float, body_timeout: float,
                 max_in_flight: int, metrics: ServiceMetrics, endpoints: frozenset[str],
                 max_header_bytes: int = MAX_HEADER_BYTES) -> None:  # fmt: skip
        self.app, self.max_bytes, self.read_timeout, self.body_timeout = app, max_bytes, read_timeout, body_timeout
        self.max_in_flight, self.max_header_bytes = max(1, max_in_flight), max_header_bytes
        self.metrics = metrics
        self.endpoints = endpoints  # latency is labelled by these paths, "other" for any other (bounded labels)
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responded = False
        status, started = 0, time.perf_counter()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def tracking_send(message: dict) -> None:
            nonlocal responded, status
            if message["type"] == "http.response.start":
                responded, status = True, message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.observe_response(status, endpoint, time.perf_counter() - started)

        head = _head_bytes(scope)
        if head > self.max_header_bytes:
            message = f"request line and headers of {head} bytes exceed the limit of {self.max_header_bytes}"
            await _send_error(tracking_send, 431, message)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            message = f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}"
            await _send_error(tracking_send, 413, message)
            return
        limited = scope["path"] in IMAGE_ENDPOINTS
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


def _head_bytes(scope: dict) -> int:
    """Bytes of the request line and headers as sent ("GET /path?query HTTP/1.1", "name: value" lines)."""
    line = len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return line + 12 + sum(len(name) + len(value) + 4 for name, value in scope.get("headers") or [])


class _ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _send_error(send: Any, status: int, message: str, *, retry_after: bool = False) -> None:
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    if retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _validation_message(err: RequestValidationError) -> str:
    """FastAPI's list of validation problems as one line, e.g. "top_k: Input should be greater than ..."."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                     for e in err.errors()) or "invalid request"  # fmt: skip


async def _read_upload(request: Request) -> tuple[bytes, str] | Response:
    """The image of a ``/predict`` or ``/explain`` request and a name for messages; an error response for a multipart
    request that does not carry exactly one file, in a field named ``file``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await request.body(), "request body"
    try:
        form = await request.form(max_files=1)
    except HTTPException as err:  # too many files, or a malformed multipart body
        return error_response(400, f"multipart upload refused: {err.detail} (send one image per request, "
                                   "in a field named 'file')")  # fmt: skip
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        return error_response(400, "multipart upload needs a 'file' field holding the image")
    return await upload.read(), upload.filename or "upload"


#: The page's own files only: no script, style, font or image from elsewhere (it works offline).
PAGE_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff",
                "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'"}  # fmt: skip


def _prefers_png(accept: str) -> bool:
    """Whether an Accept header asks for ``image/png`` rather than JSON (JSON is the default)."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return "image/png" in types and "application/json" not in types


def explanation(predictor: Predictor, tensor: torch.Tensor, top_k: int,
                target: int | None) -> tuple[dict[str, Any], bytes, float]:  # fmt: skip
    """``/explain`` for one preprocessed image: the JSON answer (top-k and the explained class), the Grad-CAM
    overlay as PNG bytes, and the seconds the model took (forward pass and Grad-CAM)."""
    from resnetlab.explain import model_view, overlay

    started = time.perf_counter()
    (result,) = predictor.explain(tensor[None], top_k, target)
    seconds = time.perf_counter() - started
    config = predictor.model.config
    picture = overlay(model_view(tensor, config.mean, config.std)[0], result.cam, label=result.label,
                      probability=result.probability)  # fmt: skip
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    explained = {"label": result.label, "index": result.target, "probability": round(result.probability, 6)}
    return {**result.prediction.to_dict(), "explained": explained, "method": "gradcam"}, buffer.getvalue(), seconds


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
    max_header_bytes: int = MAX_HEADER_BYTES,
    decode_workers: int | None = None,
    max_explain_queue: int = 8,
) -> Any:
    """The ASGI app. Worst-case memory is about ``max_concurrent x max_body_bytes`` (bodies held) plus
    ``decode_workers x max_pixels x ~8 bytes`` (images being decoded and resized) plus the model, plus one
    Grad-CAM pass (``/explain``: activations and gradients of one image)."""
    batcher = DynamicBatcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    metrics = ServiceMetrics(max_batch=max_batch, queue_depth=batcher.queue.qsize, in_flight=lambda: guard.in_flight)
    batcher.on_batch, batcher.on_refused = metrics.observe_batch, metrics.refused.inc
    workers = decode_workers or max(1, min(4, os.cpu_count() or 1))
    decode_slots = asyncio.Semaphore(workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="resnetlab", description="ResNet image classification", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.exception_handler(_ClientError)
    async def client_error(request: Request, err: _ClientError) -> Response:
        # raised by RequestGuard's receive() while an endpoint reads the body
        return error_response(err.status, err.message, headers={"connection": "close"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:  # 404, 405... in our shape
        return error_response(err.status_code, str(err.detail), headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> Response:
        return error_response(422, _validation_message(err))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:  # logged by the server
        return error_response(500, "internal server error: the request could not be answered; see the server log")

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
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return metrics.snapshot()

    async def read_image(request: Request) -> torch.Tensor | Response:
        """The request's image as the model's input tensor, or the error response (/predict and /explain)."""
        upload = await _read_upload(request)
        if isinstance(upload, Response):
            return upload
        data, name = upload
        if not data:
            return error_response(400, "empty body: send an image")
        try:
            async with decode_slots:  # bounds the memory of images being decoded at once
                return await asyncio.to_thread(predictor.preprocess, data, name, max_pixels=max_pixels)
        except DataError as err:
            return error_response(status_for(err, data), str(err))

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> Any:
        tensor = await read_image(request)
        if isinstance(tensor, Response):
            return tensor
        try:
            prediction = await batcher.submit(tensor, min(top_k, len(predictor.labels)))
        except Overloaded as err:
            return error_response(503, str(err), headers={"retry-after": str(RETRY_AFTER_S)})
        return prediction.to_dict()

    explain_slot = asyncio.Semaphore(1)
    explain_waiting = 0

    @app.post("/explain")
    async def explain(request: Request, top_k: int = Query(5, ge=1, le=1000), target: int | None = Query(None, ge=0),
                      format: Literal["json", "png"] | None = Query(None)) -> Any:  # fmt: skip
        nonlocal explain_waiting
        started = time.perf_counter()
        classes = len(predictor.labels)
        if target is not None and target >= classes:
            return error_response(422, f"target: class index {target} does not exist; the model has classes "
                                       f"0..{classes - 1} (GET /metadata lists them)")  # fmt: skip
        tensor = await read_image(request)
        if isinstance(tensor, Response):
            return tensor
        if explain_waiting >= max_explain_queue:
            message = f"{explain_waiting} /explain requests are already waiting; retry in {RETRY_AFTER_S} s"
            return error_response(503, message, headers={"retry-after": str(RETRY_AFTER_S)})
        explain_waiting += 1
        try:
            async with explain_slot:  # one at a time: a Grad-CAM pass holds activations and gradients
                result = await asyncio.to_thread(explanation, predictor, tensor, min(top_k, classes), target)
        except ResNetLabError as err:  # a model without gradients or stages (an export)
            return error_response(501, f"this model cannot be explained: {err}")
        finally:
            explain_waiting -= 1
        answer, png, model_seconds = result
        total_ms, model_ms = (time.perf_counter() - started) * 1000, model_seconds * 1000
        if format == "png" or (format is None and _prefers_png(request.headers.get("accept", ""))):
            timing = f"model;dur={model_ms:.1f}, total;dur={total_ms:.1f}"
            return Response(png, media_type="image/png", headers={"server-timing": timing})
        answer["overlay_png_base64"] = base64.b64encode(png).decode("ascii")
        answer["latency_ms"] = {"model": round(model_ms, 1), "total": round(total_ms, 1)}
        return answer

    page = {name: resources.files("resnetlab.serve").joinpath("static", name).read_bytes() for name in PAGE_FILES}

    def page_file(name: str) -> Response:
        return Response(page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in page:
            raise HTTPException(404, f"no file {name!r}: the page's files are {', '.join(sorted(page))}")
        return page_file(name)

    guard = RequestGuard(app, max_bytes=max_body_bytes, read_timeout=read_timeout, body_timeout=body_timeout,
                         max_in_flight=max_concurrent, max_header_bytes=max_header_bytes, metrics=metrics,
                         endpoints=frozenset(route.path for route in app.routes))  # fmt: skip
    return guard


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived ``seconds``
    after it opened (or after its first byte, between keep-alive requests). uvicorn itself has no such
    limit: a client sending headers a byte at a time would hold its connection forever. Its answer to a
    request h11 cannot parse (or whose headers outgrow h11's buffer) is JSON, like every other error."""
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

        def send_400_response(self, msg: str) -> None:
            import h11

            body = error_body(f"invalid HTTP request (malformed, or request headers over {MAX_HEADER_BYTES} bytes)")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # fmt: skip
            for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return HeaderTimeoutProtocol


def serve(predictor: Predictor, *, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = 10.0,
          **options: Any) -> None:  # fmt: skip
    """Run the service with uvicorn until interrupted (``options`` go to ``create_app``)."""
    import uvicorn

    uvicorn.run(create_app(predictor, **options), host=host, port=port, timeout_keep_alive=5, log_level="info",
                http=header_timeout_protocol(header_timeout),
                h11_max_incomplete_event_size=options.get("max_header_bytes", MAX_HEADER_BYTES))  # fmt: skip

"""resnetlab serve: the API, its errors, and a real server under bounded concurrent load and abuse.

Every request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.inference import Predictor
from resnetlab.serve import create_app
from resnetlab.serve.loadtest import load_test


def png_bytes(size: int = 40, mode: str = "RGB") -> bytes:
    array = (np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = resnetlab.create_model("resnet8", num_classes=3, label_names=("ant", "bee", "wasp"))
    resnetlab.save_pretrained(model, folder)
    return folder


@pytest.fixture
def client(model_dir):
    from fastapi.testclient import TestClient

    app = create_app(Predictor.load(model_dir), max_body_bytes=200_000, read_timeout=2)
    with TestClient(app) as test_client:
        yield test_client


def test_predict_health_metadata(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/metadata").json()["labels"] == ["ant", "bee", "wasp"]
    answer = client.post("/predict?top_k=2", content=png_bytes(), headers={"content-type": "image/png"})
    assert answer.status_code == 200
    top = answer.json()["top"]
    assert len(top) == 2 and {t["label"] for t in top} <= {"ant", "bee", "wasp"}
    assert top[0]["probability"] >= top[1]["probability"]
    upload = client.post("/predict", files={"file": ("x.png", png_bytes(mode="L"), "image/png")})
    assert upload.status_code == 200 and len(upload.json()["top"]) == 3
    assert client.get("/stats").json()["requests"] == 2


def jpeg_bytes(size: int = 200) -> bytes:
    array = (np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb_png() -> bytes:
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # 400 Mpx declared, a few KB on the wire
    return bomb.getvalue()


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """The one error shape: JSON ``{"error": "<one line>"}``, no Python object reprs, the expected status."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    assert "object at 0x" not in body["error"] and "\n" not in body["error"], body
    for word in words:
        assert word in body["error"], (word, body)
    return body["error"]


def test_every_error_has_one_json_shape_and_status(client) -> None:
    """Each way a request can fail answers ``{"error": ...}``: FastAPI's own 404, 405 and 422 included."""
    assert_error(client.post("/predict", content=b""), 400, "empty body")
    assert_error(client.post("/predict", content=b"hello, I am not an image"), 415, "not a readable image")
    assert_error(client.post("/predict", content=b"\0" * 300_000), 413, "exceeds the limit")
    assert_error(client.post("/predict", content=bomb_png()), 413, "refusing image")
    assert_error(client.post("/predict", files={"other": ("x", b"1")}), 400, "'file' field")
    assert_error(client.post("/predict?top_k=0", content=png_bytes()), 422, "top_k")
    assert_error(client.post("/predict?top_k=many", content=png_bytes()), 422, "top_k")
    assert_error(client.get("/no/such/page"), 404, "Not Found")
    assert_error(client.get("/predict"), 405, "Method Not Allowed")
    assert_error(client.get("/health", headers={"x-big": "a" * 20_000}), 431, "16384")
    assert client.get("/health").status_code == 200  # still serving


def test_a_damaged_image_is_400_and_a_non_image_415(client) -> None:
    """A truncated JPEG or PNG is an image the server cannot decode: 400 (the docs' table), not 415.
    415 is kept for bodies in no image format; neither message carries a Python object repr."""
    jpeg = jpeg_bytes()
    for cut in (20, 300, 2_000, len(jpeg) // 2):  # inside the header, and inside the pixel data
        assert_error(client.post("/predict", content=jpeg[:cut]), 400)
    assert_error(client.post("/predict", content=png_bytes(200)[:3000]), 400)
    named = client.post("/predict", files={"file": ("cat.jpg", jpeg[:300], "image/jpeg")})
    assert "cat.jpg" in assert_error(named, 400)
    for not_image in (b"hello", b"%PDF-1.7\n" + bytes(100), b"<html></html>"):
        assert_error(client.post("/predict", content=not_image), 415, "not a readable image")


def test_multipart_with_two_files_is_refused_not_half_answered(client) -> None:
    two = [("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(30), "image/png"))]
    assert_error(client.post("/predict", files=two), 400, "one image per request")
    other = [("file", ("a.png", png_bytes(), "image/png")), ("extra", ("b.png", png_bytes(), "image/png"))]
    assert_error(client.post("/predict", files=other), 400, "one image per request")
    one = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"note": "hi"})
    assert one.status_code == 200  # plain form fields beside the one file are fine


def test_metrics_are_prometheus_text_and_stats_json(client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        assert client.post("/predict", content=png_bytes()).status_code == 200
    assert client.post("/predict", content=b"nope").status_code == 415
    assert client.get("/missing").status_code == 404
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}  # fmt: skip
    assert samples[("resnetlab_http_responses_total", (("status", "200"),))] == 3
    assert samples[("resnetlab_http_responses_total", (("status", "415"),))] == 1
    assert samples[("resnetlab_http_responses_total", (("status", "404"),))] == 1
    assert samples[("resnetlab_http_request_duration_seconds_count", (("endpoint", "/predict"),))] == 4
    assert samples[("resnetlab_http_request_duration_seconds_count", (("endpoint", "other"),))] == 1
    assert samples[("resnetlab_batch_size_count", ())] == 3 and samples[("resnetlab_batch_size_sum", ())] == 3
    assert samples[("resnetlab_forward_seconds_count", ())] == 3
    assert samples[("resnetlab_queue_depth", ())] == 0 and samples[("resnetlab_queue_refused_total", ())] == 0
    assert samples[("resnetlab_requests_in_flight", ())] == 0
    stats = client.get("/stats").json()
    assert stats["requests"] == 3 and stats["batches"] == 3 and stats["batch_sizes"] == {"1": 3}
    assert stats["responses"] == {"200": 4, "404": 1, "415": 1}  # 3 predictions and the /metrics scrape


def test_batch_sizes_are_reported_by_range() -> None:
    from resnetlab.serve.metrics import ServiceMetrics, batch_size_buckets

    assert batch_size_buckets(32) == (1, 2, 4, 8, 16, 32) and batch_size_buckets(12) == (1, 2, 4, 8, 12)
    metrics = ServiceMetrics(max_batch=12, queue_depth=lambda: 5, in_flight=lambda: 2)
    for size in (1, 1, 3, 4, 9, 12):
        metrics.observe_batch(size, 0.01)
    stats = metrics.snapshot()
    assert stats["batch_sizes"] == {"1": 2, "3-4": 2, "9-12": 2} and stats["mean_batch_size"] == 5.0
    assert (stats["queued"], stats["in_flight"]) == (5, 2)


# ---------------------------------------------------------------------------- limits, in process
class Call:
    """One HTTP request straight into the ASGI app, with a body the test controls chunk by chunk."""

    def __init__(self, app, path: str = "/predict", headers: dict | None = None) -> None:
        self.app, self.path = app, path
        self.method = "POST" if path in ("/predict", "/explain") else "GET"
        self.headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()
        self.status: int | None = None
        self.response_headers: dict[bytes, bytes] = {}
        self.body = b""

    def send_body(self, data: bytes, more: bool = False) -> None:
        self.incoming.put_nowait({"type": "http.request", "body": data, "more_body": more})

    def disconnect(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})

    async def run(self) -> Call:
        scope = {"type": "http", "method": self.method, "path": self.path,
                 "raw_path": self.path.encode(), "query_string": b"", "headers": self.headers,
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http", "http_version": "1.1",
                 "asgi": {"version": "3.0"}}  # fmt: skip

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.status, self.response_headers = message["status"], dict(message.get("headers", []))
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        await self.app(scope, self.incoming.get, send)
        return self

    def json(self) -> dict:
        return json.loads(self.body)


@asynccontextmanager
async def running(app):
    """The app with its lifespan (the batcher) started, as a server would run it."""
    messages: asyncio.Queue[dict] = asyncio.Queue()
    replies: asyncio.Queue[dict] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, replies.put))
    await messages.put({"type": "lifespan.startup"})
    assert (await replies.get())["type"] == "lifespan.startup.complete"
    try:
        yield app
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        await replies.get()
        await task


def _app(model_dir, **limits):
    return create_app(Predictor.load(model_dir), max_body_bytes=200_000, read_timeout=1.0, **limits)


def test_body_deadline_cuts_off_a_client_that_keeps_dripping(model_dir) -> None:
    """Each chunk arrives well within the read timeout, but the body as a whole takes too long: 408."""

    async def scenario() -> tuple[Call, float]:
        async with running(_app(model_dir, body_timeout=0.6)) as app:
            call = Call(app, headers={"content-length": "5000"})
            task = asyncio.create_task(call.run())
            start = time.perf_counter()
            while not task.done():
                call.send_body(b"x", more=True)  # a byte every 0.1 s: never stalls for the 1 s read timeout
                await asyncio.sleep(0.1)
            return call, time.perf_counter() - start

    call, elapsed = asyncio.run(scenario())
    assert call.status == 408 and "took longer than 0.6 s" in call.json()["error"]
    assert 0.5 < elapsed < 2.0


def test_requests_in_flight_are_capped_with_503_and_retry_after(model_dir) -> None:
    async def scenario() -> tuple[list[Call], Call, Call, dict]:
        async with running(_app(model_dir, max_concurrent=2)) as app:
            held = [Call(app) for _ in range(2)]
            tasks = [asyncio.create_task(c.run()) for c in held]
            await asyncio.sleep(0.05)  # both are now waiting for their bodies
            refused = await Call(app).run()
            health = await Call(app, "/health").run()  # monitoring is not behind the limit
            for call in held:
                call.send_body(png_bytes())
            await asyncio.gather(*tasks)
            metrics = (await Call(app, "/stats").run()).json()
            return held, refused, health, metrics

    held, refused, health, metrics = asyncio.run(scenario())
    assert refused.status == 503 and refused.response_headers[b"retry-after"] == b"1"
    assert "busy" in refused.json()["error"] and health.status == 200
    assert [c.status for c in held] == [200, 200]
    assert metrics["in_flight"] == 0 and metrics["responses"]["503"] == 1 and metrics["responses"]["200"] == 3


def test_full_model_queue_answers_503(model_dir, monkeypatch) -> None:
    """While the model is busy, at most ``max_queue`` requests wait; the next one is refused at once."""
    predictor = Predictor.load(model_dir)
    release, forward_entered = threading.Event(), threading.Event()
    forward = predictor.predict_tensors

    def slow_forward(*args, **kwargs):
        forward_entered.set()
        release.wait(10)
        return forward(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict_tensors", slow_forward)
    app = create_app(predictor, max_batch=1, max_wait_ms=0, max_queue=1)
    batcher = app.app.state.batcher

    async def until(condition) -> None:
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the server never reached the expected state")

    async def scenario() -> list[Call]:
        async with running(app):
            calls = [Call(app) for _ in range(3)]
            for call in calls:
                call.send_body(png_bytes())
            tasks = [asyncio.create_task(calls[0].run())]
            await until(forward_entered.is_set)  # the first request is in the (stalled) forward pass
            tasks.append(asyncio.create_task(calls[1].run()))
            await until(lambda: batcher.queue.qsize() == 1)  # one in the forward pass, one waiting
            await calls[2].run()  # one too many
            release.set()
            await asyncio.gather(*tasks)
            return calls

    calls = asyncio.run(scenario())
    assert [c.status for c in calls] == [200, 200, 503]
    assert "waiting for the model" in calls[2].json()["error"] and calls[2].response_headers[b"retry-after"] == b"1"


def test_client_disconnecting_mid_body_is_dropped_quietly(model_dir) -> None:
    async def scenario() -> tuple[Call, dict]:
        async with running(_app(model_dir)) as app:
            call = Call(app, headers={"content-length": "5000"})
            call.send_body(b"\x89PNG" + bytes(100), more=True)
            call.disconnect()
            await call.run()  # raises nothing
            after = Call(app)
            after.send_body(png_bytes())
            await after.run()
            return after, (await Call(app, "/stats").run()).json()

    after, metrics = asyncio.run(scenario())
    assert after.status == 200 and metrics["responses"] == {"200": 1, "499": 1} and metrics["in_flight"] == 0


def test_pixel_cap_for_serving_is_configurable(model_dir) -> None:
    async def scenario() -> list[Call]:
        async with running(_app(model_dir, max_pixels=1000)) as app:
            calls = [Call(app), Call(app)]
            calls[0].send_body(png_bytes(40))  # 1,600 pixels
            calls[1].send_body(png_bytes(30))  # 900 pixels
            return [await c.run() for c in calls]

    big, small = asyncio.run(scenario())
    assert big.status == 413 and "exceeds the limit of 1000 pixels" in big.json()["error"]
    assert small.status == 200


# ---------------------------------------------------------------------------- /explain and the page
def test_explain_answers_top_k_and_the_grad_cam_overlay_of_the_top_class(client, model_dir) -> None:
    """The JSON answer: the same top-k as /predict, the explained class, latency, and the overlay, which is
    exactly resnetlab.explain's Grad-CAM of the top class drawn over the image the model saw."""
    from resnetlab.explain import grad_cam, model_view, overlay

    image = png_bytes(60)
    predicted = client.post("/predict?top_k=2", content=image).json()["top"]
    answer = client.post("/explain?top_k=2", files={"file": ("x.png", image, "image/png")})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert [t["label"] for t in body["top"]] == [t["label"] for t in predicted]
    assert np.allclose([t["probability"] for t in body["top"]], [t["probability"] for t in predicted], atol=1e-5)
    assert body["explained"] == body["top"][0] and body["method"] == "gradcam"
    assert 0 < body["latency_ms"]["model"] <= body["latency_ms"]["total"]

    import base64

    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"]))).convert("RGB"))
    predictor = Predictor.load(model_dir)
    tensor = predictor.preprocess(image)
    cam = grad_cam(predictor.model, tensor[None], target=body["explained"]["index"])[0]
    view = model_view(tensor, predictor.model.config.mean, predictor.model.config.std)[0]
    expected = overlay(view, cam, label=body["explained"]["label"], probability=body["explained"]["probability"])
    assert served.shape == np.asarray(expected).shape and min(served.shape[:2]) >= 256
    assert np.abs(served.astype(int) - np.asarray(expected, dtype=int)).max() <= 1
    plain = np.asarray(overlay(view, torch.zeros_like(cam)), dtype=int)  # the photo alone, no heat
    assert np.abs(served[: plain.shape[0]].astype(int) - plain).mean() > 5  # the heat map is drawn


def test_explain_png_format_and_target_class(client) -> None:
    image = png_bytes(50)
    for answer in (client.post("/explain?format=png", content=image),
                   client.post("/explain", content=image, headers={"accept": "image/png"})):  # fmt: skip
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert "model;dur=" in answer.headers["server-timing"]
        assert min(Image.open(io.BytesIO(answer.content)).size) >= 256
    both = client.post("/explain", content=image, headers={"accept": "application/json, image/png"})
    assert both.headers["content-type"] == "application/json"  # JSON unless PNG is asked for alone
    every = {t["index"]: t["probability"] for t in client.post("/predict?top_k=3", content=image).json()["top"]}
    for target in range(3):
        explained = client.post(f"/explain?target={target}", content=image).json()["explained"]
        assert explained["index"] == target and explained["label"] == ["ant", "bee", "wasp"][target]
        assert explained["probability"] == pytest.approx(every[target], abs=1e-5)
    assert_error(client.post("/explain?target=3", content=image), 422, "class index 3 does not exist", "0..2")
    assert_error(client.post("/explain?target=-1", content=image), 422, "target")
    assert_error(client.post("/explain?format=gif", content=image), 422, "format")
    assert_error(client.get("/explain"), 405)


def test_explain_refuses_bad_uploads_exactly_like_predict(client) -> None:
    """One input path for both endpoints: the same status and message for every bad upload."""
    jpeg = jpeg_bytes()
    bad = [{"content": b""}, {"content": b"hello, I am not an image"}, {"content": b"\0" * 300_000},
           {"content": bomb_png()}, {"content": jpeg[:300]}, {"files": {"other": ("x", b"1")}},
           {"files": [("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(), "image/png"))]},
           {"files": {"file": ("cat.jpg", jpeg[:2000], "image/jpeg")}}]  # fmt: skip
    for request in bad:
        predict, explain = client.post("/predict", **request), client.post("/explain", **request)
        assert explain.status_code == predict.status_code and 400 <= explain.status_code < 500, request
        assert assert_error(explain, predict.status_code) == predict.json()["error"]


def test_explain_runs_one_at_a_time_and_refuses_past_its_queue(model_dir, monkeypatch) -> None:
    """Explanations bypass the batcher and run one at a time; past ``max_explain_queue`` waiting: 503."""
    predictor = Predictor.load(model_dir)
    release, entered = threading.Event(), threading.Event()
    explain, running_now, most = predictor.explain, [0], [0]

    def slow_explain(*args, **kwargs):
        running_now[0] += 1
        most[0] = max(most[0], running_now[0])
        entered.set()
        release.wait(10)
        try:
            return explain(*args, **kwargs)
        finally:
            running_now[0] -= 1

    monkeypatch.setattr(predictor, "explain", slow_explain)
    app = create_app(predictor, max_explain_queue=2)

    async def scenario() -> tuple[list[Call], Call]:
        async with running(app):
            calls = [Call(app, "/explain") for _ in range(3)]
            for call in calls:
                call.send_body(png_bytes())
            tasks = [asyncio.create_task(calls[0].run())]
            for _ in range(500):
                if entered.is_set():
                    break
                await asyncio.sleep(0.02)
            tasks.append(asyncio.create_task(calls[1].run()))  # waits for the first
            await asyncio.sleep(0.2)
            await calls[2].run()  # a third: past the queue of 2
            predict = Call(app)  # /predict does not wait behind the stalled explanation
            predict.send_body(png_bytes())
            await predict.run()
            release.set()
            await asyncio.gather(*tasks)
            return calls, predict

    calls, predict = asyncio.run(scenario())
    assert [c.status for c in calls] == [200, 200, 503] and most[0] == 1
    assert "already waiting" in calls[2].json()["error"] and calls[2].response_headers[b"retry-after"] == b"1"
    assert predict.status == 200


def test_explanations_and_batched_predictions_share_one_model_safely(model_dir) -> None:
    """Grad-CAM hooks a stage of the model that the batcher's thread runs too: under the predictor's lock
    each explanation sees only its own forward pass, however the two threads interleave."""
    predictor = Predictor.load(model_dir)
    image, batch = predictor.preprocess(png_bytes(50))[None], torch.randn(8, 3, 32, 32)
    (alone,) = predictor.explain(image)
    stop, errors = threading.Event(), []

    def predict_forever() -> None:
        try:
            while not stop.is_set():
                predictor.predict_tensors(batch)
        except Exception as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=predict_forever)
    thread.start()
    try:
        results = [predictor.explain(image)[0] for _ in range(15)]
    finally:
        stop.set()
        thread.join()
    assert not errors
    for result in results:
        assert result.target == alone.target and torch.allclose(result.cam, alone.cam, atol=1e-5)


def test_the_page_and_its_files_are_served_with_nothing_from_elsewhere(client) -> None:
    import re

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser fetches nothing else
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(referenced) == ["/static/app.js", "/static/favicon.svg", "/static/style.css"]
    texts = [page.text]
    for path, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css"),
                       ("/static/favicon.svg", "image/svg+xml")):  # fmt: skip
        served = client.get(path)
        assert served.status_code == 200 and served.headers["content-type"].startswith(kind)
        texts.append(served.text)
    for text in texts:  # no CDN, web font or remote script: works offline (SVG's namespace is a name, not a fetch)
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|url\(|@import|//[a-z0-9.-]+\.[a-z]{2,}/", text), text[:200]
    assert_error(client.get("/static/app.py"), 404, "app.js, favicon.svg, index.html, style.css")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(model_dir, log, *options: str):
    """A real ``resnetlab serve --from model_dir OPTIONS`` on a free 127.0.0.1 port, its stderr in ``log``,
    once ``/health`` answers (a test failure with the log's tail if it never does); terminated on exit."""
    port = _free_port()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "resnetlab.cli.main", "serve", "--from", str(model_dir), "--port", str(port),
             *options],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start: " + log.read_text()[-2000:])
        yield SimpleNamespace(url=url, proc=proc, log=log, host="127.0.0.1", port=port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """A real ``resnetlab serve`` on 127.0.0.1 with small limits, its log in a file (checked for tracebacks)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    limits = ["--max-batch", "16", "--max-wait-ms", "20", "--max-body-mb", "0.5", "--read-timeout", "2",
              "--body-timeout", "3", "--header-timeout", "2", "--max-concurrent", "48", "--max-mpx", "20"]  # fmt: skip
    with serve_process(model_dir, log, *limits) as running:
        yield running
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]  # every abuse was handled, none crashed


def _memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def _reset_peak_memory(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)


@pytest.mark.slow
def test_concurrent_load_no_errors_and_batching(server) -> None:
    result = asyncio.run(load_test(server.url, png_bytes(), requests=200, concurrency=16))
    assert result["errors"] == {}
    assert result["server_batches"]["requests"] >= 200
    assert result["server_batches"]["batches"] < result["server_batches"]["requests"]  # forward passes were shared
    print(f"served {result['requests']} at concurrency 16: {result['requests_per_second']} req/s, 0 errors")


@pytest.mark.slow
def test_abuse_does_not_harm_other_requests(server) -> None:
    url = server.url
    # a slow client: headers promising a body, then silence
    slow = socket.create_connection((server.host, server.port))
    slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc")
    # meanwhile normal requests are served
    for _ in range(5):
        assert httpx.post(url + "/predict", content=png_bytes(), timeout=10).status_code == 200
    slow.settimeout(10)
    answer = slow.recv(4096)
    slow.close()
    assert b"408" in answer.split(b"\r\n")[0]
    # oversized, declared and streamed
    assert httpx.post(url + "/predict", content=b"\0" * 600_000, timeout=10).status_code == 413

    def chunks():
        for _ in range(20):
            yield b"\0" * 50_000

    assert httpx.post(url + "/predict", content=chunks(), timeout=10).status_code == 413
    assert httpx.get(url + "/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_many_slow_clients_at_once_while_normal_requests_succeed(server) -> None:
    """24 clients dripping a body byte every 0.25 s (never stalling long enough for the read timeout), 8
    sending headers a line at a time, 4 connecting and saying nothing, all at once: each is cut off by
    the total body deadline (408) or the header deadline (closed), while 20 normal requests succeed."""

    async def drip_body() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        start = time.perf_counter()
        try:
            for _ in range(200):
                writer.write(b"x")
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    return await asyncio.wait_for(reader.readline(), 0.25), time.perf_counter() - start
            return b"never answered", time.perf_counter() - start
        finally:
            writer.close()

    async def drip_headers(send_anything: bool) -> tuple[str, float]:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        start = time.perf_counter()
        try:
            for i in range(100):
                if send_anything:
                    writer.write(b"POST /predict HTTP/1.1\r\n" if i == 0 else b"X-Slow-%d: 1\r\n" % i)
                    await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1024), 0.25) == b"":
                        return "closed", time.perf_counter() - start
            return "still open", time.perf_counter() - start
        except (ConnectionResetError, BrokenPipeError):
            return "closed", time.perf_counter() - start
        finally:
            writer.close()

    async def normal(client: httpx.AsyncClient, semaphore: asyncio.Semaphore) -> int:
        async with semaphore:
            return (await client.post("/predict", content=png_bytes())).status_code

    async def scenario():
        semaphore = asyncio.Semaphore(4)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            abusers = asyncio.gather(*(drip_body() for _ in range(24)), *(drip_headers(True) for _ in range(8)),
                                     *(drip_headers(False) for _ in range(4)))  # fmt: skip
            await asyncio.sleep(0.5)  # the abusers are connected and dripping
            start = time.perf_counter()
            statuses = await asyncio.gather(*(normal(client, semaphore) for _ in range(20)))
            normal_seconds = time.perf_counter() - start
            return await abusers, statuses, normal_seconds

    results, statuses, normal_seconds = asyncio.run(scenario())
    bodies, headers = results[:24], results[24:]
    assert statuses == [200] * 20
    assert all(line.startswith(b"HTTP/1.1 408") for line, _ in bodies), bodies
    assert all(2.5 < seconds < 8 for _, seconds in bodies), bodies  # the 3 s body deadline, not the read timeout
    assert all(outcome == "closed" and 1.5 < seconds < 8 for outcome, seconds in headers), headers  # 2 s
    print(
        f"20 normal requests in {normal_seconds:.1f} s beside 36 slow clients; body drippers cut after "
        f"{max(s for _, s in bodies):.1f} s at most, header drippers after {max(s for _, s in headers):.1f} s"
    )


@pytest.mark.slow
def test_clients_disconnecting_mid_body_are_dropped_cleanly(server) -> None:
    before = httpx.get(server.url + "/stats", timeout=5).json()["responses"].get("499", 0)
    for _ in range(10):
        client = socket.create_connection((server.host, server.port))
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + png_bytes()[:100])
        time.sleep(0.05)
        client.close()
    for _ in range(100):  # the server notices each disconnect
        metrics = httpx.get(server.url + "/stats", timeout=5).json()
        if metrics["responses"].get("499", 0) - before == 10:
            break
        time.sleep(0.05)
    assert metrics["responses"].get("499", 0) - before == 10
    assert httpx.post(server.url + "/predict", content=png_bytes(), timeout=10).status_code == 200


def gradient_jpeg(width: int, height: int) -> bytes:
    """A large photo-like JPEG that is small on the wire (a smooth gradient)."""
    x = np.linspace(0, 255, width).astype("uint8")[None, :]
    y = np.linspace(0, 255, height).astype("uint8")[:, None]
    array = np.stack(np.broadcast_arrays(x, y, (x // 2 + y // 2).astype("uint8")), -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.mark.slow
def test_large_images_under_concurrency_keep_memory_bounded(server) -> None:
    """16 uploads of a 12-Mpx JPEG (~265 KB on the wire), all at once: all answered, and the server's peak
    memory stays within what its limits allow. Decoding and resizing one such image peaks at ~10 bytes a
    pixel (~126 MB, measured); only ``decode_workers`` images are decoded at once, the others wait. Without
    that cap the default thread pool would decode 6 at once here (min(32, cores + 4)) and exceed the bound."""
    image = gradient_jpeg(4000, 3000)
    assert len(image) < 500_000  # under the server's 0.5 MB body limit
    asyncio.run(load_test(server.url, png_bytes(), requests=20, concurrency=4))  # warm up
    _reset_peak_memory(server.proc.pid)
    baseline = _memory_mb(server.proc.pid)["VmRSS"]
    start = time.perf_counter()
    result = asyncio.run(load_test(server.url, image, requests=16, concurrency=16, timeout=120))
    seconds = time.perf_counter() - start
    peak = _memory_mb(server.proc.pid)["VmHWM"] - baseline
    assert result["errors"] == {}
    decode_workers = max(1, min(4, os.cpu_count() or 1))  # create_app's default
    bound = decode_workers * 12e6 * 16 / 2**20 + 16 * 0.5 + 64  # 16 B a pixel: 1.5x the measured peak
    assert peak < bound, (peak, bound)
    too_large = io.BytesIO()
    Image.new("L", (5000, 5000)).save(too_large, "PNG")  # 25 Mpx > --max-mpx 20, 25 KB: refused from the header
    assert httpx.post(server.url + "/predict", content=too_large.getvalue(), timeout=30).status_code == 413
    print(
        f"16 x 12-Mpx JPEG at once in {seconds:.1f} s, {decode_workers} decode workers: "
        f"peak RSS +{peak:.0f} MB (bound {bound:.0f} MB)"
    )


@pytest.mark.slow
def test_memory_stays_bounded_under_sustained_load(server) -> None:
    asyncio.run(load_test(server.url, png_bytes(), requests=100, concurrency=8))  # warm up allocator and caches
    before = _memory_mb(server.proc.pid)["VmRSS"]
    result = asyncio.run(load_test(server.url, png_bytes(), requests=600, concurrency=16))
    grown = _memory_mb(server.proc.pid)["VmRSS"] - before
    assert result["errors"] == {}
    assert grown < 50
    metrics = httpx.get(server.url + "/stats", timeout=5).json()
    print(
        f"600 requests at concurrency 16: 0 errors, RSS {before:.0f} MB -> {before + grown:.0f} MB; "
        f"server totals so far: {metrics['responses']}"
    )


@pytest.mark.slow
def test_request_headers_over_16_kb_are_refused_by_the_real_server(server) -> None:
    """uvicorn enforces h11's 16-KB buffer only on headers that arrive in pieces: 40 KB sent at once
    used to be accepted. Now both ways are refused, with the service's JSON error shape."""
    assert httpx.get(server.url + "/health", headers={"x-pad": "a" * 15_000}, timeout=5).status_code == 200
    big = httpx.get(server.url + "/health", headers={"x-pad": "a" * 40_000}, timeout=5)
    # 431 when the head arrives in one read; in pieces (the loopback can split it) h11 refuses it first: 400
    assert big.status_code in (431, 400), (big.status_code, big.text)
    assert_error(big, big.status_code, "16384")
    with socket.create_connection((server.host, server.port)) as dripping:
        dripping.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(40):  # 40 header lines of 1 KB, each in its own packet
            try:
                dripping.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000))
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed mid-way
            time.sleep(0.01)
        dripping.settimeout(10)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := dripping.recv(4096):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, answer[:300]
    assert "request headers over 16384 bytes" in json.loads(body)["error"]

"""resnetlab serve: the API, its errors, and a real server under bounded concurrent load and abuse.

Every request goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
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
    assert client.get("/metrics").json()["requests"] == 2


def test_bad_requests_get_clean_4xx(client) -> None:
    assert client.post("/predict", content=b"").status_code == 400
    not_image = client.post("/predict", content=b"hello, I am not an image")
    assert not_image.status_code == 415 and "not a readable image" in not_image.json()["error"]
    truncated = client.post("/predict", content=png_bytes(200)[:3000])
    assert truncated.status_code in (400, 415) and "error" in truncated.json()
    too_big = client.post("/predict", content=b"\0" * 300_000)
    assert too_big.status_code == 413
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # 400 Mpx declared, a few KB on the wire
    assert client.post("/predict", content=bomb.getvalue()).status_code == 413
    assert client.post("/predict", files={"other": ("x", b"1")}).status_code == 400
    assert client.post("/predict?top_k=0", content=png_bytes()).status_code == 422
    assert client.get("/health").status_code == 200  # still serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab.cli.main", "serve", "--from", str(model_dir), "--port", str(port),
         "--max-batch", "16", "--max-wait-ms", "20", "--max-body-mb", "0.5", "--read-timeout", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stderr.read().decode()[-2000:])
    yield url, proc
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.slow
def test_concurrent_load_no_errors_and_batching(server) -> None:
    url, _ = server
    result = asyncio.run(load_test(url, png_bytes(), requests=200, concurrency=16))
    assert result["errors"] == {}
    assert result["server_batches"]["requests"] >= 200
    assert result["server_batches"]["max_batch_size"] > 1  # concurrent requests shared forward passes


@pytest.mark.slow
def test_abuse_does_not_harm_other_requests(server) -> None:
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    # a slow client: headers promising a body, then silence
    slow = socket.create_connection((host, int(port)))
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
def test_memory_stays_bounded_under_sustained_load(server) -> None:
    url, proc = server

    def rss_mb() -> float:
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    asyncio.run(load_test(url, png_bytes(), requests=100, concurrency=8))  # warm up allocator and caches
    before = rss_mb()
    result = asyncio.run(load_test(url, png_bytes(), requests=600, concurrency=16))
    assert result["errors"] == {}
    assert rss_mb() - before < 50

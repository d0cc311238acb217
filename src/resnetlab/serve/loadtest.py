"""A bounded load test: ``python -m resnetlab.serve.loadtest --url http://127.0.0.1:8000 --image cat.jpg``.

Sends ``--requests`` POST /predict requests, at most ``--concurrency`` at a time, and prints requests/s,
latency percentiles and errors (``--json`` for one JSON object).

``--hostile`` sends ``hostile_images()`` instead of ``--image``: files of a few KB declaring absurd shapes
(1 x 20,000,000 pixels...), which the server must refuse from their headers. With ``--server-pid PID``
(Linux, same machine) the server's peak resident memory (VmHWM) is reported too, and the exit status is 1
when it exceeds ``--max-rss-mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def hostile_images() -> dict[str, bytes]:
    """PNGs of a few KB whose declared shapes would cost gigabytes once resized for a model (the short side
    goes to the model's input size, the long side grows by the same factor), plus the thinnest accepted one."""
    from PIL import Image

    shapes = {"strip-1x1M": (1, 1_000_000), "strip-1x20M": (1, 20_000_000), "strip-1Mx1": (1_000_000, 1),
              "strip-3x50k": (3, 50_000), "thinnest-accepted-100x10000": (100, 10_000)}  # fmt: skip
    images = {}
    for name, (width, height) in shapes.items():
        buffer = io.BytesIO()
        Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
        images[name] = buffer.getvalue()
    return images


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory (VmHWM) of process ``pid`` in MB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024


async def load_test(url: str, image: bytes | Sequence[bytes], *, requests: int = 200, concurrency: int = 16,
                    timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
    """Send ``requests`` POST /predict, ``concurrency`` at a time; ``image`` may be a list, sent in turn."""
    import httpx

    bodies = itertools.cycle([image] if isinstance(image, bytes) else list(image))
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def one(body: bytes) -> None:
            async with semaphore:
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", content=body,
                                                 headers={"content-type": "application/octet-stream"})  # fmt: skip
                    statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                    if response.status_code != 200:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(next(bodies)) for _ in range(requests)))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/stats")).json()
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"requests": requests, "concurrency": concurrency, "seconds": round(elapsed, 3),
            "requests_per_second": round(requests / elapsed, 1), "p50_ms": round(percentile(0.50), 2),
            "p90_ms": round(percentile(0.90), 2), "p99_ms": round(percentile(0.99), 2),
            "mean_ms": round(1000 * statistics.fmean(latencies), 2), "errors": errors, "statuses": statuses,
            "server_batches": metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnetlab.serve.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path)
    source.add_argument("--hostile", action="store_true", help="send hostile_images() in turn")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server-pid", type=int, help="report this server process's peak RSS (Linux)")
    parser.add_argument("--max-rss-mb", type=float, default=1536, help="with --server-pid: fail above this peak")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    images = list(hostile_images().values()) if args.hostile else args.image.read_bytes()
    result = asyncio.run(load_test(args.url, images, requests=args.requests, concurrency=args.concurrency))
    if args.server_pid:
        result["server_peak_rss_mb"] = round(peak_rss_mb(args.server_pid), 1)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"{r['requests']} requests, {r['concurrency']} concurrent: {r['requests_per_second']} req/s, "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, statuses {r['statuses']}"
              + (f"; server peak RSS {r['server_peak_rss_mb']} MB" if args.server_pid else ""))  # fmt: skip
    # hostile images must all be answered (4xx expected), never drop a connection or fail with a 5xx
    failed = [k for k in result["errors"] if not (args.hostile and k.startswith("4"))]
    too_big = result.get("server_peak_rss_mb", 0) > args.max_rss_mb
    return 1 if failed or too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())

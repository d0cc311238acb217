"""A bounded load test: ``python -m resnetlab.serve.loadtest --url http://127.0.0.1:8000 --image cat.jpg``.

Sends ``--requests`` POST /predict requests, at most ``--concurrency`` at a time, and prints requests/s,
latency percentiles and errors (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any


async def load_test(url: str, image: bytes, *, requests: int = 200, concurrency: int = 16,
                    timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def one() -> None:
            async with semaphore:
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", content=image,
                                                 headers={"content-type": "application/octet-stream"})  # fmt: skip
                    if response.status_code != 200:
                        errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/stats")).json()
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"requests": requests, "concurrency": concurrency, "seconds": round(elapsed, 3),
            "requests_per_second": round(requests / elapsed, 1), "p50_ms": round(percentile(0.50), 2),
            "p90_ms": round(percentile(0.90), 2), "p99_ms": round(percentile(0.99), 2),
            "mean_ms": round(1000 * statistics.fmean(latencies), 2), "errors": errors,
            "server_batches": metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnetlab.serve.loadtest", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(load_test(args.url, args.image.read_bytes(), requests=args.requests,
                                   concurrency=args.concurrency))  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        print(f"{r['requests']} requests, {r['concurrency']} concurrent: {r['requests_per_second']} req/s, "
              f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors'] or 'none'}; "
              f"mean server batch {r['server_batches']['mean_batch_size']:.1f}")  # fmt: skip
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

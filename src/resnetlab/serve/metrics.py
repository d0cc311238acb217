"""The service's measurements, kept once in a Prometheus registry.

``GET /metrics`` exposes them in the Prometheus text format (``prometheus-client``); ``GET /stats`` is a
JSON view of the same numbers for people and scripts. Each app has its own registry, so several apps
in one process (tests, an embedding server) never mix their counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Seconds: a small CPU model answers in milliseconds, a big one on a busy CPU in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself (a full batch is its own bucket)."""
    bounds = {2**i for i in range(max_batch.bit_length()) if 2**i <= max_batch} | {max_batch}
    return tuple(float(b) for b in sorted(bounds))


class ServiceMetrics:
    """Responses by status, request latency by endpoint, batch sizes and forward-pass time, refusals, and
    two gauges read when scraped: requests waiting for the model, and image requests (``/predict``,
    ``/explain``) in flight."""

    def __init__(self, *, max_batch: int, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter("resnetlab_http_responses", "HTTP responses sent, by status code", ["status"],
                                 registry=r)  # fmt: skip
        self.latency = Histogram("resnetlab_http_request_duration_seconds",
                                 "Seconds from a request's arrival to the end of its response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("resnetlab_batch_size", "Images per forward pass of the model",
                                    buckets=batch_size_buckets(max(1, max_batch)), registry=r)  # fmt: skip
        self.forward_seconds = Histogram("resnetlab_forward_seconds", "Seconds per forward pass of a batch",
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.refused = Counter("resnetlab_queue_refused", "Requests refused (503) because the model's queue was full",
                               registry=r)  # fmt: skip
        Gauge("resnetlab_queue_depth", "Decoded images waiting for the model", registry=r).set_function(queue_depth)
        Gauge("resnetlab_requests_in_flight", "/predict and /explain requests being received or answered",
              registry=r).set_function(in_flight)  # fmt: skip

    def observe_response(self, status: int, endpoint: str, seconds: float) -> None:
        self.responses.labels(str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of every measurement."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The same numbers as JSON: totals, mean batch size, batch sizes by range, responses by status."""
        value = self.registry.get_sample_value
        images = value("resnetlab_batch_size_sum") or 0.0
        batches = value("resnetlab_batch_size_count") or 0.0
        responses = {s.labels["status"]: int(s.value) for m in self.responses.collect() for s in m.samples
                     if s.name.endswith("_total")}  # fmt: skip
        return {"requests": int(images), "batches": int(batches),
                "mean_batch_size": images / batches if batches else 0.0,
                "batch_sizes": self._batch_size_ranges(), "queued": int(value("resnetlab_queue_depth") or 0),
                "in_flight": int(value("resnetlab_requests_in_flight") or 0),
                "refused_queue_full": int(value("resnetlab_queue_refused_total") or 0),
                "responses": dict(sorted(responses.items()))}  # fmt: skip

    def _batch_size_ranges(self) -> dict[str, int]:
        """Batches per size range, e.g. {"1": 3, "2": 1, "3-4": 5} (only ranges that occurred)."""
        ranges, previous, below = {}, 0, 0
        for sample in next(iter(self.batch_size.collect())).samples:
            if not sample.name.endswith("_bucket") or sample.labels["le"] == "+Inf":
                continue
            bound, count = int(float(sample.labels["le"])), int(sample.value)
            if count > below:
                ranges[str(bound) if bound == previous + 1 else f"{previous + 1}-{bound}"] = count - below
            previous, below = bound, count
        return ranges

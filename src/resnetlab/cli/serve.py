"""``resnetlab serve``: an HTTP inference service over a trained model."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import (
    add_backend,
    add_device,
    add_model_source,
    backend_options,
    port_number,
    positive_float,
    positive_int,
    source_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve",
                       description="POST an image to /predict, get JSON top-k. See docs/serving.md.")  # fmt: skip
    add_model_source(p, exports=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000)
    add_device(p)
    add_backend(p)
    p.add_argument("--max-batch", type=positive_int, default=32, help="largest batch of concurrent requests")
    p.add_argument("--max-wait-ms", type=positive_float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-body-mb", type=positive_float, default=10.0, help="largest accepted request body")
    p.add_argument("--read-timeout", type=positive_float, default=10.0, help="seconds a client may stall mid-upload")
    p.add_argument("--body-timeout", type=positive_float, default=60.0, help="seconds a client may take to send a body")
    p.add_argument(
        "--header-timeout", type=positive_float, default=10.0, help="seconds a client may take to send headers"
    )
    p.add_argument("--max-concurrent", type=positive_int, default=64, help="/predict requests in flight (more get 503)")
    p.add_argument("--max-queue", type=positive_int, default=256, help="requests waiting for the model (more get 503)")
    p.add_argument("--max-mpx", type=positive_float, default=50.0, help="largest image accepted, in megapixels")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model once and serve until interrupted."""
    from resnetlab.inference import Predictor
    from resnetlab.serve import serve

    predictor = Predictor.load(args.source, device=args.device, batch_size=1, **backend_options(args),
                               **source_options(args))  # fmt: skip
    print(f"backend {predictor.backend_reason}", flush=True)
    serve(predictor, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          max_body_bytes=int(args.max_body_mb * 2**20), read_timeout=args.read_timeout,
          body_timeout=args.body_timeout, header_timeout=args.header_timeout, max_concurrent=args.max_concurrent,
          max_queue=args.max_queue, max_pixels=int(args.max_mpx * 1e6))  # fmt: skip
    return 0

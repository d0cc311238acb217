"""``resnetlab benchmark``: speed and memory of a model on a backend, with torchvision as the yardstick."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import add_device, add_json_flag, non_negative_int, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    from resnetlab.benchmark import BACKENDS, DTYPES
    from resnetlab.export.artifacts import ORT_OPTIMIZATION

    p = sub.add_parser("benchmark",
                       description="Synthetic inputs; torchvision's model of the same name is measured in the "
                                   "same run (eager, and on the same backend, or in ONNX Runtime fp32 for the "
                                   "bf16, openvino and best paths) when it exists.")  # fmt: skip
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=positive_int, default=16, help="images per batch (default 16)")
    p.add_argument("--image-size", type=positive_int, help="input side (default: the model's)")
    p.add_argument("--backend", default="eager", choices=BACKENDS,
                   help="eager (default), compile, torchscript, or an inference path of resnetlab.backends; best: "
                   "measure those paths here and time the fastest against the yardsticks")  # fmt: skip
    p.add_argument("--compile", dest="backend", action="store_const", const="compile",
                   help="shorthand for --backend compile (torch.compile)")  # fmt: skip
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, SGD)")
    p.add_argument(
        "--data",
        help="with --train: a dataset for the engine's data pipeline (default: random images "
        "of the model's size in memory, augmented as CIFAR is)",
    )
    add_device(p)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="bfloat16: autocast for every contestant (eager and compile backends)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for every contestant")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs (inference, resnetlab's model)")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 static quantization of resnetlab's model (onnxruntime backend; latency only)",
    )
    p.add_argument(
        "--ort-optimization",
        default="all",
        choices=ORT_OPTIMIZATION,
        help="ONNX Runtime graph optimisation level (default: all, ONNX Runtime's own default)",
    )
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--iters", type=positive_int, default=10, help="timed iterations (default 10)")
    p.add_argument("--no-compare", dest="compare", action="store_false", help="skip the torchvision yardsticks")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print (or emit as JSON) the measurement."""
    from resnetlab.benchmark import benchmark

    r = benchmark(args.model, batch=args.batch, image_size=args.image_size, backend=args.backend, train=args.train,
                  device=args.device, fold_bn=args.fold_bn, channels_last=args.channels_last, dtype=args.dtype,
                  quantize=args.quantize, ort_optimization=args.ort_optimization, threads=args.threads,
                  warmup=args.warmup, iters=args.iters, compare=args.compare, data=args.data)  # fmt: skip
    if args.json:
        print_json(r)
        return 0
    options = [
        o
        for o, on in (
            ("fold-bn", r["fold_bn"]),
            (r["quantize"], r["quantize"]),
            ("channels-last", r["channels_last"]),
            (r["dtype"], r["dtype"] != "float32"),
        )
        if on
    ]
    print(f"{r['model']} {r['mode']}, batch {r['batch']} at {r['image_size']}px, {r['device']}, "
          f"{r['threads']} threads, backend {r['backend']}{''.join(' +' + o for o in options)}")  # fmt: skip
    if "choice" in r:
        print(f"  chose {r['choice']['reason']}")
    labels = ("resnetlab", *(k for k in r if k.startswith(("torchvision_", "resnetlab_")) or k == "plain_loop"))
    for label in labels:
        s = r[label]
        memory = "n/a" if s["memory_mb"] is None else f"{s['memory_mb']:.0f} MB"
        print(f"  {label.replace('_', ' '):<24} p50 {s['p50_ms']:9.2f} ms  p90 {s['p90_ms']:9.2f} ms  "
              f"p99 {s['p99_ms']:9.2f} ms  {s['images_per_second']:9.1f} img/s  memory {memory} "
              f"(+{s['weights_mb']:.1f} MB weights)")  # fmt: skip
    for key in (k for k in r if k.startswith("speedup_vs_")):
        against = key.removeprefix("speedup_vs_").replace("_", " ")
        print(f"  speed-up over {against}{' eager' if against == 'torchvision' else ''}: {r[key]:.2f}x")
    if "with_data_vs_plain_loop" in r:
        print(f"  engine with its data pipeline vs plain loop (fixed batch): {r['with_data_vs_plain_loop']:.2f}x")
    return 0

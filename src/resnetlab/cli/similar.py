"""``resnetlab similar``: nearest images of an embeddings index (made by ``resnetlab features``)."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import (
    add_device,
    add_json_flag,
    add_model_source,
    display_path,
    positive_int,
    print_json,
    source_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similar",
                       description="Embeds the queries with --from (the model the index was made with) at the "
                       "index's stage, then ranks the index by cosine similarity.")  # fmt: skip
    p.add_argument("queries", nargs="+", help="query image files and/or folders")
    p.add_argument("--index", required=True, help="embeddings file from `resnetlab features` (.npy or .parquet)")
    add_model_source(p)  # the model is named here: an index file never chooses what is loaded
    p.add_argument("-k", "--top-k", type=positive_int, default=5, help="matches per query (default 5)")
    add_device(p)
    add_json_flag(p)
    p.set_defaults(func=similar)


def similar(args: argparse.Namespace) -> int:
    from resnetlab.transfer.features import similar_images

    results, failed = similar_images(args.index, args.queries, source=args.source, k=args.top_k, device=args.device,
                                     **source_options(args))  # fmt: skip
    if args.json:
        print_json({"results": [{"query": q, "matches": [{"file": f, "score": s} for f, s in m]}
                                for q, m in results],
                    "skipped": [{"file": f, "reason": r} for f, r in failed]})  # fmt: skip
        return 0
    for query, matches in results:
        print(display_path(query))
        for file, score in matches:
            print(f"  {score:.4f}  {display_path(file)}")
    for path, reason in failed:
        print(f"skipped {display_path(path)}: {display_path(reason)}")
    return 0

"""``resnetlab probe``: how good embeddings are: k-NN, logistic regression and retrieval on a val set."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import add_json_flag, positive_int, print_json, seed_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe",
                       description="Fits scikit-learn classifiers on the train embeddings and scores them on "
                       "the val embeddings (both from `resnetlab features`); classes are the images' parent "
                       "folders. Retrieval precision@k ranks train images as `resnetlab similar` does.")  # fmt: skip
    p.add_argument("--train", required=True, help="embeddings of the labelled images (.npy or .parquet)")
    p.add_argument("--val", required=True, help="embeddings of the images to score")
    p.add_argument("-k", type=positive_int, nargs="+", default=[1, 5, 10], help="neighbours for k-NN and precision@k")
    p.add_argument("--seed", type=seed_int, default=0)
    add_json_flag(p)
    p.set_defaults(func=probe)


def probe(args: argparse.Namespace) -> int:
    from resnetlab.transfer.features import Embeddings, probe_embeddings

    result = probe_embeddings(Embeddings.load(args.train), Embeddings.load(args.val), ks=args.k, seed=args.seed)
    if args.json:
        print_json(result)
        return 0
    print(f"{result['train']} train / {result['val']} val embeddings of {result['dim']} dims, "
          f"classes {', '.join(result['classes'])} (largest class: {result['largest_class']:.2f}% of val)")  # fmt: skip
    print(f"logistic regression: {result['logistic_regression']:.2f}%")
    for k, accuracy in result["knn"].items():
        print(f"k-NN k={k}: {accuracy:.2f}%   retrieval precision@{k}: {result['retrieval'][k]:.2f}%")
    return 0

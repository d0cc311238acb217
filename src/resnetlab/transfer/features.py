"""Embeddings: pooled features of any stage for many images, saved with their file names, and searched.

Images go through ``Predictor.preprocess`` (the model's own input size, crop, mean/std; every image mode
and EXIF orientation via ``resnetlab.data.load_image``), so embeddings match what the model saw in
training. An embeddings file ``NAME.npy`` has siblings ``NAME.csv`` (one file name per row) and
``NAME.json`` (how it was made, so ``similar`` can embed a query the same way, and the sha256 of the two
others, so a mixed set is detected).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data.images import collect_images
from resnetlab.errors import ConfigError, DataError, InputError
from resnetlab.inference import Predictor
from resnetlab.io import atomic_write_set, error_summary, open_regular, remove_leftovers, sha256_bytes
from resnetlab.models import ResNet


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules (``"layer3.1"``, ``"layer4"``) during forward passes.

    Each output is recorded as a detached copy, exactly as the submodule returned it.

    >>> with capture_outputs(model, ["layer2", "layer3.0.bn2"]) as outputs:
    ...     model(x)
    >>> outputs["layer2"].shape
    """
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise InputError(f"no module named {unknown} in {type(model).__name__}; e.g. {list(modules)[1:6]}")
    outputs: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            # A copy: the net later changes some outputs in place (the shortcut is added into a branch's
            # last BN output, ReLUs run in place), which would alter what was recorded.
            outputs[name] = output.detach().clone()

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def pooled_features(model: ResNet, batch: torch.Tensor, stage: int | None = None) -> torch.Tensor:
    """Global-average-pooled features (N, C): of the last stage (the classifier's input) or stage
    ``stage`` (0 = stem, 1..N as in ``model.feature_info``)."""
    if stage is None:
        return model.forward_head(model.forward_features(batch), pre_logits=True)
    [feature_map] = model.forward_intermediates(batch, [stage], intermediates_only=True)
    return F.adaptive_avg_pool2d(feature_map, 1).flatten(1)


@dataclass
class Embeddings:
    """One row per image: ``vectors[i]`` is the embedding of ``files[i]``."""

    vectors: np.ndarray
    files: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): reported, not embedded

    def save(self, out: str | os.PathLike) -> Path:
        """``out.npy`` + ``out.csv`` + ``out.json``, or ``out.parquet`` (needs pandas + pyarrow) + ``out.json``.

        The files are written as a set (``resnetlab.io.atomic_write_set``: temporary files, fsync, renames),
        and the .json records the sha256 of the others (``content_sha256``), so ``load`` refuses a set that
        an interrupted run left mixed instead of pairing new vectors with old file names.
        """
        out = Path(out)
        if out.suffix == ".parquet":
            try:
                import pandas as pd
                import pyarrow  # noqa: F401
            except ImportError as err:
                raise ConfigError("writing parquet needs pandas and pyarrow: pip install 'resnetlab[parquet]'; "
                                  "or use --out NAME.npy") from err  # fmt: skip
            buffer = io.BytesIO()
            pd.DataFrame({"file": self.files, "embedding": list(self.vectors)}).to_parquet(buffer)
            contents = {out: buffer.getvalue()}
        else:
            out = _npy_path(out)
            buffer = io.BytesIO()
            np.save(buffer, self.vectors, allow_pickle=False)
            table = io.StringIO(newline="")
            writer = csv.writer(table)
            writer.writerow(["index", "file"])
            writer.writerows(enumerate(self.files))
            # surrogateescape: a file name that is not UTF-8 is written as its own bytes, and read back so
            csv_bytes = table.getvalue().encode("utf-8", "surrogateescape")
            contents = {out: buffer.getvalue(), out.with_suffix(".csv"): csv_bytes}
        meta = {**self.meta, "count": len(self.files), "dim": int(self.vectors.shape[1]),
                "content_sha256": {p.suffix: sha256_bytes(data) for p, data in contents.items()}}  # fmt: skip
        contents[out.with_suffix(".json")] = json.dumps(meta, indent=1).encode()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(out.parent, [p.name for p in contents])
            atomic_write_set(contents)
        except OSError as err:
            raise DataError(f"could not write the embeddings {out}: {err}; files already there are intact") from err
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Read an index written by ``save``; ``DataError`` naming the file for a missing, truncated or
        malformed one, or for a set whose files do not belong together (their sha256 differs from the
        one the .json recorded). Indexes saved before the .json recorded sha256 are checked for equal
        row counts only."""
        path = Path(path)
        if path.suffix != ".parquet":
            path = _npy_path(path)
        parts = [path] if path.suffix == ".parquet" else [path, path.with_suffix(".csv")]
        if not all(p.is_file() for p in parts):
            raise DataError(f"no embeddings index at {path}{'' if len(parts) == 1 else ' (+ .csv)'}; "
                            "make one with `resnetlab features`")  # fmt: skip
        meta = _read_meta(path.with_suffix(".json"))
        contents = {p: _read_bytes(p) for p in parts}
        recorded = meta.get("content_sha256")
        if recorded is not None:
            found = {p.suffix: sha256_bytes(data) for p, data in contents.items()}
            if recorded != found:
                raise DataError(
                    f"{', '.join(p.name for p in parts)} and {path.with_suffix('.json').name} do not belong "
                    "together (a `features` run was interrupted, or a file was replaced): re-run `resnetlab features`"
                )
        if path.suffix == ".parquet":
            vectors, files = _parse_parquet(path, contents[path])
        else:
            vectors, files = _parse_npy(path, contents[path]), _parse_csv(parts[1], contents[parts[1]])
        if len(vectors) != len(files):
            raise DataError(f"{path} has {len(vectors)} rows but its file list has {len(files)} names")
        return cls(vectors, files, meta)


def _read_bytes(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _read_meta(path: Path) -> dict[str, Any]:
    """The .json sidecar of an index ({} when there is none: ``similar`` then says what is missing)."""
    if not path.exists():
        return {}
    try:
        meta = json.loads(_read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"{path} is not valid JSON ({error_summary(err)}): re-run `resnetlab features`") from err
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not an embeddings sidecar (a JSON object): re-run `resnetlab features`")
    return meta


def _parse_npy(path: Path, data: bytes) -> np.ndarray:
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy file, truncated or corrupt ({error_summary(err)})") from err
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise DataError(f"{path} holds a {vectors.dtype} array of shape {vectors.shape}, not embeddings (N, dim)")
    return vectors


def _parse_csv(path: Path, data: bytes) -> list[str]:
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
        if "file" not in (reader.fieldnames or []):
            raise DataError(f"{path} has no 'file' column (found: {reader.fieldnames}); re-run `resnetlab features`")
        return [row["file"] for row in reader]
    except csv.Error as err:
        raise DataError(f"{path} is not a readable CSV ({error_summary(err)})") from err


def _parse_parquet(path: Path, data: bytes) -> tuple[np.ndarray, list[str]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(io.BytesIO(data))
        return np.stack(frame["embedding"].to_numpy()), frame["file"].tolist()
    except Exception as err:  # pyarrow raises many types for a damaged file
        raise DataError(f"{path} is not a readable embeddings parquet ({error_summary(err)})") from err


def _npy_path(path: Path) -> Path:
    """``NAME.npy`` for ``NAME`` or ``NAME.npy``; a dotted name (``emb.v2``) keeps its dots."""
    return path if path.suffix == ".npy" else path.with_name(path.name + ".npy")


@torch.no_grad()
def extract_features(
    predictor: Predictor,
    files: Iterable[str | os.PathLike],
    *,
    stage: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> Embeddings:
    """Embed every image file in batches; unreadable files are listed in ``.failed`` and skipped."""
    from tqdm.auto import tqdm

    model = predictor.model
    if not isinstance(model, ResNet):
        raise ConfigError(f"embeddings need the PyTorch model (an exported {type(model).__name__} only gives "
                          "logits); pass the run or model folder it was exported from")  # fmt: skip
    paths = [str(p) for p in files]
    chunks, names, failed = [], [], []
    for start in tqdm(range(0, len(paths), batch_size), disable=not progress, desc="features", unit="batch"):
        tensors = []
        for path in paths[start : start + batch_size]:
            try:
                tensors.append(predictor.preprocess(path))
                names.append(path)
            except DataError as err:
                failed.append((path, str(err)))
        if tensors:
            batch = torch.stack(tensors).to(predictor.device)
            chunks.append(pooled_features(model, batch, stage).float().cpu())
    dim = chunks[0].shape[1] if chunks else 0
    vectors = torch.cat(chunks).numpy() if chunks else np.zeros((0, dim), np.float32)
    meta = {"architecture": model.name, "stage": stage, "preprocessing": predictor.metadata}
    return Embeddings(vectors, names, meta, failed)


def _check_k(k: int) -> None:
    if k < 1:
        raise InputError(f"k (--top-k) must be at least 1, not {k}")


def nearest(index: Embeddings, queries: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most cosine-similar indexed files for each query vector, best first."""
    _check_k(k)
    if index.vectors.shape[1] != queries.shape[1]:
        raise InputError(f"query embeddings have {queries.shape[1]} dims, the index {index.vectors.shape[1]}; "
                         "embed queries with the index's model and stage")  # fmt: skip
    keys = F.normalize(torch.from_numpy(index.vectors).float(), dim=1)
    scores = F.normalize(torch.from_numpy(queries).float(), dim=1) @ keys.T
    values, indices = scores.topk(min(k, len(index.files)), dim=1)
    return [[(index.files[i], round(v, 6)) for i, v in zip(idx.tolist(), val.tolist())]
            for val, idx in zip(values, indices)]  # fmt: skip


def similar_images(
    index_path: str | os.PathLike,
    queries: Sequence[str],
    *,
    source: str | os.PathLike,
    k: int = 5,
    device: str = "cpu",
    **load_options: Any,
) -> tuple[list[tuple[str, list[tuple[str, float]]]], list[tuple[str, str]]]:
    """Embed ``queries`` (files/folders) with ``source`` at the index's stage; their ``k`` nearest indexed files.

    ``source`` must be the model the index records: the index only checks it, it never chooses what is
    loaded (a doctored index could otherwise make the tool open any file). ``load_options``: those of
    ``resnetlab.sources.load_model`` (``pretrained``, ``allow_program``, ``random_init``)."""
    _check_k(k)  # before any model is loaded
    index = Embeddings.load(index_path)
    if "source" not in index.meta:
        raise DataError(f"{index_path} has no .json sidecar naming its model; re-create it with `resnetlab features`")
    named = Path(source).resolve() if Path(source).exists() else source
    made_with = (str(index.meta["source"]), index.meta.get("pretrained"))
    if (str(named), load_options.get("pretrained")) != made_with:
        weights = f" --pretrained {made_with[1]}" if made_with[1] else ""
        raise InputError(f"{index_path} was made with {made_with[0]}{weights}, not {source}: pass --from "
                         f"{made_with[0]}{weights} (or re-index with `resnetlab features`)")  # fmt: skip
    predictor = Predictor.load(source, device=device, **load_options)
    found = extract_features(predictor, collect_images(list(queries)), stage=index.meta.get("stage"))
    return list(zip(found.files, nearest(index, found.vectors, k))), found.failed


def folder_labels(files: Sequence[str]) -> list[str]:
    """The class of each file in an ImageFolder layout: the name of its parent folder."""
    return [Path(f).parent.name for f in files]


def probe_embeddings(
    train: Embeddings,
    val: Embeddings,
    *,
    ks: Sequence[int] = (1, 5, 10),
    labels: Callable[[Sequence[str]], list[str]] = folder_labels,
    seed: int = 0,
) -> dict[str, Any]:
    """How useful embeddings are, measured three ways on ``val`` with ``train`` as the labelled set.

    - ``knn``: accuracy (%) of scikit-learn's k-nearest-neighbour classifier (cosine distance) for each k;
    - ``logistic_regression``: accuracy (%) of a logistic regression on standardised embeddings;
    - ``retrieval``: precision@k (%) of the ranking ``resnetlab similar`` returns (``nearest``), i.e. the
      share of each val image's k nearest train images that have its class.

    ``labels`` maps file names to classes (default: the parent folder). ``largest_class`` is the share of
    the largest class in ``val``: the best a constant answer can do, the floor every figure should beat.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not len(train.files) or not len(val.files):
        raise DataError(f"need train and val embeddings, got {len(train.files)} and {len(val.files)} rows")
    if train.vectors.shape[1] != val.vectors.shape[1]:
        raise InputError(f"train embeddings have {train.vectors.shape[1]} dims, val {val.vectors.shape[1]}; "
                         "embed both with the same model and stage")  # fmt: skip
    y_train, y_val = np.array(labels(train.files)), np.array(labels(val.files))
    classes = sorted(set(y_train))
    if len(classes) < 2:
        raise DataError(f"the train embeddings hold one class ({classes}); the probes need at least two")
    if unseen := sorted(set(y_val) - set(classes)):
        raise DataError(f"val classes {unseen} do not occur in train")
    ks = sorted({k for k in ks if 1 <= k <= len(y_train)}) or [1]

    def percent(hits: np.ndarray) -> float:
        return round(100.0 * float(np.mean(hits)), 2)

    knn = {}
    for k in ks:
        classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train.vectors, y_train)
        knn[str(k)] = percent(classifier.predict(val.vectors) == y_val)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    logistic.fit(train.vectors, y_train)
    found = nearest(train, val.vectors, k=max(ks))
    train_label = dict(zip(train.files, y_train))
    same = np.array([[train_label[f] == y for f, _ in matches] for matches, y in zip(found, y_val)])
    retrieval = {str(k): percent(same[:, :k]) for k in ks}
    return {
        "train": len(y_train), "val": len(y_val), "classes": classes, "dim": int(train.vectors.shape[1]),
        "largest_class": max(percent(y_val == c) for c in classes), "knn": knn,
        "logistic_regression": percent(logistic.predict(val.vectors) == y_val), "retrieval": retrieval,
    }  # fmt: skip

"""The facts of every named model (``model_info``: parameters, GMACs, stages, weights, paper), precomputed.

``resnetlab models`` reads them from ``catalog.json`` without importing torch or building every network
(6 s before, now a fraction of a second). The file is keyed by a hash of the sources of
``resnetlab/models``: when they change (a new model, a new weights tag) and the file was not regenerated,
``model_catalog`` computes the facts live instead, so the table is never stale, only slower. Regenerate
with ``python -m resnetlab.catalog``; tests/test_cli_models.py checks that the shipped file is current.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).with_name("catalog.json")
MODELS_PACKAGE = Path(__file__).with_name("models")


def models_source_hash() -> str:
    """sha256 over the names and bytes of ``resnetlab/models/*.py``: the key of ``catalog.json``."""
    digest = hashlib.sha256()
    for path in sorted(MODELS_PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build_catalog() -> dict[str, Any]:
    """Every named model's ``model_info`` (in ``list_models`` order), the names in the registry's table order
    (``MODELS``: family by family, for ``models --markdown``), and the source hash they were computed from
    (imports torch)."""
    from resnetlab.models import MODELS, list_models, model_info

    infos = json.loads(json.dumps([model_info(name) for name in list_models()]))  # tuples -> lists, as read back
    return {"source_sha256": models_source_hash(), "table_order": list(MODELS), "models": infos}


def _shipped_catalog() -> dict[str, Any] | None:
    """``catalog.json`` when it is current (its key is the models' source hash), else None."""
    try:
        catalog = json.loads(CATALOG.read_text())
    except (OSError, ValueError):
        return None
    return catalog if isinstance(catalog, dict) and catalog.get("source_sha256") == models_source_hash() else None


def model_catalog(pattern: str = "*", *, pretrained: bool = False, table_order: bool = False) -> list[dict[str, Any]]:
    """``model_info`` of the named models matching a shell-style ``pattern`` (with ``pretrained``: only those
    with published weights, as ``list_models(pretrained=True)``), in ``list_models`` order or, with
    ``table_order``, in the registry's. A stale catalog is not used: the facts are then computed live."""
    catalog = _shipped_catalog()
    if catalog is None:
        from resnetlab.models import MODELS, list_models, model_info

        infos = json.loads(json.dumps([model_info(name) for name in list_models(pattern, pretrained=pretrained)]))
        names = list(MODELS)
    else:
        infos = [info for info in catalog["models"]
                 if fnmatch.fnmatch(info["name"], pattern) and (info["weights"] or not pretrained)]  # fmt: skip
        names = catalog["table_order"]
    if table_order:
        order = {name: i for i, name in enumerate(names)}
        infos.sort(key=lambda info: order[info["name"]])
    return infos


def write_catalog(path: Path = CATALOG) -> Path:
    """Write ``catalog.json``: one model per line, so a change to the registry is a readable diff."""
    catalog = build_catalog()
    rows = ",\n".join(json.dumps(info) for info in catalog["models"])
    order = json.dumps(catalog["table_order"])
    path.write_text(
        f'{{"source_sha256": "{catalog["source_sha256"]}", "table_order": {order}, "models": [\n{rows}\n]}}\n'
    )
    return path


if __name__ == "__main__":
    print(f"wrote {write_catalog()}")

"""``resnetlab models`` and ``resnetlab info``: tables, JSON and errors."""

from __future__ import annotations

import json

import pytest

from resnetlab.cli.main import main


def test_models_table_and_json(capsys) -> None:
    assert main(["models", "resnet5*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "25.56M" in out and "resnet56" in out
    assert main(["models", "--json", "wrn*"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in data["models"]} == {"wrn16_4", "wrn16_8", "wrn28_10", "wrn40_4"}


def test_info_and_unknown_name(capsys) -> None:
    assert main(["info", "resnet20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 269_722 and [s["blocks"] for s in info["stages"]] == [0, 3, 3, 3]
    assert main(["info", "resnet20"]) == 0
    assert "layer3" in capsys.readouterr().out
    assert main(["info", "resnet05"]) == 1
    assert "Did you mean" in capsys.readouterr().err


def test_the_shipped_model_catalog_matches_the_model_sources() -> None:
    """`resnetlab models` reads catalog.json instead of building every network (6 s -> 0.1 s). If this fails,
    resnetlab/models changed: regenerate with `python -m resnetlab.catalog` (until then the CLI computes live)."""
    from resnetlab.catalog import CATALOG, models_source_hash

    assert json.loads(CATALOG.read_text())["source_sha256"] == models_source_hash(), "run python -m resnetlab.catalog"


@pytest.mark.slow
def test_the_shipped_model_catalog_is_what_model_info_says() -> None:
    from resnetlab.catalog import CATALOG, build_catalog

    assert json.loads(CATALOG.read_text()) == build_catalog(), "stale: run `python -m resnetlab.catalog`"


def test_a_stale_catalog_is_not_used(tmp_path, monkeypatch) -> None:
    from resnetlab import catalog

    stale = tmp_path / "catalog.json"
    stale.write_text(json.dumps({"source_sha256": "old", "models": [{"name": "resnet50", "params": 1}]}))
    monkeypatch.setattr(catalog, "CATALOG", stale)
    assert catalog.model_catalog("resnet50")[0]["params"] == 25_557_032

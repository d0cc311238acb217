"""``resnetlab models`` and ``resnetlab info``: tables, JSON and errors."""

from __future__ import annotations

import json

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

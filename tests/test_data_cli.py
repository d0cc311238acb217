"""``resnetlab data``: one JSON object describing the dataset."""

from __future__ import annotations

import json

from resnetlab.cli.main import main


def test_data_command_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path))
    assert main(["data", "digits", "--val-split", "100", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 1337, "val": 100, "test": 360} and summary["in_chans"] == 1


def test_data_command_text_and_error(capsys, tmp_path):
    assert main(["data"]) == 0
    assert "digits: train 1437, test 360 images" in capsys.readouterr().out
    assert main(["data", str(tmp_path / "missing"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "DataError"

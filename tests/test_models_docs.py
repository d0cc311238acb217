"""docs/models.md's table of every model is the output of ``resnetlab models --markdown``, so it cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resnetlab.cli.main import main
from resnetlab.models import MODELS

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.mark.slow  # builds all 98 models on the meta device and counts their operations (~15 s)
def test_the_models_table_of_the_docs_is_current(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--markdown"]) == 0
    generated = capsys.readouterr().out.strip()
    found = re.search(r"<!-- models table: resnetlab models --markdown -->\n(.*?)\n<!-- end", DOC.read_text(), re.S)
    assert found, "docs/models.md has no generated models table"
    assert found.group(1).strip() == generated, "re-run `resnetlab models --markdown` into docs/models.md"
    rows = generated.splitlines()[2:]
    assert len(rows) == len(MODELS)
    assert "| `resnet50` | 25.56M | 4.09 | 224 | He et al. 2015" in generated
    assert "| `seresnet50` | 28.09M |" in generated and "Hu et al. 2018" in generated

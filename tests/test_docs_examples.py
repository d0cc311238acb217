"""The Python examples of the user guides run exactly as written, so the guides cannot rot.

Every ```python block of a guide runs, in order and in one namespace (as a reader would paste them),
with the project root's layout around it: ``../shared`` is the shared data folder. Guides keep their
examples at toy scale (a few steps, small inputs); the real runs are the CLI commands of docs/results.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resnetlab.paths import shared_dir

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ("transfer.md", "features.md", "backbones.md", "explain.md")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_every_guide_has_python_examples() -> None:
    for guide in GUIDES:
        assert python_blocks((DOCS / guide).read_text()), guide


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES)
def test_guide_examples_run(guide: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_file) -> None:
    text = (DOCS / guide).read_text()
    code = python_blocks(text)
    for needed in sorted(set(re.findall(r"\.\./shared/([\w./-]+\w)", "".join(code)))):
        shared_file(needed)  # skip on a user's machine, fail in CI
    if "cifar10_akamaster" in "".join(code):  # published weights, offline: from the shared folder
        monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster").resolve()))
    project = tmp_path / "project"
    project.mkdir()
    if shared_dir().exists():
        (tmp_path / "shared").symlink_to(shared_dir().resolve())
    monkeypatch.chdir(project)
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    namespace: dict[str, object] = {"__name__": "__guide__"}
    for number, block in enumerate(code, 1):
        exec(compile(block, f"docs/{guide}, python block {number}", "exec"), namespace)

"""resnetlab's packages form layers, and imports only run down them (read from the source, nothing is imported).

A module may import from its own layer and the layers below it: ``models`` knows nothing of training, data,
exports or the command line; ``transfer``, ``export`` and ``studies`` never reach up into ``cli``. Imports
inside functions and under ``TYPE_CHECKING`` count the same: a lazy import that runs back up is still a
dependency that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "resnetlab"

#: Bottom to top. The top-level name of ``resnetlab.X...``: a package or a module of the package's root.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "io", "paths", "filetypes", "recipes"}),
    frozenset({"__init__", "models", "catalog", "backbones"}),
    frozenset({"data", "explain"}),
    frozenset({"train", "export", "sources", "loading"}),
    frozenset({"backends", "inference"}),
    frozenset({"transfer", "studies"}),
    frozenset({"serve", "benchmark"}),
    frozenset({"cli"}),
)
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """``resnetlab.models.hub`` -> ``models``; ``resnetlab`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_part(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import of resnetlab in ``path`` (or in ``text``, as if it were that file),
    relative ones resolved."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            # `from resnetlab import models` imports resnetlab.models; `from resnetlab import ResNet`, the root
            found += [(node.lineno, f"{module}.{alias.name}" if module == "resnetlab" and _is_part(alias.name)
                       else module) for alias in node.names]  # fmt: skip
    return [(line, module) for line, module in found if module == "resnetlab" or module.startswith("resnetlab.")]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer() -> None:
    units = {_unit(".".join(("resnetlab", *p.relative_to(PACKAGE).with_suffix("").parts))) for p in _sources()}
    assert units - set(LAYER) == set(), "add the new module or package to LAYERS"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_run_down_the_layers(path: Path) -> None:
    own = _unit(".".join(("resnetlab", *path.relative_to(PACKAGE).with_suffix("").parts)))
    upward = [f"line {line}: {module} ({_unit(module)} is above {own})"
              for line, module in _imports(path) if LAYER.get(_unit(module), -1) > LAYER[own]]  # fmt: skip
    assert upward == []


def test_the_layering_check_sees_lazy_relative_and_type_checking_imports() -> None:
    text = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from resnetlab.cli.common import x\n"
        "def f():\n    from ..cli import main\n    import resnetlab.serve.app\n"
        "from resnetlab import cli\n"
    )
    found = sorted(module for _, module in _imports(PACKAGE / "transfer" / "probe.py", text))
    assert found == ["resnetlab.cli", "resnetlab.cli", "resnetlab.cli.common", "resnetlab.serve.app"]

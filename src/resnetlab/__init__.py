"""resnetlab: the complete, faithful ResNet toolkit for PyTorch.

The model API below is imported on first use (PEP 562), so that ``resnetlab --help`` and
``resnetlab --version`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "ResNet", "ResNetConfig", "__version__", "create_model", "from_pretrained", "list_models",
    "model_info", "save_pretrained",
]  # fmt: skip

if TYPE_CHECKING:
    from resnetlab.models import (
        ResNet,
        ResNetConfig,
        create_model,
        from_pretrained,
        list_models,
        model_info,
        save_pretrained,
    )


def __getattr__(name: str) -> Any:
    """``resnetlab.create_model`` etc. from ``resnetlab.models``; ``resnetlab.<submodule>`` imports it."""
    if name in __all__:
        return getattr(importlib.import_module("resnetlab.models"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

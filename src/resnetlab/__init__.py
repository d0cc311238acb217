"""resnetlab: the complete, faithful ResNet toolkit for PyTorch."""

from resnetlab.models import (
    ResNet,
    ResNetConfig,
    create_model,
    from_pretrained,
    list_models,
    model_info,
    save_pretrained,
)

__version__ = "0.1.0"
__all__ = [
    "ResNet", "ResNetConfig", "__version__", "create_model", "from_pretrained", "list_models",
    "model_info", "save_pretrained",
]  # fmt: skip

"""What a fine-tuning run trains: frozen stages, BatchNorm mode, per-stage learning rates, gradual unfreezing.

A ResNet is seen as an ordered list of *parts* (``resnetlab.train.params.model_parts``): ``stem``,
``layer1`` .. ``layerN``, ``head``. Strategies freeze a prefix of that list; discriminative learning rates
scale each part's lr by ``lr_decay ** (distance from the head)`` (``parameter_groups``), as in ULMFiT.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet
from resnetlab.models.layers import is_norm
from resnetlab.train.params import model_parts, parameter_groups

__all__ = ["BN_MODES", "MODES", "FinetuneStrategy", "apply_strategy", "model_parts", "parameter_groups"]

MODES = ("linear", "partial", "full")
BN_MODES = ("train", "eval", "frozen")


@dataclass(frozen=True)
class FinetuneStrategy:
    """How to fine-tune.

    mode: ``linear`` (only the new head trains: a linear probe), ``partial`` (the stem and the first
        ``freeze_stages`` stages stay frozen) or ``full`` (everything trains).
    bn: ``train`` (normal BatchNorm), ``eval`` (running statistics kept from pretraining, affine trains),
        ``frozen`` (statistics and affine both fixed). Norm layers of frozen parts are always in eval mode.
    lr_decay: discriminative learning rates; part ``i`` steps below the head uses ``lr * lr_decay**i``.
    unfreeze_every: gradual unfreezing; start with the head only and unfreeze one more part, from the
        top, every this many epochs, down to what ``mode`` allows (0 = off).
    """

    mode: str = "full"
    freeze_stages: int = 0
    bn: str = "train"
    lr_decay: float = 1.0
    unfreeze_every: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"fine-tuning mode {self.mode!r} is not one of {MODES}")
        if self.bn not in BN_MODES:
            raise ConfigError(f"bn mode {self.bn!r} is not one of {BN_MODES}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.freeze_stages < 0 or self.unfreeze_every < 0:
            raise ConfigError("freeze_stages and unfreeze_every must be >= 0")
        if self.mode == "partial" and self.freeze_stages == 0:
            raise ConfigError("mode 'partial' needs freeze_stages >= 1 (how many stages stay frozen)")

    def first_trainable(self, model: ResNet) -> int:
        """Index in ``model_parts`` of the lowest part this strategy ever trains."""
        parts = len(model.stage_names) + 2
        if self.mode == "linear":
            return parts - 1
        if self.mode == "partial":
            if self.freeze_stages > len(model.stage_names):
                raise ConfigError(f"freeze_stages={self.freeze_stages}, but {model.name} has "
                                  f"{len(model.stage_names)} stages")  # fmt: skip
            return 1 + self.freeze_stages
        return 0

    def first_trainable_at(self, model: ResNet, epoch: int) -> int:
        """The lowest trainable part at ``epoch`` (gradual unfreezing moves it down over time)."""
        floor = self.first_trainable(model)
        if not self.unfreeze_every:
            return floor
        head = len(model.stage_names) + 1
        return max(floor, head - epoch // self.unfreeze_every)


def apply_strategy(model: ResNet, strategy: FinetuneStrategy, epoch: int = 0) -> list[str]:
    """Set ``requires_grad`` and norm-layer modes for ``epoch``; call it after every ``model.train()``.

    Returns the names of the parts that train.
    """
    first = strategy.first_trainable_at(model, epoch)
    trainable = []
    for index, (name, modules) in enumerate(model_parts(model)):
        trains = index >= first
        if trains:
            trainable.append(name)
        for module in modules:
            for sub in module.modules():
                norm = is_norm(sub)
                for p in sub.parameters(recurse=False):
                    p.requires_grad_(trains and not (norm and strategy.bn == "frozen" and name != "head"))
                if norm and (not trains or strategy.bn != "train") and name != "head":
                    sub.eval()
    return trainable

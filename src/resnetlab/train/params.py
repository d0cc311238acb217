"""Which parameters an optimizer sees, in which groups: the one ``parameter_groups`` of the project.

A ResNet is seen as an ordered list of *parts*: ``stem``, ``layer1`` .. ``layerN``, ``head`` (final norm
and classifier). Fine-tuning strategies freeze a prefix of that list and give each part its own lr
(discriminative learning rates, ULMFiT: Howard & Ruder, 2018); plain training uses one part.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from resnetlab.models import ResNet
from resnetlab.models.layers import is_norm

_STEM_MODULES = ("conv1", "bn1", "relu", "maxpool")
_HEAD_MODULES = ("final_norm", "final_act", "dropout", "fc")


def model_parts(model: ResNet) -> list[tuple[str, list[nn.Module]]]:
    """``[("stem", ...), ("layer1", ...), ..., ("head", ...)]``: the units that are frozen or get an lr."""
    stem = [getattr(model, name) for name in _STEM_MODULES]
    head = [getattr(model, name) for name in _HEAD_MODULES]
    return [("stem", stem), *((name, [getattr(model, name)]) for name in model.stage_names), ("head", head)]


def parameter_groups(model: ResNet, lr: float, weight_decay: float, lr_decay: float = 1.0, *,
                     no_decay_norm_bias: bool = False,
                     no_decay_norm: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Optimizer groups holding every parameter of ``model``, named.

    ``lr_decay < 1``: one group per part (``model_parts``) with lr ``lr * lr_decay ** (distance from the
    head)``; else one group (``"all"``). ``no_decay_norm_bias``: each group is split, and its 1-D tensors
    (norm weights and biases) get no weight decay (``"<part>/no_decay"``), as in timm; ``no_decay_norm``: only
    the parameters of normalisation layers get none (torchvision's ``--norm-weight-decay 0``).

    Frozen parameters are included: they get no gradient, so the optimizer skips them (no update, no
    weight decay), and a strategy that unfreezes them later needs no new optimizer.
    """
    parts = model_parts(model) if lr_decay != 1 else [("all", [model])]
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    exempt = (lambda p: p.ndim <= 1) if no_decay_norm_bias else (lambda p: id(p) in norm_params)
    groups = []
    for index, (name, modules) in enumerate(parts):
        params = [p for m in modules for p in m.parameters()]
        scaled = lr * lr_decay ** (len(parts) - 1 - index)
        split = [(name, params, weight_decay)]
        if no_decay_norm_bias or no_decay_norm:
            split = [(name, [p for p in params if not exempt(p)], weight_decay),
                     (f"{name}/no_decay", [p for p in params if exempt(p)], 0.0)]  # fmt: skip
        groups += [{"params": ps, "lr": scaled, "weight_decay": wd, "name": n} for n, ps, wd in split if ps]
    return groups

"""Putting a state dict (in resnetlab's layout) into a model: adapting what can be adapted (another head, another
number of input channels), explaining what cannot."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from resnetlab.errors import WeightsError
from resnetlab.models.state_dicts import StateDict


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight (O, C, k, k) to ``in_chans`` inputs.

    One channel: sum over the colour channels (a grey image is R=G=B). N channels: repeat the filters
    cyclically and rescale by C/N so activations keep their magnitude.
    """
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // src)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (src / in_chans)


def first_conv_key(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise WeightsError("model has no convolution")


def load_weights(model: nn.Module, sd: StateDict, *, origin: str = "checkpoint", strict: bool = True) -> None:
    """Load converted weights, adapting what can be adapted and explaining what cannot.

    - a head for another number of classes is dropped (the model keeps its fresh head), with a warning;
    - a first conv for another number of input channels is adapted (``adapt_input_conv``);
    - any other shape mismatch, missing or unexpected key raises ``WeightsError`` naming the tensors.
    """
    own = model.state_dict()
    sd = dict(sd)
    head_keys = [k for k in ("fc.weight", "fc.bias") if k in sd]
    if head_keys and ("fc.weight" not in own or own["fc.weight"].shape != sd["fc.weight"].shape):
        classes = sd["fc.weight"].shape[0]
        warnings.warn(
            f"{origin}: classifier for {classes} classes does not fit this model's head; "
            "the head is re-initialised (fine-tune it)",
            stacklevel=2,
        )
        for k in head_keys:
            del sd[k]
    conv_key = first_conv_key(model)
    if conv_key in sd and conv_key in own and sd[conv_key].shape[1] != own[conv_key].shape[1]:
        sd[conv_key] = adapt_input_conv(sd[conv_key], own[conv_key].shape[1])
    mismatched = [  # in the model's order, so the first message names the first layer that differs
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if mismatched:
        raise WeightsError(
            f"{origin} does not fit {getattr(model, 'name', type(model).__name__)}: "
            + "; ".join(mismatched[:5]) + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
            + ". Is it a checkpoint of another architecture?"
        )  # fmt: skip
    own_extra = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in sd and k not in own_extra and not k.startswith("fc.")]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{origin} does not match {getattr(model, 'name', type(model).__name__)}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Is it a checkpoint of another architecture or depth?"
        )
    model.load_state_dict(sd, strict=False)

"""``ResNet``: one network class for the whole family, built from a ``ResNetConfig``.

Layout (and so state-dict keys) follows torchvision: ``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` .. ``layerN``, ``avgpool``, ``fc``; pre-activation nets add ``final_norm`` before the pool.
The interface follows timm: ``forward_features``, ``forward_head``, ``reset_classifier``,
``feature_info`` and ``forward_intermediates``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from resnetlab.errors import InputError
from resnetlab.models.attention import get_attention
from resnetlab.models.blocks import BLOCKS, BlockSpec, ResidualBlock
from resnetlab.models.config import ResNetConfig
from resnetlab.models.layers import ANTI_ALIAS, CONV_LAYERS, get_norm_layer, is_norm
from resnetlab.models.shortcuts import make_shortcut
from resnetlab.models.stems import STEM_STRIDE, make_stem


class ResNet(nn.Module):
    """A residual network (or its plain twin) as described by ``config``."""

    def __init__(self, config: ResNetConfig, name: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name or "resnet"
        norm_layer = get_norm_layer(config.norm_layer)
        block_cls = BLOCKS[(config.block, config.preact)]
        conv_layer = CONV_LAYERS[config.conv_layer]
        attention = get_attention(config.attention, config.attention_ratio)

        for attr, module in make_stem(
            config.stem, config.in_chans, config.stem_channels, norm_layer, config.preact,
            conv=conv_layer, pool=config.stem_pool, anti_alias=config.anti_alias,
        ).items():  # fmt: skip
            self.add_module(attr, module)
        self.feature_info: list[dict[str, Any]] = [
            dict(num_chs=config.stem_channels, reduction=STEM_STRIDE[config.stem], module="maxpool")
        ]

        total_blocks = sum(config.layers)
        in_channels, reduction, dilation, block_index = config.stem_channels, STEM_STRIDE[config.stem], 1, 0
        self.stage_names: list[str] = []
        for stage_index, (num_blocks, planes, stride) in enumerate(
            zip(config.layers, config.widths, config.stage_strides), start=1
        ):
            previous_dilation = dilation
            if config.output_stride is not None and reduction * stride > config.output_stride:
                dilation, stride = dilation * stride, 1
            reduction *= stride
            blocks = []
            for i in range(num_blocks):
                spec = BlockSpec(
                    norm_layer=norm_layer,
                    use_shortcut=config.shortcut != "none",
                    groups=config.groups,
                    width_per_group=config.width_per_group,
                    dilation=dilation,
                    first_dilation=previous_dilation if i == 0 else dilation,
                    drop_path_rate=config.drop_path_rate * block_index / max(total_blocks - 1, 1),
                    dropout=config.block_dropout,
                    stride_in_1x1=config.stride_in_1x1,
                    conv_layer=conv_layer,
                    attention=attention,
                    anti_alias=ANTI_ALIAS[config.anti_alias],
                    selective_kernel=config.selective_kernel,
                )
                block_stride = stride if i == 0 else 1
                out_channels = planes * block_cls.expansion
                shortcut = make_shortcut(
                    config.shortcut, in_channels, out_channels, block_stride, norm_layer,
                    avg_down=config.avg_down, preact=config.preact, conv=conv_layer,
                )  # fmt: skip
                blocks.append(block_cls(in_channels, planes, block_stride, shortcut, spec))
                in_channels, block_index = out_channels, block_index + 1
            name = f"layer{stage_index}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=in_channels, reduction=reduction, module=name))

        self.num_features = in_channels
        self.final_norm = norm_layer(in_channels) if config.preact else nn.Identity()
        self.final_act = nn.ReLU(inplace=True) if config.preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.drop_rate) if config.drop_rate > 0 else nn.Identity()
        self.fc: nn.Module = nn.Linear(in_channels, config.num_classes) if config.num_classes else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    def init_weights(self) -> None:
        """He (fan-out) init for convs, unit norms, and optionally zero-init the last norm of each branch."""
        if next(self.parameters()).is_meta:  # shapes only (model_info): there are no values to initialise
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif is_norm(m) and getattr(m, "weight", None) is not None and isinstance(m.weight, nn.Parameter):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for block in self.blocks():
                block.zero_init_last()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in self.stage_names]

    def blocks(self) -> list[ResidualBlock]:
        """All residual blocks, input to output (what lesion studies iterate over)."""
        return [block for stage in self.stages for block in stage]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """How inputs must be prepared for this model (timm-style metadata)."""
        c = self.config
        return dict(
            input_size=c.input_size, mean=c.mean, std=c.std, crop_pct=c.crop_pct,
            interpolation=c.interpolation, num_classes=c.num_classes,
            label_names=list(c.label_names) if c.label_names else None,
        )  # fmt: skip

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` outputs (0 removes it: the model returns pooled features)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.config = self.config.replace(num_classes=num_classes)

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_chans:
            raise InputError(
                f"{self.name} expects a batch of shape (N, {c.in_chans}, H, W), got {tuple(x.shape)}. "
                f"Convert images to {c.in_chans} channel(s) or build the model with in_chans={x.shape[1]}"
                if x.ndim == 4 else
                f"{self.name} expects a 4-D batch (N, C, H, W), got {x.ndim}-D {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0)"
            )  # fmt: skip
        if min(x.shape[-2:]) < c.total_stride:
            raise InputError(
                f"input {tuple(x.shape[-2:])} is smaller than {self.name}'s total stride {c.total_stride}: "
                f"resize images to at least {c.total_stride} px (default {c.input_size[1]})"
            )

    def _check_input_eagerly(self, x: torch.Tensor) -> None:
        """``check_input`` outside tracing and compilation (data-dependent checks would break a graph)."""
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            self.check_input(x)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if not self.config.preact:
            x = self.relu(self.bn1(x))
        return self.maxpool(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> last feature map (before pooling)."""
        self._check_input_eagerly(x)
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or the pooled features with ``pre_logits=True``)."""
        x = torch.flatten(self.avgpool(x), 1)
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps of the stem (index 0) and stages (1..N), as listed in ``feature_info``.

        ``indices`` is an int (the last n) or a sequence of indices; default all stages.
        Returns ``(final_features, maps)``, or just ``maps`` with ``intermediates_only``.
        """
        wanted = self._resolve_indices(indices)
        self._check_input_eagerly(x)
        maps: list[torch.Tensor] = []
        x = self.forward_stem(x)
        if 0 in wanted:
            maps.append(x)
        last = max(wanted)
        for i, stage in enumerate(self.stages, start=1):
            if intermediates_only and i > last:
                break
            x = stage(x)
            if i in wanted:
                maps.append(x)
        if intermediates_only:
            return maps
        return self.final_act(self.final_norm(x)), maps

    def _resolve_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        count = len(self.feature_info)
        if indices is None:
            return list(range(1, count))
        if isinstance(indices, int):
            return list(range(count - indices, count))
        wanted = [i + count if i < 0 else i for i in indices]
        bad = [i for i in wanted if not 0 <= i < count]
        if bad:
            raise InputError(f"feature indices {bad} out of range: this model has indices 0..{count - 1}")
        return sorted(set(wanted))


class FeatureExtractor(nn.Module):
    """Features-only view of a ResNet: returns the feature maps at ``out_indices`` as a list.

    It takes ownership of ``model`` and removes its classifier (the features never reach it).
    """

    def __init__(self, model: ResNet, out_indices: Sequence[int] = (1, 2, 3, 4)) -> None:
        super().__init__()
        model.reset_classifier(0)
        self.model = model
        self.out_indices = model._resolve_indices(out_indices)
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    @property
    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)

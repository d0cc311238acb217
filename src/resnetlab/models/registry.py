"""Named architectures as data: each row is a set of ``ResNetConfig`` overrides plus provenance.

``MODELS`` is the single source of truth for ``create_model``, ``list_models``, ``model_info`` and the
parameter-count tests (``reference_params`` is the figure published by the paper or torchvision).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from resnetlab.errors import UnknownModelError, WeightsError
from resnetlab.models.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ResNetConfig


@dataclass(frozen=True)
class WeightsSource:
    """Where published weights for a model live and how to read them.

    ``kind``: "torchvision" (``ref`` = torchvision weights enum, e.g. "ResNet50_Weights.IMAGENET1K_V2"),
    "url" (``ref`` = URL of a file whose name is ``filename``), or "hf_hub" (``ref`` = repo id on the
    Hugging Face hub, ``filename`` inside it). ``format`` names the converter (see ``state_dicts.CONVERTERS``).
    ``config`` overrides preprocessing that the weights were trained with; ``labels`` names the dataset
    whose classes the head predicts ("imagenet-1k", "cifar-10"), so predictions carry class names.
    """

    kind: str
    ref: str
    format: str
    filename: str | None = None
    sha256_prefix: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    labels: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    config: dict[str, Any]
    description: str
    reference_params: float | None = None  # published parameter count
    params_source: str = ""  # "torchvision" (exact) or a paper (rounded to its printed precision)
    weights: dict[str, WeightsSource] = field(default_factory=dict)
    timm_name: str | None = None  # the same architecture in timm, for parity tests and hub weights
    paper: str = ""  # where the architecture comes from (docs/models.md lists it)


PAPERS = {
    "resnet": "He et al. 2015, Deep Residual Learning for Image Recognition",
    "tricks": "He et al. 2019, Bag of Tricks for Image Classification with CNNs",
    "preact": "He et al. 2016, Identity Mappings in Deep Residual Networks",
    "resnext": "Xie et al. 2017, Aggregated Residual Transformations (ResNeXt)",
    "wide": "Zagoruyko & Komodakis 2016, Wide Residual Networks",
    "se": "Hu et al. 2018, Squeeze-and-Excitation Networks",
    "eca": "Wang et al. 2020, ECA-Net: Efficient Channel Attention",
    "sk": "Li et al. 2019, Selective Kernel Networks",
    "rs": "Bello et al. 2021, Revisiting ResNets: Improved Training and Scaling Strategies",
    "bit": "Kolesnikov et al. 2020, Big Transfer (BiT)",
    "aa": "Zhang 2019, Making Convolutional Networks Shift-Invariant Again",
    "gn": "Wu & He 2018, Group Normalization",
    "timm": "timm (Wightman 2019), after He et al. 2019",
}


IMAGENET: dict[str, Any] = dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
CIFAR: dict[str, Any] = dict(
    stem="cifar", stem_channels=16, widths=(16, 32, 64), num_classes=10, input_size=(3, 32, 32),
    mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0,
)  # fmt: skip
BASIC = dict(block="basic")
BOTTLENECK = dict(block="bottleneck")
IMAGENET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}  # fmt: skip
AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
AKAMASTER_FILES = {
    20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th", 110: "resnet110-1d1ed7c2.th", 1202: "resnet1202-f3b1deed.th",
}  # fmt: skip
# He et al. 2015, Table 6 (millions of parameters)
CIFAR_PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}

# The refined ResNets practitioners pick from timm, by timm's name: (source paper, config overrides,
# description with the paper's published ImageNet figure). Each is ResNet-50 (or -18) plus a few options.
RESNET50 = dict(IMAGENET, **BOTTLENECK, layers=IMAGENET_LAYERS[50])
RESNET_D = dict(stem="deep", avg_down=True)  # Bag of Tricks: deep 3x3 stem, average-pool projection
TIMM_RESNETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "seresnet50": ("se", dict(RESNET50, attention="se"),
        "SE-ResNet-50 (Hu et al. 2018, Squeeze-and-Excitation): an SE gate (reduction 16) on every branch; "
        "paper: 23.29% top-1 / 6.62% top-5 error, 224px single crop (their ResNet-50: 24.80%)"),
    "seresnext50_32x4d": ("se", dict(RESNET50, groups=32, width_per_group=4, attention="se"),
        "SE-ResNeXt-50 32x4d (Hu et al. 2018): ResNeXt-50 with SE gates; paper: 21.10% top-1 / 5.49% top-5 "
        "error (their ResNeXt-50: 22.11%)"),
    "ecaresnet50d": ("eca", dict(RESNET50, **RESNET_D, attention="eca"),
        "ECA-ResNet-50-D (Wang et al. 2020, ECA-Net): efficient channel attention (a 1-D conv, no reduction) "
        "on a ResNet-50-D; paper (ECA on ResNet-50): 77.48% top-1, +80 parameters"),
    "skresnet18": ("sk", dict(IMAGENET, **BASIC, layers=IMAGENET_LAYERS[18], selective_kernel=True),
        "SK-ResNet-18 (Li et al. 2019, Selective Kernel Networks): the first 3x3 of each block is a "
        "selective-kernel conv (3x3 and dilated 3x3 paths, timm's split input); the paper reports SKNet-50 "
        "(ResNeXt-50 based): 20.79% top-1 error; it has no ResNet-18 variant"),
    "resnetrs50": ("rs", dict(RESNET50, **RESNET_D, stem_pool="conv", attention="se", attention_ratio=0.25),
        "ResNet-RS-50 (Bello et al. 2021, Revisiting ResNets): ResNet-D, SE (reduction 4), strided-conv "
        "stem pool; paper: 78.8% top-1 at 160px (trained with its improved recipe)"),
    "resnetv2_50x1_bit": ("bit", dict(RESNET50, preact=True, norm_layer="groupnorm", conv_layer="std_conv",
                               stem_pool="bit", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        "BiT ResNetV2-50x1 (Kolesnikov et al. 2020, Big Transfer): pre-activation, GroupNorm (32) and "
        "weight-standardised convs; paper: BiT-L (R152x4, JFT-300M) 87.5% top-1 on ILSVRC-2012"),
    "resnetaa50d": ("aa", dict(RESNET50, **RESNET_D, anti_alias="avg"),
        "ResNet-50-D with anti-aliased downsampling (Zhang 2019) by 2x2 average pooling before each "
        "subsampling (timm's 'aa'); paper (blur filters on ResNet-50): 76.2% -> 77.0% top-1"),
    "resnetblur50": ("aa", dict(RESNET50, anti_alias="blur"),
        "ResNet-50 with blur-pool anti-aliasing (Zhang 2019, Making Convolutional Networks Shift-Invariant "
        "Again): a 3x3 binomial filter before each subsampling; paper: 76.2% -> 77.0% top-1 (3x3 filter)"),
    "resnet50t": ("timm", dict(RESNET50, stem="deep_tiered", avg_down=True),
        "ResNet-50-T (timm): tiered deep stem 24-32-64 and average-pool projection, a variant of the "
        "ResNet-C/D of Bag of Tricks (He et al. 2019); no paper or published figure of its own"),
    "resnet50s": ("timm", dict(RESNET50, stem="deep", stem_channels=128),
        "ResNet-50-S (GluonCV's ResNetV1s): deep stem 64-64-128, strided projection; no paper or published "
        "figure of its own"),
    "resnet50_gn": ("gn", dict(RESNET50, norm_layer="groupnorm"),
        "ResNet-50 with GroupNorm, 32 groups (Wu & He 2018, Group Normalization); paper: 24.1% top-1 error "
        "at 32 images/GPU (BatchNorm: 23.6%), unchanged at 2 images/GPU (BatchNorm: 34.7%)"),
}  # fmt: skip
# Their weights on the Hugging Face hub (timm/<name>.<tag>), with the preprocessing each was trained for
# (timm's pretrained_cfg: interpolation, crop_pct, input_size, mean/std, and the head's classes).
HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TIMM_HUB_WEIGHTS: dict[str, dict[str, dict[str, Any]]] = {
    "seresnet50": {"a1_in1k": dict(crop_pct=0.95), "a2_in1k": dict(crop_pct=0.95),
                   "a3_in1k": dict(input_size=(3, 160, 160), crop_pct=0.95), "ra2_in1k": {}},
    "seresnext50_32x4d": {"racm_in1k": {}, "gluon_in1k": {}},
    "ecaresnet50d": {"miil_in1k": {}},
    "skresnet18": {"ra_in1k": {}},
    "resnetrs50": {"tf_in1k": dict(input_size=(3, 160, 160), crop_pct=0.91)},
    "resnetv2_50x1_bit": {
        "goog_in21k_ft_in1k": dict(HALF, input_size=(3, 448, 448), crop_pct=1.0, interpolation="bilinear"),
        "goog_distilled_in1k": dict(HALF),
        "goog_in21k": dict(HALF, interpolation="bilinear", num_classes=21843),
    },
    "resnetaa50d": {"sw_in12k_ft_in1k": dict(crop_pct=0.95), "sw_in12k": dict(crop_pct=0.95, num_classes=11821),
                    "d_in12k": dict(crop_pct=0.95, num_classes=11821)},
    "resnetblur50": {"bt_in1k": {}},
    "resnet50s": {"gluon_in1k": {}},
    "resnet50_gn": {"a1h_in1k": dict(crop_pct=0.94)},
}  # fmt: skip
TIMM_KEY_LAYOUT = {"resnetv2_50x1_bit": "timm_v2", "skresnet18": "timm_sk"}  # converter; others: "timm" (ours)


def _torchvision_weights(enum: str) -> dict[str, WeightsSource]:
    return {"tv_in1k": WeightsSource("torchvision", enum, "torchvision", description=f"torchvision {enum}")}


def _timm_hub_weights(name: str, tag: str, preprocessing: dict[str, Any]) -> WeightsSource:
    """timm's ``name.tag`` on the Hugging Face hub; ImageNet-1k class names unless the head has other classes."""
    config = {"interpolation": "bicubic", "crop_pct": 0.875, **preprocessing}
    return WeightsSource(
        "hf_hub", f"timm/{name}.{tag}", TIMM_KEY_LAYOUT.get(name, "timm"), "model.safetensors", config=config,
        description=f"timm {name}.{tag}", labels=None if "num_classes" in config else "imagenet-1k",
    )  # fmt: skip


def _imagenet_block(depth: int) -> dict[str, Any]:
    return BOTTLENECK if depth >= 50 else BASIC


def _build_table() -> dict[str, ModelEntry]:
    table: dict[str, ModelEntry] = {}
    weights_enum = {18: "V1", 34: "V1", 50: "V2", 101: "V2", 152: "V2"}
    for depth, layers in IMAGENET_LAYERS.items():
        base = dict(IMAGENET, layers=layers, **_imagenet_block(depth))
        name = f"resnet{depth}"
        table[name] = ModelEntry(
            base, f"ResNet-{depth} (He et al. 2015), stride in the 3x3 (v1.5, torchvision)",
            TORCHVISION_PARAMS[name], "torchvision",
            _torchvision_weights(f"ResNet{depth}_Weights.IMAGENET1K_{weights_enum[depth]}"), name,
            paper=PAPERS["resnet"],
        )  # fmt: skip
        table[f"resnet{depth}d"] = ModelEntry(
            dict(base, stem="deep", avg_down=True),
            f"ResNet-{depth}-D (Bag of Tricks): deep 3x3 stem, average-pool projection shortcut",
            weights={"timm_in1k": WeightsSource("hf_hub", f"timm/resnet{depth}d.ra2_in1k", "timm",
                                                "model.safetensors", labels="imagenet-1k")},
            timm_name=f"resnet{depth}d", paper=PAPERS["tricks"],
        )  # fmt: skip
        table[f"preact_resnet{depth}"] = ModelEntry(
            dict(base, preact=True),
            f"Pre-activation ResNet-{depth} (He et al. 2016, identity mappings); timm's resnetv2_{depth}",
            timm_name=f"resnetv2_{depth}",
            paper=PAPERS["preact"],
        )
    table["resnet50c"] = ModelEntry(
        dict(table["resnet50"].config, stem="deep"), "ResNet-50-C (Bag of Tricks): deep 3x3 stem",
        timm_name="resnet50c", paper=PAPERS["tricks"],
    )  # fmt: skip
    table["preact_resnet50"].weights["timm_in1k"] = WeightsSource(
        "hf_hub", "timm/resnetv2_50.a1h_in1k", "timm", "model.safetensors", labels="imagenet-1k"
    )
    table["resnet50"].weights["hf_in1k"] = WeightsSource(
        "hf_hub", "microsoft/resnet-50", "hf", "model.safetensors",
        description="Hugging Face transformers microsoft/resnet-50", labels="imagenet-1k",
    )  # fmt: skip
    for name, layers, groups, width, enum in (
        ("resnext50_32x4d", IMAGENET_LAYERS[50], 32, 4, "ResNeXt50_32X4D_Weights.IMAGENET1K_V2"),
        ("resnext101_32x8d", IMAGENET_LAYERS[101], 32, 8, "ResNeXt101_32X8D_Weights.IMAGENET1K_V2"),
        ("resnext101_64x4d", IMAGENET_LAYERS[101], 64, 4, "ResNeXt101_64X4D_Weights.IMAGENET1K_V1"),
        ("wide_resnet50_2", IMAGENET_LAYERS[50], 1, 128, "Wide_ResNet50_2_Weights.IMAGENET1K_V2"),
        ("wide_resnet101_2", IMAGENET_LAYERS[101], 1, 128, "Wide_ResNet101_2_Weights.IMAGENET1K_V2"),
    ):
        kind = "ResNeXt (Xie et al. 2017)" if groups > 1 else "Wide ResNet (Zagoruyko & Komodakis 2016)"
        table[name] = ModelEntry(
            dict(IMAGENET, **BOTTLENECK, layers=layers, groups=groups, width_per_group=width),
            f"{kind}, ImageNet layout as in torchvision", TORCHVISION_PARAMS[name], "torchvision",
            _torchvision_weights(enum), name, paper=PAPERS["resnext" if groups > 1 else "wide"],
        )  # fmt: skip

    for name, (paper, config, description) in TIMM_RESNETS.items():
        weights = {tag: _timm_hub_weights(name, tag, pre) for tag, pre in TIMM_HUB_WEIGHTS.get(name, {}).items()}
        table[name] = ModelEntry(config, description, weights=weights, timm_name=name, paper=PAPERS[paper])

    # The paper's CIFAR-10 nets: 6n+2 layers, widths 16/32/64, option-A shortcuts (8 and 14: small members
    # of the same family, handy for quick experiments).
    for depth in (8, 14, *CIFAR_PAPER_PARAMS):
        n = (depth - 2) // 6
        base = dict(CIFAR, **BASIC, layers=(n, n, n), shortcut="A")
        weights = {}
        if depth in AKAMASTER_FILES:
            weights["cifar10_akamaster"] = WeightsSource(
                "url", AKAMASTER_URL + AKAMASTER_FILES[depth], "akamaster", AKAMASTER_FILES[depth],
                sha256_prefix=AKAMASTER_FILES[depth].split("-")[1][:8],
                config=dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                description="published CIFAR-10 weights of akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)",
                labels="cifar-10",
            )  # fmt: skip
        params = CIFAR_PAPER_PARAMS.get(depth)
        table[f"resnet{depth}"] = ModelEntry(
            base, f"CIFAR ResNet-{depth} (He et al. 2015, Sec. 4.2): 3 stages of {n} basic blocks, option A",
            params, "He et al. 2015, Table 6" if params else "", weights, paper=PAPERS["resnet"],
        )  # fmt: skip
    # He et al. 2016 (identity mappings), Table 3/4: pre-activation CIFAR nets, projection shortcuts.
    for depth, block, params in ((110, BASIC, 1.7e6), (164, BOTTLENECK, 1.7e6), (1001, BOTTLENECK, 10.2e6)):
        n = (depth - 2) // (9 if block is BOTTLENECK else 6)
        table[f"preact_resnet{depth}"] = ModelEntry(
            dict(CIFAR, **block, layers=(n, n, n), preact=True),
            f"CIFAR pre-activation ResNet-{depth} (He et al. 2016)", params, "He et al. 2016",
            paper=PAPERS["preact"],
        )  # fmt: skip
    # Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation basic blocks, widths 16k/32k/64k.
    for depth, k, params in ((16, 4, 2.7e6), (16, 8, 11.0e6), (28, 10, 36.5e6), (40, 4, 8.9e6)):
        n = (depth - 4) // 6
        table[f"wrn{depth}_{k}"] = ModelEntry(
            dict(CIFAR, **BASIC, layers=(n, n, n), widths=(16 * k, 32 * k, 64 * k), preact=True),
            f"Wide ResNet WRN-{depth}-{k} (CIFAR); set block_dropout=0.3 for the paper's dropout variant",
            params, "Zagoruyko & Komodakis 2016, Table 1/4", paper=PAPERS["wide"],
        )  # fmt: skip
    # ResNeXt-29 (Xie et al. 2017, Table 7): 3 stages of 3 bottlenecks, 64-channel stem.
    for cardinality, params in ((8, 34.4e6), (16, 68.1e6)):
        table[f"resnext29_{cardinality}x64d"] = ModelEntry(
            dict(CIFAR, **BOTTLENECK, stem_channels=64, widths=(64, 128, 256), layers=(3, 3, 3),
                 groups=cardinality, width_per_group=64),
            f"CIFAR ResNeXt-29, {cardinality}x64d (Xie et al. 2017)", params, "Xie et al. 2017, Table 7",
            paper=PAPERS["resnext"],
        )  # fmt: skip
    # Every net has a plain twin: the same layers without shortcuts (the degradation experiment).
    for name, entry in list(table.items()):
        table[plain_twin_name(name)] = ModelEntry(
            dict(entry.config, shortcut="none"), f"{name} without shortcuts: its plain twin (degradation study)",
            paper=f"{entry.paper} (without shortcuts)",
        )  # fmt: skip
    return table


def plain_twin_name(name: str) -> str:
    """``resnet56`` -> ``plain56``, ``preact_resnet164`` -> ``preact_plain164``, ``wrn28_10`` -> ``plain_wrn28_10``."""
    return name.replace("resnet", "plain") if "resnet" in name else f"plain_{name}"


MODELS: dict[str, ModelEntry] = _build_table()
ALIASES: dict[str, str] = {"resnetv2_50": "preact_resnet50", "resnetv2_101": "preact_resnet101"}


def resolve_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS) + list(ALIASES), n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} See `resnetlab models` for all names.")
    return name


def get_config(name: str, **overrides: Any) -> ResNetConfig:
    """The config of a named model with ``overrides`` applied (unknown keys fail with the valid ones)."""
    return ResNetConfig().replace(**MODELS[resolve_name(name)].config).replace(**overrides)


def torchvision_weights(name: str) -> tuple[str, WeightsSource]:
    """Our architecture and the source of a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``),
    or a ``WeightsError`` listing the names torchvision has for that architecture."""
    from torchvision.models import get_model_weights

    enum_name, _, member = name.partition(".")
    arch = resolve_name(enum_name.removesuffix("_Weights").lower())
    try:
        members = list(get_model_weights(arch).__members__)
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights for {arch} ({name}); pass a weights file with "
                           f"--model {arch} instead") from None  # fmt: skip
    if member not in members:
        valid = ", ".join(f"{enum_name}.{m}" for m in members)
        raise WeightsError(f"{name} is not a torchvision weights name; {arch} has: {valid}")
    return arch, WeightsSource("torchvision", name, "torchvision", description=f"torchvision {name}")


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names matching a shell-style pattern, e.g. ``list_models("resnet*d")``; with ``pretrained=True``
    only those with published weights (``MODELS[name].weights``)."""
    names = (n for n in MODELS if fnmatch.fnmatch(n, pattern) and (MODELS[n].weights or not pretrained))
    return sorted(names, key=_natural_key)


def _natural_key(name: str) -> list[Any]:
    """Sort resnet18 < resnet34 < resnet101 rather than alphabetically."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

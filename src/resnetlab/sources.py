"""``resolve_source`` and ``load_model``: the one place that turns what a user points at into a model.

A source (``--from``) is one of ``KINDS``:

- ``model-dir``: a ``save_pretrained`` folder, or a run folder's ``model/``;
- ``checkpoint``: a training checkpoint (``checkpoints/last.pt``; also a run folder without a model yet);
- ``export``: an exported artifact with its ``.json`` sidecar (ONNX, TFLite; TorchScript and .pt2 are
  programs and load only with ``allow_program=True``);
- ``published``: a published weights file (the CIFAR ``.th`` of akamaster, ...), recognised by its sha256
  in the model registry, which gives its architecture, preprocessing and class names;
- ``weights``: any other weights file (torchvision, timm, Hugging Face layouts): the architecture must be
  named, and the preprocessing is the architecture's default (a warning says so);
- ``name``: a model name with a weights tag (``resnet20:cifar10_akamaster``, or ``pretrained=``), or with
  ``random_init=True``: a bare name never silently means random weights;
- ``torchvision``: a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``).

Files are classified by their content (``filetypes``), which must agree with their extension. Every consumer
(predict, eval, serve, export, features, similar, finetune, studies) loads through here, so all accept the
same sources and apply the preprocessing and class names the source carries.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnetlab.errors import ConfigError, WeightsError
from resnetlab.filetypes import CONTENTS, EXTENSIONS, check_content
from resnetlab.models import ResNet, ResNetConfig, create_model, from_pretrained
from resnetlab.models.fit import load_weights
from resnetlab.models.hub import published_weights
from resnetlab.models.pretrained import CONFIG_FILE, read_pretrained_config
from resnetlab.models.registry import MODELS, WeightsSource, resolve_name, torchvision_weights

if TYPE_CHECKING:
    from resnetlab.export import ExportedModel

KINDS = ("model-dir", "checkpoint", "export", "published", "weights", "name", "torchvision")
#: Words of torch's own error messages that suggest unpickling code; never shown to a user.
UNSAFE_HINTS = ("weights_only", "can still be loaded", "trust the source")


@dataclass(frozen=True)
class Source:
    """A resolved source: its kind (see ``KINDS``), what the user wrote, and what to load.

    ``name`` is the architecture where the source does not describe itself (names, weights files);
    ``weights`` the tag, ``True`` (the name's default tag) or weights path of a ``name`` source.
    """

    kind: str
    text: str
    path: Path | None = None
    name: str | None = None
    weights: str | bool | None = None

    @property
    def describes_itself(self) -> bool:
        """True when the source records its architecture, preprocessing and labels."""
        return self.kind in ("model-dir", "checkpoint", "export", "published")

    def load(self, *, allow_program: bool = False, random_init: bool = False, threads: int | None = None,
             **overrides: Any) -> ResNet | ExportedModel:  # fmt: skip
        """The model. ``allow_program``: load TorchScript/.pt2 exports (they run code they carry);
        ``random_init``: a bare name builds an untrained model; ``overrides``: ``ResNetConfig`` fields."""
        try:
            return LOADERS[self.kind](self, allow_program, random_init, threads, overrides)
        except WeightsError as err:
            if any(hint in str(err) for hint in UNSAFE_HINTS):
                raise WeightsError(f"{self.text} holds objects other than tensors, which resnetlab does not "
                                   "load: it never unpickles code. Re-save the weights with "
                                   "torch.save(model.state_dict(), ...) or as safetensors") from None  # fmt: skip
            raise

    def load_resnet(self, **options: Any) -> ResNet:
        """The PyTorch model (studies, export and fine-tuning need its modules, not an exported artifact)."""
        if self.kind == "export":
            raise ConfigError(f"{self.text} is an exported artifact; this needs the PyTorch model: pass the run "
                              "or model folder it was exported from (or its checkpoint)")  # fmt: skip
        model = self.load(**options)
        assert isinstance(model, ResNet)
        return model

    def training_config(self) -> dict[str, Any] | None:
        """The training config recorded with the source (its data, val split, seed), or None when it has none."""
        if self.kind == "model-dir":
            recorded = read_pretrained_config(self.path).get("trained_with")  # type: ignore[arg-type]
            return dict(recorded) if isinstance(recorded, dict) else None
        if self.kind == "checkpoint":
            from resnetlab.train.checkpoint import load_checkpoint

            return dict(load_checkpoint(self.path).get("config") or {}) or None  # type: ignore[arg-type]
        return None

    def trained_with(self, verb: str) -> dict[str, Any]:
        """The recorded training config (its ``data`` None: the digits demo), or a ``ConfigError`` saying that
        ``verb`` needs ``--data`` when the source does not record the data it was trained on."""
        recorded = self.training_config()
        if recorded is None or "data" not in recorded:
            raise ConfigError(f"{verb} needs --data: {self.text} does not record the data it was trained on "
                              "(e.g. --data cifar10, an ImageFolder folder or archive)")  # fmt: skip
        return recorded


def resolve_source(source: str | os.PathLike, *, pretrained: str | bool | None = None,
                   model: str | None = None) -> Source:  # fmt: skip
    """What ``source`` is (see ``KINDS``), decided from the file system and file contents; nothing is loaded.

    ``pretrained``: a weights tag, ``True`` (the default tag) or a weights file/folder for a model name;
    ``model``: the architecture of a weights file that is not a published one."""
    text, path = str(source), Path(source).expanduser()
    if path.exists() or path.is_symlink():
        if pretrained not in (None, False):
            raise ConfigError(f"--pretrained goes with a model name, not with {text}: drop one of them")
        return _resolve_path(text, path, model)
    if "_Weights." in text:
        return Source("torchvision", text, name=torchvision_weights(text)[0])
    if model is not None and text in MODELS[resolve_name(model)].weights:  # a weights tag of the named model
        return Source("name", text, name=resolve_name(model), weights=text)
    name, _, tag = text.partition(":")
    if os.sep in text or "/" in text or Path(text).suffix.lower() in EXTENSIONS:
        raise WeightsError(f"{text} does not exist (expected a run folder, model folder, checkpoint, exported "
                           "model, weights file or a model name)")  # fmt: skip
    if tag and pretrained not in (None, False):
        raise ConfigError(f"{text} names its weights tag already; drop --pretrained {pretrained}")
    return Source("name", text, name=resolve_name(name), weights=tag or pretrained or None)


def _resolve_path(text: str, path: Path, model: str | None) -> Source:
    from resnetlab.export.artifacts import sidecar

    if path.is_dir():
        for folder in (path / "model", path):
            if (folder / CONFIG_FILE).is_file():
                return Source("model-dir", text, folder)
        if sidecar(path).is_file():  # a Core ML package
            return Source("export", text, path)
        if (path / "checkpoints" / "last.pt").is_file():
            return Source("checkpoint", text, path / "checkpoints" / "last.pt")
        raise WeightsError(f"{path} holds neither a model (config.json + model.safetensors) nor a training run")
    if not path.is_file():
        raise WeightsError(f"{path} is not a regular file (a pipe, device or dangling link); pass a model file")
    if sidecar(path).is_file():
        return Source("export", text, path)  # its content is checked against the sidecar when it loads
    content = check_content(path)
    if content == "checkpoint":
        return Source("checkpoint", text, path, name=resolve_name(model) if model else None)
    if content not in ("torch", "safetensors"):
        raise WeightsError(
            f"{path} is {CONTENTS[content]} without its metadata file {sidecar(path).name}, "
            "which holds its preprocessing and class names; re-export it with `resnetlab export`"
        )
    known = published_weights(path)
    if known is not None:
        return Source("published", text, path, name=known[0], weights=known[1])
    return Source("weights", text, path, name=resolve_name(model) if model else None)


# ---------------------------------------------------------------------------- loaders, one per kind
Options = dict[str, Any]


def _load_model_dir(src: Source, allow_program: bool, random_init: bool, threads: int | None,
                    overrides: Options) -> ResNet:  # fmt: skip
    return from_pretrained(src.path, **overrides)  # type: ignore[arg-type]


def _load_checkpoint(src: Source, allow_program: bool, random_init: bool, threads: int | None,
                     overrides: Options) -> ResNet:  # fmt: skip
    from resnetlab.train.checkpoint import load_checkpoint

    state = load_checkpoint(src.path)  # type: ignore[arg-type]
    if "model_config" not in state:
        raise WeightsError(f"{src.path} is a checkpoint without a model description")
    config = ResNetConfig.from_dict(state["model_config"]).replace(**overrides)
    model = ResNet(config, name=state.get("architecture") or "resnet")
    if src.name is not None and model.name != src.name:
        raise WeightsError(f"{src.path} is a checkpoint of {model.name}, not {src.name}; drop --model or pass "
                           f"--model {model.name}")  # fmt: skip
    load_weights(model, state["model"], origin=str(src.path))
    return model


def _load_export(src: Source, allow_program: bool, random_init: bool, threads: int | None,
                 overrides: Options) -> ExportedModel:  # fmt: skip
    from resnetlab.export import ExportedModel

    if overrides:
        raise ConfigError(f"{src.text} is an exported artifact: its config ({', '.join(overrides)}) cannot change")
    return ExportedModel(src.path, threads, allow_program=allow_program)  # type: ignore[arg-type]


def _load_weights_file(src: Source, allow_program: bool, random_init: bool, threads: int | None,
                       overrides: Options) -> ResNet:  # fmt: skip
    """A published file (its architecture, preprocessing and labels come from the registry) or a file of the
    architecture ``src.name``."""
    if src.name is None:
        raise WeightsError(f"{src.path} holds weights without their architecture (it is not a resnetlab checkpoint "
                           f"nor a published file resnetlab knows); name it: --from resnet50 --pretrained "
                           f"{src.path} (finetune: --model resnet50)")  # fmt: skip
    return _as_resnet(create_model(src.name, pretrained=src.path, **overrides))


def _load_name(src: Source, allow_program: bool, random_init: bool, threads: int | None,
               overrides: Options) -> ResNet:  # fmt: skip
    assert src.name is not None
    tags = MODELS[src.name].weights
    if src.weights is None:
        if not random_init:
            hint = f"--pretrained {next(iter(tags))} (its published weights), " if tags else ""
            raise ConfigError(f"{src.name} names an architecture without weights: its predictions would be random. "
                              f"Pass {hint}a run folder, model folder or weights file, or --random-init "
                              "(random_init=True) to use untrained weights on purpose")  # fmt: skip
        return _as_resnet(create_model(src.name, **overrides))
    if random_init:
        raise ConfigError(f"--random-init and weights ({src.weights}) contradict each other; drop one")
    weights = src.weights
    if weights is True or weights == "default":
        if not tags:
            raise WeightsError(f"no published weights are known for {src.name}; pass a weights file")
        weights = next(iter(tags))
        warnings.warn(f"{src.name}: using its default weights {weights!r} ({_describe(tags[weights])})", stacklevel=3)
    return _as_resnet(create_model(src.name, pretrained=weights, **overrides))


def _load_torchvision(src: Source, allow_program: bool, random_init: bool, threads: int | None,
                      overrides: Options) -> ResNet:  # fmt: skip
    assert src.name is not None
    return _as_resnet(create_model(src.name, pretrained=src.text, **overrides))


LOADERS = {"model-dir": _load_model_dir, "checkpoint": _load_checkpoint, "export": _load_export,
           "published": _load_weights_file,
           "weights": _load_weights_file, "name": _load_name, "torchvision": _load_torchvision}  # fmt: skip


def _describe(weights: WeightsSource) -> str:
    return weights.description or f"{weights.kind} {weights.ref}"


def _as_resnet(model: Any) -> ResNet:
    assert isinstance(model, ResNet)
    return model


def load_model(source: str | os.PathLike, *, pretrained: str | bool | None = None, model: str | None = None,
               allow_program: bool = False, random_init: bool = False, threads: int | None = None,
               **overrides: Any) -> ResNet | ExportedModel:  # fmt: skip
    """``resolve_source(source, ...).load(...)``: the model a source names (see the module doc)."""
    return resolve_source(source, pretrained=pretrained, model=model).load(
        allow_program=allow_program, random_init=random_init, threads=threads, **overrides
    )


def common_data(sources: list[Source], data: str | None, verb: str) -> str | None:
    """``data``, or else the dataset all ``sources`` record having been trained on (``ConfigError`` saying
    that ``verb`` needs ``--data`` when one does not record it or they differ)."""
    if data is not None:
        return data
    recorded = {src.text: src.trained_with(verb)["data"] for src in sources}
    if len(set(map(str, recorded.values()))) > 1:
        listing = ", ".join(f"{text}: {value or 'digits'}" for text, value in recorded.items())
        raise ConfigError(f"{verb} needs --data: the models were trained on different data ({listing})")
    return next(iter(recorded.values()), None)


def load_resnet(source: str | os.PathLike, *, pretrained: str | bool | None = None, model: str | None = None,
                **options: Any) -> ResNet:  # fmt: skip
    """Like ``load_model``, for consumers that need the PyTorch modules (export, features, studies): an
    exported artifact is refused with what to pass instead."""
    return resolve_source(source, pretrained=pretrained, model=model).load_resnet(**options)


# ---------------------------------------------------------------------------- a model for data
#: (largest image side, model, why): the architecture ``resnetlab train`` picks when none is named.
MODEL_FOR_SIZE: tuple[tuple[int, str, str], ...] = (
    (64, "resnet20", "a CIFAR ResNet-20 suits images of up to 64 px"),
    (10**9, "resnet18", "photos are trained at 224 px, where the ImageNet ResNet-18 fits"),
)


def model_for_image_size(size: int) -> tuple[str, str]:
    """``(model name, reason)`` for data whose inputs are ``size`` pixels a side."""
    return next((name, why) for limit, name, why in MODEL_FOR_SIZE if size <= limit)


def model_for_data(data: str, *, image_size: int | None = None, download: bool = False) -> tuple[str, str]:
    """``(model name, reason)`` for training on ``data``: its input size decides (see ``MODEL_FOR_SIZE``).

    Small images are decoded into the dataset cache here, which training then reads; photos are only indexed."""
    from resnetlab.data import build_data

    size = build_data(data, image_size=image_size, download=download, check_images=False).image_size
    name, why = model_for_image_size(size)
    return name, f"{why}; {data} is {size} px"

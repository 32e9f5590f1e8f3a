"""The embedding network: a torchvision VGG-19 convolutional trunk, global average + max pooling,
a linear embedding head. Weights are never downloaded: ImageNet weights come from a file."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

ARCHS = ("vgg19", "vgg19_bn")
# VGG-19's layer plan (torchvision's configuration "E"): channels of the 16 convolutions, "M" = max pool.
VGG19_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M")
# --width when none is given: the embedded CPU sets (shapes, digits) train a quarter-width VGG-19-BN
# (the main job's network, docs/training.md); photo sets and --weights use torchvision's VGG-19 (1.0).
SMALL_DATASETS = ("shapes", "digits")
SMALL_WIDTH = 0.25


def default_width(dataset: str, weights: Optional[str] = None) -> float:
    """The width a run gets without ``--width``: 1.0 with ``--weights`` or on photo data sets,
    :data:`SMALL_WIDTH` on the embedded sets (``shapes``, ``digits``)."""
    return 1.0 if weights or dataset not in SMALL_DATASETS else SMALL_WIDTH


def scaled_channels(width: float) -> list:
    """VGG-19's layer plan with every convolution's channels times ``width`` (at least 1)."""
    return [c if isinstance(c, str) else max(1, int(round(c * width))) for c in VGG19_PLAN]


def vgg19_features(arch: str, width: float = 1.0) -> nn.Sequential:
    """The convolutional trunk of VGG-19 (``vgg19``) or VGG-19-BN (``vgg19_bn``) with channels x
    ``width``: the same 19-layer topology (16 convolutions, 5 poolings; + batch norm). ``width=1``
    is torchvision's own ``features`` module (the same parameter names and shapes, so its ImageNet
    state dicts load)."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0 < width <= 4):
        raise ValueError(f"width must be a number in (0, 4], got {width!r}")
    if width == 1.0:
        return getattr(torchvision.models, arch)(weights=None).features
    from torchvision.models.vgg import make_layers

    return make_layers(scaled_channels(width), batch_norm=arch == "vgg19_bn")


# What a run says (once, through its log) when the trunk starts from random initialisation.
NO_WEIGHTS_NOTE = ("no --weights given: the VGG trunk starts from random initialisation "
                   "(nothing is downloaded; pass a torchvision ImageNet state dict with --weights PATH)")


class EmbeddingNet(nn.Module):
    """``trunk`` (VGG-19 ``features``, channels x ``width``) -> global average pool + global max
    pool (summed) -> ``Linear(F, embedding_dim)`` with F = 512 x ``width`` trunk features. The
    output is not normalised (the losses normalise).

    ``width`` = 1.0 is torchvision's VGG-19 exactly and is required with ``weights``; 0.25 is the
    same 19-layer network with a quarter of the channels (F = 128), the CPU default of ``shapes``.
    ``features(x)`` returns the pooled F-d trunk features (used for the untrained baseline and
    for linear probes)."""

    def __init__(self, arch: str = "vgg19", embedding_dim: int = 512, *, weights: Optional[str] = None,
                 head_bn: bool = False, width: float = 1.0) -> None:
        super().__init__()
        if weights and width != 1.0:
            raise ValueError(f"--weights needs --width 1 (torchvision's VGG-19 channels); got --width {width}: "
                             "ImageNet weights exist only for the full-width network")
        trunk = vgg19_features(arch, width)
        self.arch = arch
        self.width = float(width)
        self.pretrained = False
        if weights:
            load_vgg_weights(trunk, weights)
            self.pretrained = True
        self.trunk = trunk
        feat = scaled_channels(width)[-2]
        self.feature_dim = feat
        self.head = nn.Linear(feat, embedding_dim)
        self.head_bn = nn.BatchNorm1d(feat) if head_bn else nn.Identity()
        nn.init.orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.embedding_dim = embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        return f.mean(dim=(2, 3)) + f.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_bn(self.features(x)))


def load_vgg_weights(features: nn.Module, path: str) -> None:
    """Load a torchvision VGG state dict (e.g. ``vgg19-dcbb9e9d.pth``) from ``path`` into a
    full-width VGG ``features`` module (or a whole torchvision VGG, which holds one).

    Only the convolutional ``features.*`` entries are required; the ImageNet classifier is dropped.
    Raises ``FileNotFoundError`` / ``ValueError`` with what was expected.
    """
    from .checkpoint import load_error_detail, load_plain

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path!r}: no such file (expected a torchvision VGG state dict, "
                                "e.g. vgg19-dcbb9e9d.pth; the program never downloads weights)")
    state = load_plain(path, "--weights", "a torchvision VGG state dict")  # CheckpointError, a ValueError
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, not a state dict: not a torchvision "
                         f"VGG state dict")
    feats = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")
             and isinstance(v, torch.Tensor)}
    if not hasattr(features, "features"):  # the trunk itself: its keys lack the "features." prefix
        feats = {k[len("features."):]: v for k, v in feats.items()}
    if not feats:
        raise ValueError(f"--weights {path!r} holds no 'features.*' entries: not a torchvision VGG state dict")
    try:
        missing, unexpected = features.load_state_dict(feats, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"--weights {path!r} does not match the VGG trunk: is it vgg19 vs vgg19_bn? "
                         f"({load_error_detail(e)})") from e
    if hasattr(features, "features"):
        missing = [k for k in missing if k.startswith("features.")]
    if missing or unexpected:
        raise ValueError(f"--weights {path!r} does not match the VGG trunk "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]}): is it vgg19 vs vgg19_bn?")

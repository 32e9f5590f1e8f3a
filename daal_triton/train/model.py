"""The embedding network: a torchvision VGG-19 convolutional trunk, global average + max pooling,
a linear embedding head. Weights are never downloaded: ImageNet weights come from a file."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

ARCHS = ("vgg19", "vgg19_bn")
# What a run says (once, through its log) when the trunk starts from random initialisation.
NO_WEIGHTS_NOTE = ("no --weights given: the VGG trunk starts from random initialisation "
                   "(nothing is downloaded; pass a torchvision ImageNet state dict with --weights PATH)")


class EmbeddingNet(nn.Module):
    """``trunk`` (VGG-19 ``features``) -> global average pool + global max pool (summed) ->
    ``Linear(512, embedding_dim)``. The output is not normalised (the losses normalise).

    ``features(x)`` returns the pooled 512-d trunk features (used for the untrained baseline
    and for linear probes)."""

    def __init__(self, arch: str = "vgg19", embedding_dim: int = 512, *, weights: Optional[str] = None,
                 head_bn: bool = False) -> None:
        super().__init__()
        import torchvision

        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        vgg = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.pretrained = False
        if weights:
            load_vgg_weights(vgg, weights)
            self.pretrained = True
        self.trunk = vgg.features
        self.head = nn.Linear(512, embedding_dim)
        self.head_bn = nn.BatchNorm1d(512) if head_bn else nn.Identity()
        nn.init.orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.embedding_dim = embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        return f.mean(dim=(2, 3)) + f.amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_bn(self.features(x)))


def load_vgg_weights(vgg: nn.Module, path: str) -> None:
    """Load a torchvision VGG state dict (e.g. ``vgg19-dcbb9e9d.pth``) from ``path``.

    Only the convolutional ``features.*`` entries are required; the ImageNet classifier is dropped.
    Raises ``FileNotFoundError`` / ``ValueError`` with what was expected.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path!r}: no such file (expected a torchvision VGG state dict, "
                                "e.g. vgg19-dcbb9e9d.pth; the program never downloads weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    if not feats:
        raise ValueError(f"--weights {path!r} holds no 'features.*' entries: not a torchvision VGG state dict")
    try:
        missing, unexpected = vgg.load_state_dict(feats, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"--weights {path!r} does not match {type(vgg).__name__}: is it vgg19 vs vgg19_bn? "
                         f"({str(e).splitlines()[0]})") from e
    missing = [k for k in missing if k.startswith("features.")]
    if missing or unexpected:
        raise ValueError(f"--weights {path!r} does not match {type(vgg).__name__} "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]}): is it vgg19 vs vgg19_bn?")

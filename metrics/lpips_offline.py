"""LPIPS (Zhang et al. 2018) built without any network access.

The ``lpips`` wheel ships its calibrated linear heads, but its VGG/AlexNet trunk comes from
torchvision's ImageNet weights, which torchvision would download. Here the trunk is always
built randomly initialised (``pnet_rand=True``, so torchvision never fetches anything) and,
for the real metric, its weights are then copied in from the torchvision file found on disk
(:mod:`metrics.weights`): the same numbers ``pnet_rand=False`` would load from the torch
cache, but also from a configured folder, and with no code path that can reach the network.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.weights import MissingWeightsError, find_weights, missing_message

# torchvision's file names for the ImageNet weights LPIPS uses as its trunk.
TRUNK_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
TRUNK_URL = "https://download.pytorch.org/models/{}"


# Smallest input side each trunk accepts: AlexNet's stride-4 stem and three max-pools need ~63 px.
MIN_SIZE = {"vgg": 16, "alex": 64}


def prepare_lpips_inputs(x: Tensor, net: str) -> Tensor:
    """Make ``(B, C, H, W)`` images in [-1, 1] fit the trunk: grey -> RGB, and small images
    (e.g. 28x28 Fashion-MNIST under AlexNet) bilinearly upsampled to the trunk's minimum side."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS takes (B, 1|3, H, W) images, got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    low = min(x.shape[-2:])
    if low < MIN_SIZE[net]:
        scale = MIN_SIZE[net] / low
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def _build(net: str) -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        # lpips passes torchvision the deprecated ``pretrained=`` argument; the warning is noise here.
        warnings.simplefilter("ignore", UserWarning)
        # pretrained=True loads the linear heads shipped inside the lpips wheel (non-negative weights,
        # so the distance stays >= 0); pnet_rand=True keeps torchvision from downloading the trunk.
        module = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    return module


def _load_trunk(module: nn.Module, path: os.PathLike) -> None:
    """Copy torchvision ``features.{i}.*`` tensors into lpips' ``net.slice{k}.{i}.*`` (same modules)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = module.net.state_dict()
    missing = []
    for key in target:
        _, index, leaf = key.split(".", 2)  # "slice1.0.weight" -> torchvision "features.0.weight"
        source = f"features.{index}.{leaf}"
        if source not in state or state[source].shape != target[key].shape:
            missing.append(source)
            continue
        target[key] = state[source]
    if missing:
        raise ValueError(
            f"{path} is not a torchvision {module.pnet_type} checkpoint: missing/mismatched {missing[:4]}"
        )
    module.net.load_state_dict(target)


def load_lpips(
    net: str = "vgg",
    required: bool = False,
    weights_dir: str | os.PathLike | None = None,
    pretrained: bool = True,
) -> tuple[nn.Module | None, str | None]:
    """Build a frozen, eval-mode LPIPS module; inputs are images in [-1, 1].

    Returns ``(module, None)`` on success. With ``pretrained=True`` the torchvision trunk file
    (``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``) is looked up in ``weights_dir`` and
    then ``torch.hub.get_dir()/checkpoints``; when it is absent, ``required=True`` raises
    :class:`MissingWeightsError` and ``required=False`` returns ``(None, reason)`` so the caller
    can warn once and go on without the perceptual term. ``pretrained=False`` gives a randomly
    initialised trunk with the shipped heads: the same architecture and code path, for tests.
    """
    if net not in TRUNK_FILES:
        raise ValueError(f"net must be one of {sorted(TRUNK_FILES)}, got {net!r}")
    path = None
    if pretrained:
        filename = TRUNK_FILES[net]
        path = find_weights(filename, weights_dir)
        if path is None:
            reason = missing_message(f"LPIPS ({net})", filename, TRUNK_URL.format(filename), weights_dir)
            if required:
                raise MissingWeightsError(reason)
            return None, reason
    module = _build(net)
    if path is not None:
        _load_trunk(module, path)
    module.requires_grad_(False)
    return module.eval(), None

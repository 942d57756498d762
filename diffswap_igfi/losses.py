"""Losses both trained stages use (SFI and JR): identity (1 - cos of ArcFace embeddings on
faces in generated images) and VGG16 perceptual distance, with the loader of local weights
files they share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffswap_igfi.conditions.identity import CROP_SIZE, arcface_crop, cosine_similarity
from diffswap_igfi.errors import ConfigError, ModelNotFoundError


# ------------------------------------------------------------------------------------ identity
def _crop_size(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    if config is not None and "input_size" in config:  # ArcFaceEncoderModel
        return int(config["input_size"])
    return int(getattr(getattr(encoder, "backbone", None), "input_size", CROP_SIZE))


class IdentityLoss(nn.Module):
    """1 - cos(ArcFace(image), source) on faces in generated images.

    encoder: [B,3,S,S] in [-1,1] -> [B,512] unit norm (``ArcFaceEncoderModel``);
    it is frozen here (no parameter requires grad, eval mode kept) but stays differentiable with
    respect to its input. The crop is ``arcface_crop`` at the encoder's input size S (112).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.crop_size = _crop_size(encoder)

    def train(self, mode: bool = True) -> IdentityLoss:
        super().train(mode)
        self.encoder.eval()  # BatchNorm statistics are part of the pretrained recognizer
        return self

    def forward(self, images: torch.Tensor, kps: torch.Tensor, source_embeds: torch.Tensor,
                weight_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images: [B,3,H,W] float in [-1,1]; kps: [B,5,2] five keypoints in pixels of images;
        source_embeds: [B,512] (treated as constants); weight_mask: [B] bool (which samples count)
        or float >= 0 (per-sample weights), None for all.

        Returns the (weighted) mean of 1 - cos over the selected samples, a float32 scalar in
        [0,2]; exactly 0, still attached to the graph, when none is selected. Unselected samples
        are not encoded at all.
        """
        if weight_mask is None:
            weight = torch.ones(len(images), device=images.device)
        else:
            weight = torch.as_tensor(weight_mask, device=images.device).float().flatten()
        rows = torch.nonzero(weight > 0).flatten()
        if rows.numel() == 0:
            return images.sum().float() * 0.0
        if rows.numel() < len(images):
            images, kps, source_embeds, weight = (images[rows], kps[rows], source_embeds[rows],
                                                  weight[rows])
        dtype = next(self.encoder.parameters()).dtype
        crops = arcface_crop(images.to(dtype), torch.as_tensor(kps).to(images.device),
                             size=self.crop_size)
        embeds = self.encoder(crops).float()
        cos = cosine_similarity(embeds, source_embeds.detach().to(embeds))
        return ((1.0 - cos) * weight).sum() / weight.sum()


# ---------------------------------------------------------------------------------- perceptual
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_HINT = ("on a machine with network access save torchvision's pretrained VGG16 state dict "
              "(torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), "
              "'vgg16.pth')) and pass its local path")


def _vgg16_features(depth: int) -> nn.Sequential:
    """The first ``depth`` modules of torchvision's ``vgg16().features`` (same indices)."""
    layers, cin = [], 3
    for item in _VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers[:depth])


def load_state_dict(path: Path) -> dict:
    """A torchvision-style state dict from a local .safetensors or .pth/.pt (weights_only)."""
    if not path.is_file():
        raise ModelNotFoundError(f"VGG16 weights {path} not found: {VGG16_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelNotFoundError(f"{path} is not a readable state dict "
                                 f"({type(exc).__name__}): {VGG16_HINT}") from exc


class PerceptualLoss(nn.Module):
    """Distance between VGG16 feature maps of two images; frozen, differentiable in the first.

    weights: a local torchvision ``vgg16`` state dict (.pth/.pt through ``torch.load`` with
    weights_only, or .safetensors); only its ``features.*`` tensors are used. layers: names from
    ``VGG16_LAYERS``; distance: "l1" or "l2"; layer_weights: one per layer (default 1).
    """

    def __init__(self, weights: str | Path,
                 layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"), *,
                 distance: str = "l1", layer_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown or distance not in ("l1", "l2") or not layers:
            raise ConfigError(f"perceptual loss: layers must be among {list(VGG16_LAYERS)} and "
                              f"distance 'l1' or 'l2', got {list(layers)} and {distance!r}")
        weights_per_layer = list(layer_weights or [1.0] * len(layers))
        if len(weights_per_layer) != len(layers):
            raise ConfigError("perceptual loss: one layer weight per layer")
        # feature index -> weight, in network order
        self.taps = dict(sorted(zip((VGG16_LAYERS[n] for n in layers), weights_per_layer)))
        self.distance = distance
        self.features = _vgg16_features(max(self.taps) + 1)
        path = Path(weights).expanduser()
        state = load_state_dict(path)
        wanted = {k: state.get(f"features.{k}") for k in self.features.state_dict()}
        missing = [k for k, v in wanted.items() if v is None]
        if missing:
            raise ModelNotFoundError(f"{path} is not a torchvision vgg16 state dict (no "
                                     f"features.{missing[0]}): {VGG16_HINT}")
        self.features.load_state_dict(wanted)
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.features.eval()
        return self

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images + 1.0) * 0.5 - self.mean.to(images)) / self.std.to(images)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """images, target: [B,3,H,W] float in [-1,1] (target is a constant). Returns the weighted
        sum over layers of the mean |f(images) - f(target)| (or squared), a scalar >= 0."""
        dtype = self.features[0].weight.dtype
        with torch.no_grad():
            wanted = self._taps(target.to(dtype))
        dist = F.l1_loss if self.distance == "l1" else F.mse_loss
        return sum(w * dist(a.float(), b.float())
                   for w, a, b in zip(self.taps.values(), self._taps(images.to(dtype)), wanted))

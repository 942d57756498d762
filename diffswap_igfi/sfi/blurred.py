"""Blurred-face conditioning: what the SFI UNet's "masked image" input shows of the face.

Masked inpainting (our default, the anchors') zeroes the face in the crop the UNet is
conditioned on. The alternative here keeps a strongly blurred copy of the target's own face
there instead: skin tone and lighting survive, identity detail does not. Everything else (the
mask channel, masked sampling, the target's exact pixels outside the mask) is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONDITIONS = ("masked", "blurred")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of x [1,C,H,W], reflected borders; radius 3 sigma (at most the
    image size minus one, which reflection allows)."""
    radius = max(1, min(math.ceil(3.0 * sigma), min(x.shape[-2:]) - 1))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blur_face(images: torch.Tensor, mask: torch.Tensor, fraction: float = 0.125) -> torch.Tensor:
    """The crops with each face replaced by a strongly blurred copy of itself.

    images: [B,3,S,S] float in [-1,1]; mask: [B,1,S,S] in [0,1] (1 = the face being replaced);
    fraction: the blur's sigma as a share of the face's size (the square root of the mask's area
    in pixels; 0.125 of a 300 px face is a 37 px sigma: eyes, nose and mouth are gone, tone and
    lighting stay). The blur is normalised within the mask (blur(x m) / blur(m)), so the face
    region shows face colours only, not the hair or background around it.
    Returns [B,3,S,S]: ``images + mask * (blurred - images)``, so pixels where mask == 0 are
    the input's, bit for bit.
    """
    mask = mask.to(images)
    out = []
    for x, m in zip(images, mask):
        area = float(m.sum())
        if area == 0.0:
            out.append(x)
            continue
        sigma = max(fraction * math.sqrt(area), 0.5)
        both = _gaussian_blur(torch.cat([x * m, m])[None], sigma)[0]
        blurred = both[:3] / both[3:].clamp_min(1e-6)
        out.append(x + m * (blurred - x))
    return torch.stack(out)


def condition_image(images: torch.Tensor, mask: torch.Tensor, condition: str = "masked",
                    blur: float = 0.125) -> torch.Tensor:
    """The crop the UNet's "masked image" channels encode: the face zeroed (``masked``: mid
    grey, ``conditions.clip.blank_face``) or blurred (``blurred``: ``blur_face`` with sigma
    ``blur`` x the face size). images: [B,3,S,S] in [-1,1]; mask: [B,1,S,S] in [0,1]."""
    from diffswap_igfi.conditions.clip import blank_face

    if condition == "masked":
        return blank_face(images, mask)
    if condition == "blurred":
        return blur_face(images, mask, blur)
    raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")

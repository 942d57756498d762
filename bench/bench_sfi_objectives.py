"""What the SFI trainer's image-space judges (issue 18) add to a training step, in arithmetic.

Run: python bench/bench_sfi_objectives.py
Counts forward + backward TFLOP on the meta device (no weights, load-free) at SD-1.5 size
(512 px crops, one judged sample): the identity loss's extras (the midpoint's second UNet call,
the VAE decode with gradients, ArcFace r50) against what the 3DMM + eye losses (one 3DDFA_V2
MobileNet pass at 120 px on the swap, one without gradients on the target) and the perceptual
loss (VGG16 to relu4_3 on the swap, once more without gradients on the target) add on the same
decoded image. The judges reuse the decode, so their cost is their own networks only.
"""

from __future__ import annotations

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from bench_midpoint import sd_vae
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.geometry.tddfa_torch import TDDFARegressor
from diffswap_igfi.sfi.unet import sd15_geometry_unet

SIZE = 512


def count(fn, backward: bool = True) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 1e12


def main() -> None:
    with torch.device("meta"):
        unet, vae = sd15_geometry_unet(), sd_vae().requires_grad_(False)
        arcface = ArcFaceEncoderModel().requires_grad_(False)
        tddfa = TDDFARegressor(1.0, 62).requires_grad_(False)
        vgg = torchvision.models.vgg16(weights=None).features[:23].requires_grad_(False)
        latent = SIZE // 8
        x = torch.randn(1, unet.config.in_channels, latent, latent)
        context = torch.randn(1, 20, unet.config.cross_attention_dim)
        t = torch.full((1,), 250)
        z = torch.randn(1, 4, latent, latent, requires_grad=True)
        crops = torch.randn(1, 3, 112, 112, requires_grad=True)
        roi = torch.randn(1, 3, 120, 120, requires_grad=True)
        image = torch.randn(1, 3, SIZE, SIZE, requires_grad=True)
    unet_call = count(lambda: unet(x, t, encoder_hidden_states=context).sample)
    decode = count(lambda: vae.decode(z).sample)
    identity = count(lambda: arcface(crops))
    regressor = count(lambda: tddfa(roi)) + count(lambda: tddfa(roi.detach()), backward=False)
    perceptual = count(lambda: vgg(image)) + count(lambda: vgg(image.detach()), backward=False)
    id_extra = unet_call + decode + identity
    print(f"SD-1.5 geometry, {SIZE} px, per judged sample, forward+backward TFLOP:")
    print(f"  UNet call {unet_call:.3f}  VAE decode {decode:.3f}  ArcFace {identity:.4f}")
    print(f"  identity loss extras (2nd UNet call + decode + ArcFace): {id_extra:.3f}")
    print(f"  3DMM + eye (3DDFA_V2 mb1, shared pass): {regressor:.4f} "
          f"({100 * regressor / id_extra:.2f}% of it)")
    print(f"  perceptual (VGG16 to relu4_3 at {SIZE} px): {perceptual:.3f} "
          f"({100 * perceptual / id_extra:.1f}% of it)")
    print(f"  all four on one decode: {id_extra + regressor + perceptual:.3f} TFLOP "
          f"(a second decode would add {decode + unet_call:.3f})")


if __name__ == "__main__":
    main()

"""The SFI denoiser: a diffusers UNet2DConditionModel with inpainting and geometry inputs.

Input channels, in order (Stable Diffusion inpainting's order, extended):
  noisy latent (4) | mask at latent resolution (1) | masked target latent (4) | geometry (G)
where the geometry channels are the swapped-landmark heatmaps (geometry.condition, G = 7).
Cross-attention context: [identity tokens, CLIP tokens of the target].
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffswap_igfi.errors import ModelNotFoundError

LATENT_CHANNELS = 4
GEOMETRY_CHANNELS = 7


def sfi_in_channels(geometry_channels: int = GEOMETRY_CHANNELS) -> int:
    return 2 * LATENT_CHANNELS + 1 + geometry_channels


def tiny_sfi_unet(cross_attention_dim: int = 32, geometry_channels: int = GEOMETRY_CHANNELS,
                  sample_size: int = 8) -> UNet2DConditionModel:
    """A tiny SFI UNet of the same class, for tests and CPU smoke runs."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=sfi_in_channels(geometry_channels),
        out_channels=LATENT_CHANNELS, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def ldm_sfi_unet(cross_attention_dim: int = 768, geometry_channels: int = GEOMETRY_CHANNELS,
                 sample_size: int = 64) -> UNet2DConditionModel:
    """A from-scratch latent-diffusion SFI UNet (DiffSwap-style size, ~400M parameters)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=sfi_in_channels(geometry_channels),
        out_channels=LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8)


def sd15_geometry_unet(geometry_channels: int = GEOMETRY_CHANNELS) -> UNet2DConditionModel:
    """SD-1.5-inpainting geometry (random weights) with our extra channels: for benchmarks."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=sfi_in_channels(geometry_channels), out_channels=4,
        layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)


def sfi_unet_from_sd_inpaint(folder: str | Path,
                             geometry_channels: int = GEOMETRY_CHANNELS) -> UNet2DConditionModel:
    """Load the UNet of a local Stable Diffusion inpainting folder and add geometry inputs.

    The new input channels of ``conv_in`` start at zero, so the model initially behaves exactly
    like the inpainting UNet it came from; training teaches it to use them.
    """
    path = Path(folder).expanduser()
    if not (path / "unet" / "config.json").is_file():
        raise ModelNotFoundError(
            f"no Stable Diffusion inpainting UNet at {path / 'unet'}: download an SD inpainting "
            "model folder (unet/, vae/, scheduler/) on a machine with network access and pass "
            "its local path")
    base = UNet2DConditionModel.from_pretrained(path / "unet")
    return expand_input_channels(base, sfi_in_channels(geometry_channels))


def expand_input_channels(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """A copy of ``unet`` whose conv_in takes ``in_channels``; extra channels zero-initialised."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"cannot shrink conv_in from {old.in_channels} to {in_channels}")
    config = dict(unet.config)
    config["in_channels"] = in_channels
    new = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    weight = torch.zeros(old.out_channels, in_channels, *old.kernel_size, dtype=old.weight.dtype)
    weight[:, : old.in_channels] = old.weight.detach()
    state["conv_in.weight"] = weight
    new.load_state_dict(state)
    return new.to(dtype=old.weight.dtype)

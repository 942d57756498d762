"""Assembling an SFI pipeline: tiny (tests, CPU smoke runs), from a local Stable Diffusion
inpainting folder, or from scratch."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from diffswap_igfi.conditions.clip import ClipVisionEncoderModel
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.projectors import ClipTokenProjector, IdentityTokenProjector
from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.sfi.unet import sfi_unet_from_sd_inpaint, tiny_sfi_unet

TINY_CLIP_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}


def tiny_vae() -> AutoencoderKL:
    """A tiny AutoencoderKL with SD's 8x downsampling and 4 latent channels."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64)


def tiny_pipeline(seed: int = 0, crop_size: int = 64, scheduler=None) -> DiffSwapIGFIPipeline:
    """Every component at toy size, random weights: the real classes, for tests."""
    torch.manual_seed(seed)
    dim = 32
    return DiffSwapIGFIPipeline(
        vae=tiny_vae(), unet=tiny_sfi_unet(cross_attention_dim=dim, sample_size=crop_size // 8),
        scheduler=scheduler or DDIMScheduler(num_train_timesteps=1000),
        id_projector=IdentityTokenProjector(embed_dim=512, num_tokens=4, cross_attention_dim=dim,
                                            hidden_dim=32, depth=1, heads=2),
        clip_projector=ClipTokenProjector(clip_dim=32, num_tokens=4, cross_attention_dim=dim,
                                          hidden_dim=32, depth=1, heads=2),
        identity_encoder=ArcFaceEncoderModel(layers=(1, 1, 1, 1), width=8),
        clip_encoder=ClipVisionEncoderModel(embed_dim=16, vision_cfg=TINY_CLIP_VISION),
        crop_size=crop_size)


def pipeline_from_sd_inpaint(folder: str | Path, *, arcface: str | Path, clip_model: str,
                             clip_weights: str | Path, crop_size: int = 512,
                             id_tokens: int = 4, clip_tokens: int = 16) -> DiffSwapIGFIPipeline:
    """An untrained SFI pipeline on a local SD inpainting folder: its UNet (with zero-initialised
    geometry channels), VAE and scheduler, our ArcFace and CLIP encoders from local weights, and
    new projectors. Train it (train/train_sfi.py) before expecting swaps."""
    path = _sd_folder(folder, "pass a Stable Diffusion inpainting model folder")
    return _assemble(path, sfi_unet_from_sd_inpaint(path), arcface=arcface,
                     clip_model=clip_model, clip_weights=clip_weights, crop_size=crop_size,
                     id_tokens=id_tokens, clip_tokens=clip_tokens)


def pipeline_from_scratch(vae_folder: str | Path, *, arcface: str | Path, clip_model: str,
                          clip_weights: str | Path, crop_size: int = 512, id_tokens: int = 4,
                          clip_tokens: int = 16) -> DiffSwapIGFIPipeline:
    """A DiffSwap-style from-scratch LDM: a new SFI UNet (``sfi.unet.ldm_sfi_unet``) on the VAE
    and noise schedule of a local Stable Diffusion folder (its ``vae/`` and ``scheduler/``)."""
    from diffswap_igfi.sfi.unet import ldm_sfi_unet

    path = _sd_folder(vae_folder, "the from-scratch model takes the VAE of a local Stable "
                                  "Diffusion folder")
    return _assemble(path, ldm_sfi_unet(sample_size=crop_size // 8), arcface=arcface,
                     clip_model=clip_model, clip_weights=clip_weights, crop_size=crop_size,
                     id_tokens=id_tokens, clip_tokens=clip_tokens)


def _sd_folder(folder: str | Path, hint: str) -> Path:
    path = Path(folder).expanduser()
    for sub in ("vae", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelNotFoundError(f"{path} has no {sub}/ folder: {hint}")
    return path


def _assemble(path: Path, unet, *, arcface, clip_model, clip_weights, crop_size, id_tokens,
              clip_tokens) -> DiffSwapIGFIPipeline:
    """``unet`` with the VAE and schedule of the SD folder at ``path``, our encoders from local
    weights, and new projectors sized to the UNet's cross-attention."""
    clip = ClipVisionEncoderModel.from_open_clip(clip_model, clip_weights)
    dim = unet.config.cross_attention_dim
    return DiffSwapIGFIPipeline(
        vae=AutoencoderKL.from_pretrained(path / "vae"), unet=unet,
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
        id_projector=IdentityTokenProjector(num_tokens=id_tokens, cross_attention_dim=dim),
        clip_projector=ClipTokenProjector(clip_dim=clip.token_dim, num_tokens=clip_tokens,
                                          cross_attention_dim=dim),
        identity_encoder=ArcFaceEncoderModel.from_file(arcface), clip_encoder=clip,
        crop_size=crop_size)

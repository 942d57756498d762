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
                             id_tokens: int = 4, clip_tokens: int = 16, arcface_arch: str = "r50",
                             mmap: bool = True) -> DiffSwapIGFIPipeline:
    """An untrained SFI pipeline on a local SD inpainting folder: its UNet (with zero-initialised
    geometry channels), VAE and scheduler, our ArcFace and CLIP encoders from local weights, and
    new projectors. Train it (train/train_sfi.py) before expecting swaps.

    mmap: the UNet, the CLIP tower and ArcFace are built on the meta device and given the
    memory-mapped tensors of their safetensors/torch-zip files (``training.mmap_load``;
    diffusers does the same for the VAE): no random init, no private copy, pages shared by the
    processes of a node (bench/bench_startup_memory.py). The weights are the same to the bit;
    files in another format (a ``.bin`` UNet, a CLIP checkpoint open_clip must convert) take
    the copying path."""
    path = _sd_folder(folder, "pass a Stable Diffusion inpainting model folder")
    unet = _mmap_sd_unet(path) if mmap else None
    if unet is None:
        unet = sfi_unet_from_sd_inpaint(path)
    return _assemble(path, unet, arcface=arcface, clip_model=clip_model,
                     clip_weights=clip_weights, crop_size=crop_size, id_tokens=id_tokens,
                     clip_tokens=clip_tokens, arcface_arch=arcface_arch, mmap=mmap)


def pipeline_from_scratch(vae_folder: str | Path, *, arcface: str | Path, clip_model: str,
                          clip_weights: str | Path, crop_size: int = 512, id_tokens: int = 4,
                          clip_tokens: int = 16, arcface_arch: str = "r50",
                          mmap: bool = True) -> DiffSwapIGFIPipeline:
    """A DiffSwap-style from-scratch LDM: a new SFI UNet (``sfi.unet.ldm_sfi_unet``) on the VAE
    and noise schedule of a local Stable Diffusion folder (its ``vae/`` and ``scheduler/``)."""
    from diffswap_igfi.sfi.unet import ldm_sfi_unet

    path = _sd_folder(vae_folder, "the from-scratch model takes the VAE of a local Stable "
                                  "Diffusion folder")
    return _assemble(path, ldm_sfi_unet(sample_size=crop_size // 8), arcface=arcface,
                     clip_model=clip_model, clip_weights=clip_weights, crop_size=crop_size,
                     id_tokens=id_tokens, clip_tokens=clip_tokens, arcface_arch=arcface_arch,
                     mmap=mmap)


def _sd_folder(folder: str | Path, hint: str) -> Path:
    path = Path(folder).expanduser()
    for sub in ("vae", "scheduler"):
        if not (path / sub).is_dir():
            raise ModelNotFoundError(f"{path} has no {sub}/ folder: {hint}")
    return path


def _assemble(path: Path, unet, *, arcface, clip_model, clip_weights, crop_size, id_tokens,
              clip_tokens, arcface_arch: str, mmap: bool) -> DiffSwapIGFIPipeline:
    """``unet`` with the VAE and schedule of the SD folder at ``path``, our encoders from local
    weights, and new projectors sized to the UNet's cross-attention."""
    clip = _mmap_clip(clip_model, clip_weights) if mmap else None
    if clip is None:
        clip = ClipVisionEncoderModel.from_open_clip(clip_model, clip_weights)
    dim = unet.config.cross_attention_dim
    return DiffSwapIGFIPipeline(
        # diffusers already maps a safetensors VAE (meta init, file-backed tensors)
        vae=AutoencoderKL.from_pretrained(path / "vae"), unet=unet,
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
        id_projector=IdentityTokenProjector(num_tokens=id_tokens, cross_attention_dim=dim),
        clip_projector=ClipTokenProjector(clip_dim=clip.token_dim, num_tokens=clip_tokens,
                                          cross_attention_dim=dim),
        identity_encoder=_arcface(arcface, arcface_arch, mmap), clip_encoder=clip,
        crop_size=crop_size)


# ------------------------------------------------------------- memory-mapped construction
def _weights_file(folder: Path) -> Path | None:
    """The safetensors weights of a diffusers model folder (one file or a sharded index)."""
    for name in ("diffusion_pytorch_model.safetensors",
                 "diffusion_pytorch_model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mmap_sd_unet(path: Path):
    """``sfi_unet_from_sd_inpaint(path)`` without a private copy of the weights: the same
    tensors to the bit, in fp32 (conv_in, widened with zero geometry channels, is the one new
    tensor). None when the folder needs the copying path: no safetensors file, or keys that
    ``from_pretrained`` must convert (old attention names), or a conv_in it refuses."""
    from diffusers import UNet2DConditionModel

    from diffswap_igfi.sfi.unet import sfi_in_channels
    from diffswap_igfi.training.mmap_load import (WeightsMismatch, empty_module, fill,
                                                  mmap_state_dict)

    folder = path / "unet"
    weights = _weights_file(folder)
    if weights is None or not (folder / "config.json").is_file():
        return None
    state = mmap_state_dict(weights)
    old, in_channels = state.get("conv_in.weight"), sfi_in_channels()
    if old is None or old.shape[1] > in_channels:
        return None
    weight = torch.zeros(old.shape[0], in_channels, *old.shape[2:], dtype=torch.float32)
    weight[:, : old.shape[1]] = old
    config = {**UNet2DConditionModel.load_config(folder), "in_channels": in_channels}
    try:
        # train mode, as from_config leaves the copying path's UNet
        return fill(empty_module(lambda: UNet2DConditionModel.from_config(config)),
                    {**state, "conv_in.weight": weight}, torch.float32)
    except WeightsMismatch:
        return None


def _unwrapped(state):
    """The weights of a checkpoint: a training checkpoint's ``state_dict`` entry, without the
    ``module.`` prefix DistributedDataParallel adds. None stays None."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _arcface(weights: str | Path, arch: str, mmap: bool) -> ArcFaceEncoderModel:
    """``ArcFaceEncoderModel.from_file(weights, arch)``; with ``mmap``, built on the meta device
    from the memory-mapped tensors of a safetensors or torch zip file (BatchNorm's
    ``num_batches_tracked`` counters may be absent, as ``load_iresnet`` allows). Files that do
    not fit take ``from_file``, which names the problem."""
    from diffswap_igfi.conditions.iresnet import ARCHS, read_state_dict
    from diffswap_igfi.training.mmap_load import (WeightsMismatch, empty_module, fill,
                                                  mmap_state_dict)

    path = Path(weights).expanduser()
    if mmap and arch in ARCHS and path.is_file():
        try:
            state = (read_state_dict(path) if path.suffix == ".safetensors"  # mapped already
                     else mmap_state_dict(path))
        except Exception:  # not a zip/safetensors state dict: from_file says what it is
            state = None
        state = _unwrapped(state)
        if state:
            model = empty_module(lambda: ArcFaceEncoderModel(layers=ARCHS[arch]))
            state = {f"backbone.{k}": v for k, v in state.items()}
            for key, counter in model.state_dict().items():
                if key.endswith("num_batches_tracked"):
                    state.setdefault(key, counter)
            try:
                return fill(model, state, torch.float32)
            except WeightsMismatch:
                pass
    return ArcFaceEncoderModel.from_file(weights, arch)


def _mmap_clip(model_name: str, weights: str | Path):
    """``ClipVisionEncoderModel.from_open_clip`` from the memory-mapped image-tower tensors of an
    open_clip checkpoint (``visual.*`` keys of a safetensors or torch zip file); None when the
    file needs open_clip's own conversions (or is missing: the usual path says so)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg

    from diffswap_igfi.training.mmap_load import (WeightsMismatch, empty_module, fill,
                                                  mmap_state_dict)

    path = Path(weights).expanduser()
    cfg = open_clip.get_model_config(model_name) if "/" not in model_name else None
    if cfg is None or not path.is_file():
        return None
    try:
        state = mmap_state_dict(path)
    except Exception:  # a legacy (non-zip) torch file or an unreadable one
        return None
    state = _unwrapped(state)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    preprocess = {**asdict(PreprocessCfg()), **cfg.get("preprocess_cfg", {})}
    model = empty_module(lambda: ClipVisionEncoderModel(
        embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
        quick_gelu=cfg.get("quick_gelu", False), image_mean=tuple(preprocess["mean"]),
        image_std=tuple(preprocess["std"])))
    try:
        fill(model.visual, visual, torch.float32)
    except WeightsMismatch:
        return None
    return model

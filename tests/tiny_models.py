"""Tiny Stable Diffusion inpainting folders, built locally: nothing is downloaded.

``make_tiny_sd_inpaint_folder(path)`` writes the real SD layout (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; no safety checker, no feature
extractor) that ``StableDiffusionInpaintPipeline.from_pretrained(path)`` loads offline. The models
are the real classes at toy sizes:

- UNet: ``UNet2DConditionModel``, 9 input channels (noisy latent 4 + mask 1 + masked-image latent
  4, the SD-inpainting layout), 4 output channels, blocks (32, 64), one cross-attention down and
  up block, ``cross_attention_dim`` wide context; ``sample_size`` 8 latents.
- VAE: ``AutoencoderKL`` with 4 blocks, so it downsamples by 8 like SD's (a 64x64 image is an
  8x8x4 latent, and the pipeline's default size is 64x64).
- Text: ``CLIPTextModel`` with ``hidden_size = cross_attention_dim``, 77 positions, and a
  ``CLIPTokenizer`` built from a byte-level ``vocab.json`` + ``merges.txt`` written here (every
  byte symbol, alone and word-final, a handful of merges, and the two CLIP special tokens).
- Scheduler: ``DDIMScheduler`` with SD's beta schedule.

A 64x64 image with 2-4 steps runs in a small fraction of a second on CPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MERGES = ["f a", "fa c", "fac e</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_clip_tokenizer_files(folder: Path) -> Path:
    """Write a tiny byte-level CLIP BPE tokenizer folder in SD 1.5's layout (``vocab.json``,
    ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``; no ``tokenizer.json``)
    into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = _byte_symbols()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    tokens += [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _EOS, "unk_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def make_tiny_sd_inpaint_components(*, cross_attention_dim: int = 32, seed: int = 0) -> dict:
    """The tiny pipeline's components (seeded, on CPU, float32), keyed like the pipeline's."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer_files(Path(tmp)))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cross_attention_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer, "scheduler": scheduler}


def make_tiny_sd_inpaint_folder(path: Path, *, cross_attention_dim: int = 32,
                                seed: int = 0) -> Path:
    """Write a tiny SD-inpainting folder at ``path`` (created) and return ``path``."""
    path = Path(path)
    pipe = StableDiffusionInpaintPipeline(
        **make_tiny_sd_inpaint_components(cross_attention_dim=cross_attention_dim, seed=seed),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 saves a tokenizer.json; real SD folders have vocab.json + merges.txt instead
    shutil.rmtree(path / "tokenizer")
    write_tiny_clip_tokenizer_files(path / "tokenizer")
    return path


def make_tiny_pipeline(path: Path) -> StableDiffusionInpaintPipeline:
    """Load the folder at ``path`` on CPU (float32), offline, with the progress bar disabled."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(Path(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_inpaint_inputs(size: int = 64, seed: int = 0) -> dict:
    """Deterministic inputs for the tiny pipeline: a random image, a centre square mask."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return {"prompt": "a face photo", "image": image, "mask_image": mask,
            "height": size, "width": size}

"""Per-swap cost of the SFI pipeline: UNet evaluations, seconds in the UNet, the VAE and the rest.

Run: python bench/bench_sfi.py [--steps 20] [--repeats 3] [--skip-sd]
- tiny: the test-sized pipeline (64 px crop). Guidance runs in one UNet call per step (the
  conditional and unconditional halves batched).
- sd15: Stable Diffusion 1.5 inpainting geometry with random weights (UNet 320-1280 channels,
  SD's VAE, ArcFace iresnet50, a ViT-L/14 CLIP image tower), 512 px crop. One swap takes
  minutes on 2 CPU cores; it is measured once.
Target (issue 5): everything outside the UNet and the VAE costs at most 10% of the UNet time
at SD size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from diffswap_igfi.conditions.clip import ClipVisionEncoderModel
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.projectors import ClipTokenProjector, IdentityTokenProjector
from diffswap_igfi.conditions.source import Source
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.sfi.build import tiny_pipeline
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.sfi.unet import sd15_geometry_unet

VIT_L_14 = {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}


def sd15_pipeline() -> DiffSwapIGFIPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        sample_size=512)
    return DiffSwapIGFIPipeline(
        vae=vae, unet=sd15_geometry_unet(), scheduler=DDIMScheduler(),
        id_projector=IdentityTokenProjector(cross_attention_dim=768),
        clip_projector=ClipTokenProjector(clip_dim=1024, cross_attention_dim=768),
        identity_encoder=ArcFaceEncoderModel(),
        clip_encoder=ClipVisionEncoderModel(embed_dim=768, vision_cfg=VIT_L_14), crop_size=512)


def shipped_pair():
    """(target photo, [(target face, source)]): Grace Hopper onto the astronaut, detected once."""
    source = load_image(sample_path("grace_hopper"))
    target = load_image(sample_path("astronaut"))
    with FaceDetector() as detector:
        src = Source(source, detector.detect(source.rgb)[0])
        return target.rgb, [(detector.detect(target.rgb)[0], src)]


def measure(name: str, pipe: DiffSwapIGFIPipeline, steps: int, repeats: int) -> None:
    pipe.set_progress_bar_config(disable=True)
    target, pairs = shipped_pair()
    rows = []
    for _ in range(repeats):
        out = pipe(target, pairs, num_inference_steps=steps, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0))
        s = out.stats
        rows.append((s.total_seconds, s.unet_seconds, s.vae_seconds, s.unet_calls))
    total, unet, vae, calls = (statistics.median(col) for col in zip(*rows))
    rest = total - unet - vae
    print(f"{name:6s} steps={steps} guidance=3 UNet calls={int(calls)}  total {total:8.2f} s  "
          f"UNet {unet:8.2f} s per swap ({unet / calls * 1000:7.1f} ms/call)  VAE {vae:6.2f} s  "
          f"rest {rest:6.2f} s = {100 * rest / unet:5.1f}% of UNet  (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sd", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    pipe = tiny_pipeline()
    target, pairs = shipped_pair()
    pipe(target, pairs, num_inference_steps=1)  # warm-up: geometry backend, allocator
    measure("tiny", pipe, args.steps, args.repeats)
    if not args.skip_sd:
        measure("sd15", sd15_pipeline(), args.steps, 1)
    print(f"(bench wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""SFI training-step time with and without the midpoint-estimation identity loss.

Run: python bench/bench_midpoint.py [--steps 10] [--warmup 2] [--threads N] [--sd] [--sd-steps 2]
One step = UNet forward, diffusion loss (+ midpoint identity loss: a second UNet call at t/2,
a VAE decode with gradients, an ArcFace forward), backward, optimizer step. Latents are cached
(the target's VAE encoding is not timed); timesteps are drawn uniformly in [0, 1000), so every
sample gets the identity loss. Medians are reported; the tiny variants alternate step by step,
the SD ones run in turn (slowest last) and print as each finishes.
- tiny: the test-sized UNet, VAE and ArcFace (iresnet (1,1,1,1), width 8), 64 px, batch 4,
  AdamW. A third row applies the identity loss to one sample of the four (sliced inputs).
- sd (--sd): SD-1.5 inpainting UNet geometry (random weights), SD's VAE, iresnet50 ArcFace,
  512 px, batch 1; SGD, because AdamW's state for 860M parameters does not fit beside the
  activations in a small machine's memory. Minutes per step on 2 CPU cores. Its VAE decoder
  costs 2.5 TFLOP at 512 px (three UNet forwards), so one row decodes the identity loss's
  latents with TAESD's architecture instead (diffusers' ``AutoencoderTiny``, 0.14 TFLOP,
  random weights here), which ``midpoint_identity_loss`` accepts as its ``vae`` as well.
Target: with / without <= 1.6.
Wall times on a busy machine drift, so the script also prints the step's arithmetic (TFLOP of
forward + backward, counted on the meta device in seconds, no weights): the load-free ratio.
On a shared machine use --threads 1: with other processes on the cores, OpenMP's spinning
threads make 2-thread step times erratic (5-50x slower, at random).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.faces.align import template_points
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.losses import IdentityLoss
from diffswap_igfi.sfi.build import tiny_vae
from diffswap_igfi.sfi.losses import diffusion_loss, diffusion_target, midpoint_identity_loss
from diffswap_igfi.sfi.unet import sd15_geometry_unet, tiny_sfi_unet

ID_WEIGHT = 0.1


def sd_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                         sample_size=512)


def taesd() -> AutoencoderTiny:
    """TAESD's architecture (random weights), frozen: a cheap decoder for the loss."""
    return AutoencoderTiny().requires_grad_(False).eval()


class Setup:
    """Models and one cached training batch: target images, masks, latents and conditions."""

    def __init__(self, unet, vae, arcface, *, size: int, batch: int, tokens: int,
                 optimizer: str) -> None:
        torch.manual_seed(0)
        self.unet, self.vae = unet.train(), vae.requires_grad_(False).eval()
        self.id_loss = IdentityLoss(arcface)
        self.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear")
        params = [p for p in unet.parameters() if p.requires_grad]
        self.opt = (torch.optim.AdamW(params, lr=1e-5) if optimizer == "adamw"
                    else torch.optim.SGD(params, lr=1e-5))
        rgb = load_image(sample_path("grace_hopper")).rgb
        image = F.interpolate(to_tensor(rgb[None]), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True)
        self.images = image.expand(batch, -1, -1, -1).contiguous()
        self.kps = torch.as_tensor(template_points(size, "arcface"),
                                   dtype=torch.float32).expand(batch, 5, 2)
        self.mask = torch.zeros(batch, 1, size, size)
        self.mask[..., size // 6: size - size // 8, size // 8: size - size // 8] = 1.0
        with torch.no_grad():
            self.latents = vae.encode(self.images).latent_dist.mode() * vae.config.scaling_factor
            self.source = self.id_loss.encoder(torch.zeros(batch, 3, 112, 112)).detach()
        lmask = F.max_pool2d(self.mask, size // self.latents.shape[-1])
        self.conds = torch.cat([lmask, self.latents * (1 - lmask),
                                torch.randn(batch, 7, *self.latents.shape[-2:])], 1)
        self.context = torch.randn(batch, tokens, unet.config.cross_attention_dim)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, rows: int, decoder=None) -> float:
        """One timed training step; the identity loss on the first ``rows`` samples (0: none),
        decoded by ``decoder`` (default: the setup's VAE)."""
        batch = len(self.latents)
        t = torch.randint(0, 1000, (batch,), generator=self.gen)
        noise = torch.randn(self.latents.shape, generator=self.gen)
        start = time.perf_counter()
        noisy = self.scheduler.add_noise(self.latents, noise, t)

        def denoise(z, tt, sl=slice(None)):
            inputs = torch.cat([z, self.conds[sl]], 1)
            return self.unet(inputs, tt, encoder_hidden_states=self.context[sl]).sample

        out = denoise(noisy, t)
        loss = diffusion_loss(out, diffusion_target(self.scheduler, self.latents, noise, t))
        if rows:
            sl = slice(0, rows)
            loss = loss + ID_WEIGHT * midpoint_identity_loss(
                lambda z, tt: denoise(z, tt, sl), self.scheduler, decoder or self.vae,
                noisy[sl], out[sl],
                t[sl], kps=self.kps[sl], source_embeds=self.source[sl], id_loss=self.id_loss,
                mask=self.mask[sl], target=self.images[sl])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def measure(name: str, setup: Setup, steps: int, warmup: int, variants: dict[str, tuple],
            alternate: bool = True) -> None:
    """variants: label -> (rows, decoder); the first is the baseline. ``alternate`` interleaves
    the variants step by step (load changes hit all alike); otherwise each runs in turn and is
    printed as soon as it is done (for long runs)."""
    times: dict[str, list[float]] = {label: [] for label in variants}

    def run(label: str, i: int) -> None:
        seconds = setup.step(*variants[label])
        if i >= warmup:
            times[label].append(seconds)

    if alternate:
        for i in range(warmup + steps):
            for label in variants:
                run(label, i)
    for label in variants:
        if not alternate:
            for i in range(warmup + steps):
                run(label, i)
        report(name, len(setup.latents), label, times)


def report(name: str, batch: int, label: str, times: dict[str, list[float]]) -> None:
    base = statistics.median(next(iter(times.values())))
    median = statistics.median(times[label])
    print(f"{name:5s} batch {batch}  {label:34s} {median:9.3f} s/step  "
          f"ratio {median / base:5.2f}  (median of {len(times[label])})", flush=True)


def flops(name: str, build, *, size: int, batch: int, tokens: int,
          decoders: tuple[str, ...] = ("VAE",)) -> None:
    """Print TFLOP per training step with and without the identity loss (all samples), from
    counted forward + backward passes of each network on the meta device, and the share of
    samples the loss may be given to for a ratio of 1.6."""
    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter:
            fn().sum().backward()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"):
        unet, vae, arcface = build()
        small = taesd()
        vae.requires_grad_(False)
        latent = size // 8
        x = torch.randn(batch, unet.config.in_channels, latent, latent)
        context = torch.randn(batch, tokens, unet.config.cross_attention_dim)
        t = torch.full((batch,), 500)
        z = torch.randn(batch, 4, latent, latent, requires_grad=True)
        crops = torch.randn(batch, 3, 112, 112, requires_grad=True)
    unet_step = count(lambda: unet(x, t, encoder_hidden_states=context).sample)
    id_net = count(lambda: arcface(crops))
    base = unet_step  # the optimizer step is a few flops per parameter: left out
    for label in decoders:
        decoder = {"VAE": vae, "TAESD": small}[label]
        total = 2 * unet_step + count(lambda d=decoder: d.decode(z).sample) + id_net
        share = min(1.0, 0.6 * base / (total - base))
        print(f"{name:5s} batch {batch}  arithmetic, {label:5s} decoder: {base:8.4f} -> "
              f"{total:8.4f} TFLOP/step  ratio {total / base:5.2f}; 1.6 with the loss on "
              f"{100 * share:3.0f}% of samples", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sd", action="store_true", help="also SD-1.5 geometry at 512 px")
    parser.add_argument("--sd-steps", type=int, default=2)
    parser.add_argument("--sd-warmup", type=int, default=0)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; target ratio <= 1.6")
    flops("tiny", lambda: (tiny_sfi_unet(cross_attention_dim=32, sample_size=8), tiny_vae(),
                           ArcFaceEncoderModel(layers=(1, 1, 1, 1), width=8)),
          size=64, batch=4, tokens=8)
    flops("sd15", lambda: (sd15_geometry_unet(), sd_vae(), ArcFaceEncoderModel()),
          size=512, batch=1, tokens=20, decoders=("VAE", "TAESD"))
    if not args.skip_tiny:
        torch.manual_seed(0)
        tiny = Setup(tiny_sfi_unet(cross_attention_dim=32, sample_size=8), tiny_vae(),
                     ArcFaceEncoderModel(layers=(1, 1, 1, 1), width=8), size=64, batch=4,
                     tokens=8, optimizer="adamw")
        measure("tiny", tiny, args.steps, args.warmup,
                {"diffusion loss only": (0,), "+ midpoint id loss (4/4)": (4,),
                 "+ midpoint id loss (1/4)": (1,)})
    if args.sd:
        torch.manual_seed(0)
        sd = Setup(sd15_geometry_unet(), sd_vae(), ArcFaceEncoderModel(), size=512, batch=1,
                   tokens=20, optimizer="sgd")
        measure("sd15", sd, args.sd_steps, args.sd_warmup,
                {"diffusion loss only": (0,), "+ midpoint id loss, TAESD decoder": (1, taesd()),
                 "+ midpoint id loss, SD VAE decoder": (1,)}, alternate=False)
    print(f"(bench wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

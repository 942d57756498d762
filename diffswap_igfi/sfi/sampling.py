"""Masked sampling, classifier-free guidance, warm start and ID mixing as small functions.

A sampler here is a short loop over any diffusers scheduler (DDIM, DPM-Solver++, Euler, ...):
``denoise(latents, t) -> noise prediction`` is the model, and after every scheduler step the
unmasked latent is replaced by the target's latent noised to the step reached, so the region
outside the mask is the target's, exactly, all the way down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask [B,1,H,W] in [0,1] -> binary latent mask [B,1,h,w] in {0,1}.

    A latent cell is repainted when any of its pixels is (max pooling), so every masked pixel
    is covered and the cells left alone are entirely outside the mask.
    """
    return (F.adaptive_max_pool2d(mask.float(), latent_size) > 0).to(mask.dtype)


def keep_unmasked(latents: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  scheduler, noise: torch.Tensor, timestep: torch.Tensor | None) -> torch.Tensor:
    """Where ``mask`` is 0, the target latent noised to ``timestep`` (clean when None)."""
    if timestep is None:
        known = target
    else:
        known = scheduler.add_noise(target, noise, timestep.reshape(1).to(target.device))
    return torch.where(mask > 0, latents, known.to(latents.dtype))


def guided(denoise_both: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance in one model call per step, as diffusers batches it.

    denoise_both: the model on a doubled batch [2B,...] whose first half is conditioned and
    second half unconditioned. Returns a denoiser on [B,...]: uncond + scale * (cond - uncond).
    """
    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = denoise_both(torch.cat([latents, latents]), t).chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise


def start_latents(scheduler, timesteps: torch.Tensor, noise: torch.Tensor,
                  warm: torch.Tensor | None) -> torch.Tensor:
    """Pure noise for a full run; a warm-start latent noised to the first timestep otherwise."""
    if warm is None:
        return noise * scheduler.init_noise_sigma
    return scheduler.add_noise(warm, noise, timesteps[:1])


def warm_start_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The last ``strength`` fraction of a schedule (img2img-style warm start)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    keep = max(1, min(len(timesteps), round(len(timesteps) * strength)))
    return timesteps[len(timesteps) - keep:]


def masked_sample(denoise: Denoiser, scheduler, target: torch.Tensor, mask: torch.Tensor,
                  timesteps: torch.Tensor, noise: torch.Tensor, *,
                  warm: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                  ) -> torch.Tensor:
    """Masked sampling over ``timesteps`` (already set on ``scheduler``; a suffix of them for a
    warm start).

    target: [B,4,h,w] target latents; mask: [B,1,h,w] in {0,1} (1 = repaint); noise: [B,4,h,w]
    the run's noise (also used to noise the target); warm: optional [B,4,h,w] latent to start
    from instead of pure noise. ``callback(i, t, latents)`` runs after every step. Returns the
    final latents, equal to ``target`` wherever mask is 0.
    """
    if warm is not None and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(len(scheduler.timesteps) - len(timesteps))
    latents = start_latents(scheduler, timesteps, noise, warm)
    latents = keep_unmasked(latents, target, mask, scheduler, noise, timesteps[0])
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        eps = denoise(model_input, t)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        following = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = keep_unmasked(latents, target, mask, scheduler, noise, following)
        if callback is not None:
            callback(i, t, latents)
    return latents


# ----------------------------------------------------------------------------- ID mixing (MFIM)
class TokenSelectProcessor:
    """Cross-attention that sees only some context tokens: the coarse blocks one identity's
    tokens, the fine blocks another's. Wraps diffusers' default SDPA processor."""

    def __init__(self, index: torch.Tensor) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.index = index
        self.base = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states[:, self.index.to(hidden_states.device)]
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def is_coarse(processor_name: str, num_levels: int) -> bool:
    """Whether an attention layer works at the UNet's coarse half of resolutions."""
    parts = processor_name.split(".")
    if parts[0] == "mid_block":
        return True
    level = int(parts[1])
    if parts[0] == "down_blocks":
        return level >= num_levels // 2
    return level < num_levels - num_levels // 2  # up_blocks run coarse to fine


def id_mix_processors(unet, num_id_tokens: int, num_other_tokens: int) -> dict:
    """Processors for a context laid out as [identity A (N), identity B (N), other (M)]:
    coarse cross-attention layers see [A, other], fine ones [B, other]; self-attention is left
    to the default processor."""
    n, m = num_id_tokens, num_other_tokens
    coarse = torch.cat([torch.arange(0, n), torch.arange(2 * n, 2 * n + m)])
    fine = torch.cat([torch.arange(n, 2 * n), torch.arange(2 * n, 2 * n + m)])
    levels = len(unet.config.block_out_channels)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if ".attn2." not in name:
            procs[name] = proc
        else:
            procs[name] = TokenSelectProcessor(coarse if is_coarse(name, levels) else fine)
    return procs

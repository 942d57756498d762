"""The SFI training step as library code: building the models a config asks for, and the
losses of one batch. ``train/train_sfi.py`` wires these into an accelerate loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from diffswap_igfi.data.validation import validation_pair
from diffswap_igfi.sfi.conditioning import UNetConditions, encode_crops, head_reference_tokens
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.training.config import SFIConfig
from diffswap_igfi.training.logs import image_grid


def build_sfi_pipeline(config: SFIConfig) -> DiffSwapIGFIPipeline:
    """The (untrained) pipeline the config describes, with a DDIM scheduler for sampling."""
    m = config.model
    if m.kind == "tiny":
        from diffswap_igfi.sfi.build import tiny_pipeline

        pipe = tiny_pipeline(seed=config.train.seed, crop_size=m.crop_size)
        if m.arcface:
            from diffswap_igfi.conditions.identity import ArcFaceEncoderModel

            pipe.identity_encoder = ArcFaceEncoderModel.from_file(m.arcface,
                                                                          m.arcface_arch)
    elif m.kind == "sd_inpaint":
        from diffswap_igfi.sfi.build import pipeline_from_sd_inpaint

        pipe = pipeline_from_sd_inpaint(m.sd_inpaint, arcface=m.arcface, clip_model=m.clip_model,
                                        clip_weights=m.clip_weights, crop_size=m.crop_size,
                                        id_tokens=m.id_tokens, clip_tokens=m.clip_tokens,
                                        arcface_arch=m.arcface_arch)
    else:
        from diffswap_igfi.sfi.build import pipeline_from_scratch

        pipe = pipeline_from_scratch(m.sd_inpaint, arcface=m.arcface, clip_model=m.clip_model,
                                     clip_weights=m.clip_weights, crop_size=m.crop_size,
                                     id_tokens=m.id_tokens, clip_tokens=m.clip_tokens,
                                     arcface_arch=m.arcface_arch)
    base = pipe.scheduler.config.prediction_type
    if m.kind == "sd_inpaint" and m.prediction_type not in (None, base):
        from diffswap_igfi.errors import ConfigError

        raise ConfigError(f"model.prediction_type {m.prediction_type} differs from the base "
                          f"model's {base} ({m.sd_inpaint}): remove the key to fine-tune it as "
                          f"it was trained")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               prediction_type=m.prediction_type or base)
    pipe.register_to_config(region=m.region)  # inference repaints what training masked
    return pipe


def training_scheduler(pipe: DiffSwapIGFIPipeline) -> DDPMScheduler:
    """The noise schedule training samples timesteps from (same betas as the pipeline's)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


@dataclass
class Frozen:
    """The parts training reads but does not change."""

    vae: torch.nn.Module
    identity_encoder: torch.nn.Module
    clip_encoder: torch.nn.Module

    @classmethod
    def of(cls, pipe: DiffSwapIGFIPipeline) -> Frozen:
        for module in (pipe.vae, pipe.identity_encoder, pipe.clip_encoder):
            module.requires_grad_(False)
            module.eval()
        return cls(pipe.vae, pipe.identity_encoder, pipe.clip_encoder)

    def to(self, device) -> Frozen:
        for module in (self.vae, self.identity_encoder, self.clip_encoder):
            module.to(device)
        return self


class SFITrainable(torch.nn.Module):
    """The trained parts (UNet, projectors) and the whole loss in one ``forward``.

    One forward per step is what DDP expects: the midpoint identity loss calls the UNet twice,
    and both calls must happen inside the wrapped forward for gradients to be synchronised.
    The frozen parts and the noise schedule are held outside the module tree, so DDP neither
    broadcasts nor checkpoints them.
    """

    def __init__(self, pipe: DiffSwapIGFIPipeline, scheduler: DDPMScheduler, config: SFIConfig,
                 id_loss: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.unet = pipe.unet
        self.id_projector = pipe.id_projector
        self.clip_projector = pipe.clip_projector
        object.__setattr__(self, "frozen", Frozen.of(pipe))
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "id_loss", id_loss)

    def forward(self, batch: dict, noise_seed: torch.Tensor) -> dict:
        """Losses of one batch of self-reconstruction.

        batch: SFIDataset samples (target [B,3,S,S] and source_id [B,3,112,112] in [-1,1],
        mask [B,1,S,S], geometry [B,7,s,s], kps [B,5,2], identity [B,512], has_identity,
        drop_identity, drop_clip; source [B,3,S,S] and head [B] bool: head-masked samples take
        CLIP tokens of their whole source crop, ``head_reference_tokens``). noise_seed: a [1]
        int64 tensor seeding this step's noise and timesteps, so a resumed run draws exactly
        what the uninterrupted one drew.
        Returns {"loss", "diffusion", "identity"} scalars (identity 0 when disabled), and
        "head_share" (the share of head masks in the batch) when ``augment.mask_head`` is on.
        """
        from diffswap_igfi.sfi.losses import (diffusion_loss, diffusion_target,
                                              midpoint_identity_loss)

        frozen, scheduler, config = self.frozen, self.scheduler, self.config
        target, mask = batch["target"], batch["mask"]
        device, dtype = target.device, target.dtype
        generator = torch.Generator().manual_seed(int(noise_seed.item()))
        with torch.no_grad():
            encoded = encode_crops(frozen.vae, frozen.clip_encoder, target, mask)
            clip_tokens = encoded.clip_tokens
            if "head" in batch:  # head-masked samples (augment.mask_head) see the source's hair
                clip_tokens = head_reference_tokens(frozen.clip_encoder, clip_tokens,
                                                    batch["source"], batch["head"])
            computed = frozen.identity_encoder(batch["source_id"])
            has = batch["has_identity"].to(device).bool()[:, None]
            source_embeds = torch.where(has, F.normalize(batch["identity"].to(dtype), dim=-1),
                                        computed)
        latents = encoded.latents
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        drop_id = batch["drop_identity"].bool()
        context = torch.cat([self.id_projector(source_embeds, drop=drop_id),
                             self.clip_projector(clip_tokens,
                                                 drop=batch["drop_clip"].bool())], dim=1)
        conditions = UNetConditions(encoded.mask, encoded.masked_latents, batch["geometry"],
                                    context)
        prediction = conditions.predict(self.unet, noisy, timesteps)
        diffusion = diffusion_loss(prediction,
                                   diffusion_target(scheduler, latents, noise, timesteps))
        identity = torch.zeros((), device=device)
        rows = self._identity_rows(timesteps, drop_id)
        if rows is not None:
            # only the chosen samples pay for the midpoint's second UNet call, VAE decode and
            # ArcFace pass: their conditions are sliced before the closure runs
            sub = conditions.rows(rows)

            def denoise_rows(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return sub.predict(self.unet, z, t)

            identity = midpoint_identity_loss(
                denoise_rows, scheduler, frozen.vae, noisy[rows], prediction[rows],
                timesteps[rows], kps=batch["kps"][rows], source_embeds=source_embeds[rows],
                id_loss=self.id_loss, mask=mask[rows], target=target[rows],
                t_range=(config.loss.id_t_min, config.loss.id_t_max))
        total = diffusion + config.loss.id_weight * identity
        return {"loss": total, "diffusion": diffusion.detach(), "identity": identity.detach(),
                **region_metrics(batch, config)}

    def _identity_rows(self, timesteps: torch.Tensor, dropped: torch.Tensor):
        """Samples that get the identity loss this step: conditioned on identity, t in the
        configured range, at most ``loss.id_fraction`` of the batch (at least one). None if
        the loss is off or no sample qualifies."""
        loss = self.config.loss
        if loss.id_weight <= 0 or self.id_loss is None:
            return None
        ok = (~dropped) & (timesteps >= loss.id_t_min) & (timesteps < loss.id_t_max)
        rows = torch.nonzero(ok).flatten()
        if rows.numel() == 0:
            return None
        keep = max(1, int(loss.id_fraction * len(timesteps)))
        return rows[:keep]


def region_metrics(batch: dict, config: SFIConfig) -> dict:
    """{"head_share": share of the batch's samples masked to the whole head} when training
    with head masks (``augment.mask_head`` > 0), else {}."""
    if float(config.augment.get("mask_head", 0)) <= 0:
        return {}
    return {"head_share": batch["head"].float().mean()}


@torch.no_grad()
def validation_grid(pipe: DiffSwapIGFIPipeline, steps: int = 10) -> np.ndarray:
    """One row source crop | target crop | swap ([S,3S,3] uint8) of
    ``data.validation.validation_pair``, sampled with a fixed seed, no guidance and no
    refiner."""
    source, target, face = validation_pair()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(target.rgb, [(face, source)], num_inference_steps=steps, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), refine=False)
    builder = pipe.condition_builder()
    crops = [builder.aligned(source.rgb, source.face).crop, builder.aligned(target.rgb, face).crop]
    return image_grid([[*crops, out.crops[0]]])

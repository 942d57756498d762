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
    # saved with the pipeline: inference repaints what training masked and conditions the
    # UNet as training did
    pipe.register_to_config(region=m.region, condition=m.condition,
                            condition_blur=float(m.condition_blur))
    return pipe


def midpoint_judges(config: SFIConfig, pipe: DiffSwapIGFIPipeline,
                    id_loss: torch.nn.Module | None = None):
    """The losses the config asks for on the decoded midpoint estimate (``sfi.losses.
    MidpointJudges``), or None when all are off. id_loss: the identity loss to use (default:
    ``IdentityLoss`` of the pipeline's ArcFace when ``loss.id_weight`` > 0)."""
    from diffswap_igfi.sfi.losses import IdentityLoss, MidpointJudges, PerceptualLoss

    loss, model = config.loss, config.model
    if id_loss is None and loss.id_weight > 0:
        id_loss = IdentityLoss(pipe.identity_encoder)
    tddfa = eye = perceptual = None
    if loss.tddfa_weight > 0 or loss.eye_weight > 0:
        from diffswap_igfi.geometry.tddfa_torch import EyeLoss, TDDFAParams, ThreeDMMLoss

        params = TDDFAParams.from_path(model.tddfa).eval()
        if loss.tddfa_weight > 0:
            tddfa = ThreeDMMLoss(params)
        if loss.eye_weight > 0:
            # heatmaps as wide as a 64 px crop's 2 px, at any crop size
            eye = EyeLoss(params, sigma=model.crop_size / 32.0)
    if loss.perceptual_weight > 0:
        perceptual = PerceptualLoss(loss.perceptual_weights)
    judges = MidpointJudges(identity=id_loss if loss.id_weight > 0 else None, tddfa=tddfa,
                            eye=eye, perceptual=perceptual)
    return judges if judges.names else None


def training_scheduler(pipe: DiffSwapIGFIPipeline) -> DDPMScheduler:
    """The noise schedule training samples timesteps from (same betas as the pipeline's)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


@dataclass
class Frozen:
    """The parts training reads but does not change."""

    vae: torch.nn.Module
    identity_encoder: torch.nn.Module
    clip_encoder: torch.nn.Module
    judges: torch.nn.Module | None = None  # the image-space losses' networks (ArcFace, ...)

    @classmethod
    def of(cls, pipe: DiffSwapIGFIPipeline, judges: torch.nn.Module | None = None) -> Frozen:
        for module in (pipe.vae, pipe.identity_encoder, pipe.clip_encoder, judges):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        return cls(pipe.vae, pipe.identity_encoder, pipe.clip_encoder, judges)

    def to(self, device) -> Frozen:
        for module in (self.vae, self.identity_encoder, self.clip_encoder, self.judges):
            if module is not None:
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
                 id_loss: torch.nn.Module | None = None, *, judges=None) -> None:
        """id_loss: the identity loss (kept for callers that pass only it); judges: a
        ``sfi.losses.MidpointJudges`` (``midpoint_judges``) with every image-space term, which
        takes precedence. Both are frozen and held outside the module tree (see the class
        doc); ``frozen.to`` moves them with the VAE."""
        super().__init__()
        self.unet = pipe.unet
        self.id_projector = pipe.id_projector
        self.clip_projector = pipe.clip_projector
        if judges is None and id_loss is not None and config.loss.id_weight > 0:
            from diffswap_igfi.sfi.losses import MidpointJudges

            judges = MidpointJudges(identity=id_loss)
        object.__setattr__(self, "frozen", Frozen.of(pipe, judges))
        object.__setattr__(self, "scheduler", scheduler)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "judges", judges)
        object.__setattr__(self, "condition", (pipe.config.condition,
                                               pipe.config.condition_blur))

    def forward(self, batch: dict, noise_seed: torch.Tensor) -> dict:
        """Losses of one batch of self-reconstruction.

        batch: SFIDataset samples (target [B,3,S,S] and source_id [B,3,112,112] in [-1,1],
        mask [B,1,S,S], geometry [B,7,s,s], kps [B,5,2], identity [B,512], has_identity,
        drop_identity, drop_clip; source [B,3,S,S] and head [B] bool: head-masked samples take
        CLIP tokens of their whole source crop, ``head_reference_tokens``). noise_seed: a [1]
        int64 tensor seeding this step's noise and timesteps, so a resumed run draws exactly
        what the uninterrupted one drew.
        Returns {"loss", "diffusion", "identity"} scalars (identity 0 when disabled), plus
        each enabled image-space term of ``judges`` (tddfa with tddfa_shape/_pose/_expression,
        eye, perceptual; 0 on steps where no sample qualifies), and "head_share" (the share of
        head masks in the batch) when ``augment.mask_head`` is on. The image-space terms all
        score one decoded midpoint estimate of the same sub-batch (``loss.id_fraction`` of it,
        t in [id_t_min, id_t_max), identity not dropped).
        """
        from diffswap_igfi.sfi.losses import diffusion_loss, diffusion_target, midpoint_images

        frozen, scheduler, config = self.frozen, self.scheduler, self.config
        target, mask = batch["target"], batch["mask"]
        device, dtype = target.device, target.dtype
        generator = torch.Generator().manual_seed(int(noise_seed.item()))
        with torch.no_grad():
            condition, blur = self.condition
            encoded = encode_crops(frozen.vae, frozen.clip_encoder, target, mask,
                                   condition=condition, condition_blur=blur)
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
        terms = {name: torch.zeros((), device=device) for name in self._term_names()}
        rows = self._midpoint_rows(timesteps, drop_id)
        if rows is not None:
            # only the chosen samples pay for the midpoint's second UNet call, the VAE decode and
            # the judges: their conditions are sliced before the closure runs
            sub = conditions.rows(rows)

            def denoise_rows(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return sub.predict(self.unet, z, t)

            _, images = midpoint_images(
                denoise_rows, scheduler, frozen.vae, noisy[rows], prediction[rows],
                timesteps[rows], mask=mask[rows], target=target[rows],
                t_range=(config.loss.id_t_min, config.loss.id_t_max))
            terms.update(self.judges(images, target[rows], batch["kps"][rows],
                                     source_embeds[rows]))
        weights = self._weights()
        total = diffusion + sum(w * terms[name] for name, w in weights.items())
        return {"loss": total, "diffusion": diffusion.detach(),
                **{name: value.detach() for name, value in terms.items()},
                **region_metrics(batch, config)}

    def _weights(self) -> dict[str, float]:
        loss = self.config.loss
        names = self.judges.names if self.judges is not None else []
        weight = {"identity": loss.id_weight, "tddfa": loss.tddfa_weight,
                  "eye": loss.eye_weight, "perceptual": loss.perceptual_weight}
        return {name: weight[name] for name in names}

    def _term_names(self) -> list[str]:
        """The keys of the image-space terms in every step's output (so metrics.jsonl has the
        same columns on every step and every rank): identity always, then the enabled ones."""
        names = ["identity"]
        if self.judges is not None:
            for name in self.judges.names:
                if name == "tddfa":
                    names += ["tddfa", "tddfa_shape", "tddfa_pose", "tddfa_expression"]
                elif name != "identity":
                    names.append(name)
        return names

    def _midpoint_rows(self, timesteps: torch.Tensor, dropped: torch.Tensor):
        """Samples whose midpoint estimate is decoded and judged this step: conditioned on
        identity, t in the configured range, at most ``loss.id_fraction`` of the batch (at least
        one). None if no image-space loss is on or no sample qualifies."""
        loss = self.config.loss
        if self.judges is None:
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

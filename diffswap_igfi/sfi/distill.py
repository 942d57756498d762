"""Latent consistency distillation (LCM, LCM-LoRA) of a trained SFI teacher into a few-step
student.

The student is the teacher's UNet (fully fine-tuned, or with a LoRA: LCM-LoRA) taught to map
any point of the teacher's guided sampling trajectory straight to its end, so it swaps in 1-4
UNet evaluations with diffusers' ``LCMScheduler``. One training step (``LCMDistillTrainable``):

1. the batch's target latents are noised to a timestep ``t`` of the solver's skipping-step grid
   ``[k-1, 2k-1, ..., T-1]`` (k = T / ``num_ddim_timesteps``, the grid ``LCMScheduler`` samples
   on);
2. the student's consistency estimate at ``t``: ``c_skip(t) x_t + c_out(t) x0_student``;
3. the frozen teacher, with identity classifier-free guidance at scale ``w`` (the conditional
   and null-identity halves in one call), takes one DDIM step from ``t`` to ``t - k``; outside
   the inpainting mask the step lands on the target's latent noised to ``t - k``, as masked
   sampling does (x0 is not clipped unless ``distill.clip_sample``);
4. the target network (an EMA of the student, ``target_decay``; or the student itself without
   gradients when 0, as LCM-LoRA does) gives its consistency estimate at ``t - k``; the loss is
   the pseudo-Huber distance between the two estimates (scaled by sqrt(alpha_t) with
   ``weighting: signal``). At ``t - k = 0`` the boundary scalings are (1, 0): the target is
   the teacher's step itself.

The guidance ``w`` is folded into the student (LCM's guided distillation): the student runs one
UNet call per step, no null-identity half. ``w`` is fixed, or drawn per sample from
``[guidance_min, guidance_max]`` (LCM-LoRA's range, without a w-embedding).

``sfi.student.LCMStudentPipeline`` is the exported student: a ``DiffSwapIGFIPipeline`` with an
``LCMScheduler`` (or, ``sampler: tcd_deterministic``, TCD without fresh noise) and its own
defaults (``default_steps`` evaluations, guidance 1 = no extra CFG), so
``diffswap-igfi swap --checkpoint STUDENT [--steps 1..4]`` runs the teacher's masked sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.sfi.conditioning import UNetConditions, encode_crops
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.training.config import (EMAConfig, LoRAConfig, OptimConfig, RunConfig,
                                           common_checks)

SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constant


# ----------------------------------------------------------------------------------- config
@dataclass
class LCMSettings:
    num_ddim_timesteps: int = 50  # the teacher solver's grid: skipping step k = T / this
    guidance_min: float = 3.0  # identity CFG scale folded into the student (s: u + s (c - u))
    guidance_max: float = 3.0  # > guidance_min: drawn per sample (LCM-LoRA's range)
    timestep_scaling: float = 10.0  # c_skip/c_out sharpness, as LCMScheduler's config
    loss: str = "huber"  # huber | l2
    # none (LCM's): the distance between x0 estimates; signal: scaled by sqrt(alpha_t) of the
    # student's timestep, so the x0 error amplified by 1/sqrt(alpha_t) at high noise (x156 at
    # t=999 on a linear schedule) does not drown the rest of the batch
    weighting: str = "none"
    huber_c: float = 0.001
    target_decay: float = 0.95  # EMA of the target network; 0: the student itself (LCM-LoRA)
    default_steps: int = 4  # the exported student's evaluations without --steps
    # clip x0 to the teacher scheduler's clip_sample_range, in the solver and the student's
    # LCMScheduler. Off, as LCM: latents are not images, and diffusers' DDIMScheduler() default
    # (clip_sample=True, kept by the tiny teacher) makes the sampler chaotic on small latents
    clip_sample: bool = False
    # the exported student's scheduler: lcm (LCMScheduler: fresh noise between steps) or
    # tcd_deterministic (the model's own noise estimate: follows the teacher's trajectory)
    sampler: str = "lcm"


@dataclass
class DistillConfig:
    teacher: str | None = None  # a DiffSwapIGFIPipeline folder (train_sfi.py's RUN/pipeline)
    distill: LCMSettings = field(default_factory=LCMSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=lambda: RunConfig(train_modules=["unet"]))
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    augment: dict[str, Any] = field(default_factory=dict)  # passed to data.augment

    def validate(self) -> None:
        d = self.distill
        checks = [
            (d.num_ddim_timesteps >= 4,
             f"distill.num_ddim_timesteps must be >= 4, got {d.num_ddim_timesteps}"),
            (1.0 <= d.guidance_min <= d.guidance_max,
             f"distill.guidance_min must be >= 1 and <= distill.guidance_max, got "
             f"{d.guidance_min}..{d.guidance_max}"),
            (d.timestep_scaling > 0, "distill.timestep_scaling must be positive"),
            (d.loss in ("huber", "l2"), f"distill.loss must be huber or l2, got {d.loss!r}"),
            (d.sampler in ("lcm", "tcd_deterministic"),
             f"distill.sampler must be lcm or tcd_deterministic, got {d.sampler!r}"),
            (d.weighting in ("none", "signal"),
             f"distill.weighting must be none or signal, got {d.weighting!r}"),
            (d.huber_c > 0, "distill.huber_c must be positive"),
            (0.0 <= d.target_decay < 1.0,
             f"distill.target_decay must be in [0, 1), got {d.target_decay}"),
            (1 <= d.default_steps <= d.num_ddim_timesteps,
             f"distill.default_steps must be in [1, num_ddim_timesteps], got "
             f"{d.default_steps}"),
            (self.train.train_modules == ["unet"],
             f"train.train_modules: distillation trains the UNet only, got "
             f"{self.train.train_modules}"),
            (self.train.max_steps > 0 and self.train.batch_size > 0,
             "train.max_steps and train.batch_size must be positive"),
            (self.train.checkpoint_every > 0 and self.train.keep_checkpoints > 0,
             "train.checkpoint_every and train.keep_checkpoints must be positive"),
            (self.train.mixed_precision in ("no", "fp16", "bf16"),
             f"train.mixed_precision must be no, fp16 or bf16, got "
             f"{self.train.mixed_precision!r}"),
            *common_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad config: {message}")


# ------------------------------------------------------------------- the consistency maths
def solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The skipping-step grid [N] int64: ``[k-1, 2k-1, ..., N k - 1]`` with k = T // N, the
    timesteps ``LCMScheduler`` draws its inference schedule from."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * k - 1


def clip_range(scheduler_config, clip_sample: bool) -> float | None:
    """The x0 clip range the distillation and the student use: the teacher scheduler's
    ``clip_sample_range`` when ``distill.clip_sample`` asks for clipping, else None."""
    return float(scheduler_config.get("clip_sample_range", 1.0)) if clip_sample else None


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) [B] float32 at integer timesteps [B], as
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``: (1, 0) at t = 0, so the
    consistency function is the identity there."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip.float(), c_out.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def x0_and_noise(output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                 alphas_cumprod: torch.Tensor, prediction_type: str,
                 clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a model output implies, as diffusers' DDIM step does.

    output, sample: [B,4,h,w]; timesteps: [B] int64; alphas_cumprod: [T] the schedule's
    cumulative alphas; prediction_type: epsilon | v_prediction; clip: the scheduler's
    ``clip_sample_range`` when it clips x0 (the noise is then re-derived from the clipped x0).
    Returns (x0, eps) [B,4,h,w].
    """
    alpha = _per_sample(alphas_cumprod[timesteps.cpu()], sample)
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        x0, eps = (sample - s * output) / a, output
    elif prediction_type == "v_prediction":
        x0, eps = a * sample - s * output, a * output + s * sample
    else:
        raise ConfigError(f"the teacher predicts {prediction_type!r}; distillation supports "
                          f"epsilon and v_prediction")
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (sample - a * x0) / s
    return x0, eps


def consistency_estimate(output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                         alphas_cumprod: torch.Tensor, prediction_type: str,
                         timestep_scaling: float, clip: float | None = None) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(output): what ``LCMScheduler.step`` denoises to
    (x0 clipped to ``clip`` when its config clips). Shapes as ``x0_and_noise``."""
    x0, _ = x0_and_noise(output, timesteps, sample, alphas_cumprod, prediction_type, clip)
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling)
    return _per_sample(c_skip, sample) * sample + _per_sample(c_out, sample) * x0


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step to the timestep whose cumulative alpha is ``alpha_prev``
    ([B]): sqrt(a') x0 + sqrt(1 - a') eps."""
    a = _per_sample(alpha_prev, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def noised(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process: sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample ([B] timesteps)."""
    a = _per_sample(alphas_cumprod[timesteps.cpu()], latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "huber",
                     huber_c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber sqrt(d^2 + c^2) - c (LCM's), or the mean squared error; a scalar."""
    if kind == "l2":
        return F.mse_loss(prediction.float(), target.float())
    diff = (prediction.float() - target.float()) ** 2
    return (torch.sqrt(diff + huber_c ** 2) - huber_c).mean()


# ---------------------------------------------------------------------------- the trainable
@dataclass
class DistillFrozen:
    """What the distillation reads and does not train: the teacher UNet, the projectors and
    encoders (shared with the student, the teacher's), the noise schedule."""

    teacher: torch.nn.Module
    vae: torch.nn.Module
    identity_encoder: torch.nn.Module
    clip_encoder: torch.nn.Module
    id_projector: torch.nn.Module
    clip_projector: torch.nn.Module
    alphas_cumprod: torch.Tensor  # [T] float32, on the CPU (indexed there)
    prediction_type: str
    clip: float | None  # the x0 clip range (distill.clip_sample), None: no clipping

    def modules(self) -> list[torch.nn.Module]:
        return [self.teacher, self.vae, self.identity_encoder, self.clip_encoder,
                self.id_projector, self.clip_projector]

    def to(self, device) -> DistillFrozen:
        for module in self.modules():
            module.to(device)
        return self


class TargetNetwork:
    """The consistency target: an fp32 EMA copy of the student UNet (LCM), updated after every
    optimizer step; checkpointed with the run (``state_dict``/``load_state_dict``)."""

    def __init__(self, student: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.unet = copy.deepcopy(student).requires_grad_(False).eval()
        self._pairs = [(t, s) for (_, t), (_, s) in zip(self.unet.named_parameters(),
                                                         student.named_parameters())]

    @torch.no_grad()
    def update(self) -> None:
        for target, online in self._pairs:
            target.lerp_(online.detach().to(target.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.unet.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.unet.load_state_dict(state)


class LCMDistillTrainable(torch.nn.Module):
    """The student UNet and the whole consistency loss in one ``forward`` (one forward per step
    for DDP). Teacher, encoders, projectors and the target network live outside the module
    tree: DDP neither broadcasts nor checkpoints them (the target network is checkpointed as a
    registered object)."""

    def __init__(self, teacher: DiffSwapIGFIPipeline, settings: LCMSettings) -> None:
        super().__init__()
        for module in (teacher.unet, teacher.vae, teacher.identity_encoder,
                       teacher.clip_encoder, teacher.id_projector, teacher.clip_projector):
            module.requires_grad_(False).eval()
        self.unet = copy.deepcopy(teacher.unet).train()
        self.unet.requires_grad_(True)
        scheduler = teacher.scheduler
        num_train = scheduler.config.num_train_timesteps
        if num_train % settings.num_ddim_timesteps:
            raise ConfigError(f"distill.num_ddim_timesteps {settings.num_ddim_timesteps} must "
                              f"divide the teacher's {num_train} training timesteps")
        object.__setattr__(self, "frozen", DistillFrozen(
            teacher.unet, teacher.vae, teacher.identity_encoder, teacher.clip_encoder,
            teacher.id_projector, teacher.clip_projector,
            scheduler.alphas_cumprod.float().cpu(), scheduler.config.prediction_type,
            clip_range(scheduler.config, settings.clip_sample)))
        object.__setattr__(self, "settings", settings)
        # condition the UNet as the teacher was trained to be (masked or blurred face)
        object.__setattr__(self, "condition", (teacher.config.get("condition", "masked"),
                                               teacher.config.get("condition_blur", 0.125)))
        object.__setattr__(self, "solver", solver_timesteps(num_train,
                                                            settings.num_ddim_timesteps))
        object.__setattr__(self, "target_network", None)

    def attach_target(self) -> TargetNetwork | None:
        """Create the EMA target network (after LoRA was added, so it mirrors the student);
        None when ``target_decay`` is 0 (the student is its own target)."""
        if self.settings.target_decay > 0:
            object.__setattr__(self, "target_network",
                               TargetNetwork(self.unet, self.settings.target_decay))
        return self.target_network

    def update_target(self) -> None:
        """Call after every optimizer step."""
        if self.target_network is not None:
            self.target_network.update()

    def conditions(self, batch: dict) -> tuple[UNetConditions, torch.Tensor, torch.Tensor]:
        """The student's (identity-conditioned) UNet conditions, the null-identity context for
        the teacher's unconditional half, and the target latents [B,4,h,w]."""
        frozen = self.frozen
        target, mask = batch["target"], batch["mask"]
        with torch.no_grad():
            condition, blur = self.condition
            encoded = encode_crops(frozen.vae, frozen.clip_encoder, target, mask,
                                   condition=condition, condition_blur=blur)
            computed = frozen.identity_encoder(batch["source_id"])
            has = batch["has_identity"].to(target.device).bool()[:, None]
            embeds = torch.where(has, F.normalize(batch["identity"].to(target.dtype), dim=-1),
                                 computed)
            clip = frozen.clip_projector(encoded.clip_tokens)
            context = torch.cat([frozen.id_projector(embeds), clip], 1)
            null = torch.cat([frozen.id_projector.null(len(target)).to(clip), clip], 1)
        conditions = UNetConditions(encoded.mask, encoded.masked_latents, batch["geometry"],
                                    context)
        return conditions, null, encoded.latents

    def forward(self, batch: dict, noise_seed: torch.Tensor) -> dict:
        """The consistency loss of one batch.

        batch: SFIDataset samples (target [B,3,S,S] and source_id [B,3,112,112] in [-1,1],
        mask [B,1,S,S], geometry [B,7,s,s], identity [B,512], has_identity); condition-dropout
        flags are ignored (the student is always identity-conditioned; the guidance is folded
        in). noise_seed: [1] int64 seeding the step's noise, timesteps and guidance scales.
        Returns {"loss", "consistency", "teacher_gap", "guidance"} scalars: teacher_gap is the
        mean squared distance between the student's estimate and the guided teacher's x0 at
        the same point (a diagnostic, no gradient).
        """
        s, frozen = self.settings, self.frozen
        conditions, null, latents = self.conditions(batch)
        device, dtype = latents.device, latents.dtype
        generator = torch.Generator().manual_seed(int(noise_seed.item()))
        b = len(latents)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        index = torch.randint(0, len(self.solver), (b,), generator=generator)
        guidance = (s.guidance_min + (s.guidance_max - s.guidance_min)
                    * torch.rand(b, generator=generator))
        start = self.solver[index]
        previous = (start - (self.solver[0] + 1)).clamp(min=0)
        alphas, kind, clip = frozen.alphas_cumprod, frozen.prediction_type, frozen.clip
        noisy = noised(latents, noise, start, alphas)

        out = conditions.predict(self.unet, noisy, start.to(device))
        prediction = consistency_estimate(out, start, noisy, alphas, kind, s.timestep_scaling,
                                          clip)
        with torch.no_grad():
            both = conditions.with_unconditional(null).predict(
                frozen.teacher, torch.cat([noisy, noisy]), torch.cat([start, start]).to(device))
            cond, uncond = both.chunk(2)
            guided = uncond + _per_sample(guidance, cond) * (cond - uncond)
            x0, eps = x0_and_noise(guided, start, noisy, alphas, kind, clip)
            stepped = ddim_step(x0, eps, alphas[previous])
            # masked sampling puts the target's latent, noised to the step reached, outside
            stepped = torch.where(conditions.mask > 0, stepped,
                                  noised(latents, noise, previous, alphas))
            target_unet = (self.unet if self.target_network is None
                           else self.target_network.unet)
            target = consistency_estimate(conditions.predict(target_unet, stepped,
                                                             previous.to(device)),
                                          previous, stepped, alphas, kind, s.timestep_scaling,
                                          clip)
            gap = F.mse_loss(prediction.float(), x0.float())
        if s.weighting == "signal":
            scale = _per_sample(alphas[start.cpu()].sqrt(), prediction)
            prediction, target = prediction * scale, target * scale
        loss = consistency_loss(prediction, target, s.loss, s.huber_c)
        return {"loss": loss, "consistency": loss.detach(), "teacher_gap": gap,
                "guidance": guidance.mean().to(device)}


# --------------------------------------------------------------------- comparing samplers
def crop_scores(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two [S,S,3] uint8 swapped crops over the repainted region.

    mask: [S,S] > 0 where the face was repainted (outside it both crops are the target's, so a
    whole-crop score would be inflated). PSNR over the masked pixels (inf when equal); SSIM:
    skimage's per-pixel SSIM map (7x7 windows, per channel, then the channel mean) averaged
    over the masked pixels.
    """
    from skimage.metrics import structural_similarity

    inside = mask > 0
    diff = a.astype(np.float64)[inside] - b.astype(np.float64)[inside]
    mse = float(np.mean(diff ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
    _, ssim_map = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    return psnr, float(ssim_map.mean(axis=2)[inside].mean())

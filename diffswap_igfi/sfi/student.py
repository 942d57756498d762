"""The few-step student a consistency distillation (``sfi.distill``) exports.

``LCMStudentPipeline`` is a ``DiffSwapIGFIPipeline`` whose folder holds the student UNet and a
diffusers ``LCMScheduler`` (the ``scheduler`` entry of model_index.json; or the deterministic
``DeterministicTCDScheduler`` below, ``distill.sampler: tcd_deterministic``). Its own defaults come
from its config: ``default_steps`` UNet evaluations, and guidance 1, because the identity
guidance it was distilled with (``distilled_guidance``, the teacher's CFG scale or range) is
folded into the weights: one UNet call per step on the batch, no null-identity half. Sampling
is the teacher's masked sampling, so the unmasked region stays the target's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import LCMScheduler, TCDScheduler
# diffusers' pipeline loader finds a component's base class (SchedulerMixin) in the module
# model_index.json names, so DeterministicTCDScheduler loads from this module only with it here
from diffusers import SchedulerMixin  # noqa: F401

from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline


class LCMStudentPipeline(DiffSwapIGFIPipeline):
    """A distilled SFI pipeline. ``pipe(target, faces)`` samples ``default_steps`` evaluations
    at guidance 1; a ``guidance_scale`` > 1 adds real CFG on top of the distilled one (two
    rows per face per step), as diffusers allows for LCM-LoRA students."""

    def __init__(self, vae, unet, scheduler, id_projector, clip_projector, identity_encoder,
                 clip_encoder, refiner=None, dictionary=None, crop_size: int = 512,
                 template: str = "ffhq", region: str = "face", condition: str = "masked",
                 condition_blur: float = 0.125, default_steps: int = 4,
                 distilled_guidance: Sequence[float] = (3.0, 3.0)) -> None:
        super().__init__(vae, unet, scheduler, id_projector, clip_projector, identity_encoder,
                         clip_encoder, refiner, dictionary, crop_size, template, region,
                         condition, condition_blur)
        self.register_to_config(default_steps=int(default_steps),
                                distilled_guidance=[float(g) for g in distilled_guidance])

    def __call__(self, target, faces, *, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, **kwargs):
        """As ``DiffSwapIGFIPipeline.__call__``; ``num_inference_steps`` None = this
        checkpoint's ``default_steps``."""
        steps = self.config.default_steps if num_inference_steps is None else num_inference_steps
        return super().__call__(target, faces, num_inference_steps=steps,
                                guidance_scale=guidance_scale, **kwargs)


class DeterministicTCDScheduler(TCDScheduler):
    """diffusers' ``TCDScheduler`` at gamma (``eta``) 0: each step re-noises the clean estimate
    with the model's own noise estimate instead of LCM's fresh noise, so a run is a
    deterministic function of its starting noise and follows the teacher's DDIM trajectory.
    ``step`` ignores ``eta`` (masked sampling calls it without one; TCD's default is 0.3)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None,
             return_dict: bool = True):
        return super().step(model_output, timestep, sample, eta=0.0, generator=generator,
                            return_dict=return_dict)


SAMPLERS = {"lcm": LCMScheduler, "tcd_deterministic": DeterministicTCDScheduler}


def student_scheduler(teacher_scheduler, num_ddim_timesteps: int, timestep_scaling: float,
                      clip_sample: bool = False, sampler: str = "lcm"):
    """The student's scheduler (``SAMPLERS[sampler]``: LCM's multistep sampling, fresh noise
    between steps; or deterministic TCD) on the teacher's noise schedule (betas, prediction
    type, clip range) and the distillation's timestep grid (``original_inference_steps``); x0
    clipped only with ``clip_sample`` (as the distillation was run)."""
    return SAMPLERS[sampler].from_config(teacher_scheduler.config,
                                         original_inference_steps=num_ddim_timesteps,
                                         timestep_scaling=timestep_scaling,
                                         clip_sample=clip_sample, thresholding=False,
                                         steps_offset=0, timestep_spacing="leading")


def student_pipeline(teacher: DiffSwapIGFIPipeline, unet, *, num_ddim_timesteps: int,
                     timestep_scaling: float, default_steps: int,
                     distilled_guidance: Sequence[float], clip_sample: bool = False,
                     sampler: str = "lcm") -> LCMStudentPipeline:
    """The exported student: ``teacher``'s components with ``unet`` and its scheduler."""
    parts = dict(teacher.components)
    parts.update(unet=unet, scheduler=student_scheduler(teacher.scheduler, num_ddim_timesteps,
                                                        timestep_scaling, clip_sample, sampler))
    # the teacher's region and conditioning travel with it: the student was distilled on them
    inherited = {k: teacher.config[k] for k in ("region", "condition", "condition_blur")
                 if k in teacher.config}
    return LCMStudentPipeline(**parts, crop_size=teacher.config.crop_size,
                              template=teacher.config.template, **inherited,
                              default_steps=default_steps,
                              distilled_guidance=distilled_guidance)

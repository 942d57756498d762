"""Training losses of the SFI stage: the diffusion objective and the terms scored on the decoded
midpoint estimate (``midpoint_images``, decoded once per step): DiffSwap's identity loss, MFIM's
3DMM supervision, GHOST's eye loss and the perceptual loss (``MidpointJudges``; the generic losses
that JR shares live in ``diffswap_igfi.losses``, the 3DDFA_V2 ones in
``geometry.tddfa_torch``).

Everything works on any diffusers scheduler that exposes ``alphas_cumprod`` (DDPM, DDIM,
DPM-Solver++, Euler ...) and any of its three ``prediction_type``s. Timesteps are per sample,
``[B]`` long (a scalar is broadcast). ``denoise(latents, t) -> model output`` is the UNet with
the batch's conditions bound (the same convention as ``sfi.sampling``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.losses import IdentityLoss, PerceptualLoss  # noqa: F401  (their home before)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------- noise-schedule algebra
def _per_sample(timesteps, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as [B] long on x's device (a scalar or [1] is broadcast to the batch)."""
    t = torch.as_tensor(timesteps, device=x.device).long().flatten()
    return t.expand(x.shape[0]) if t.numel() == 1 else t


def _coefficients(scheduler, timesteps, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t)), each [B,1,...,1], computed as diffusers' add_noise does
    (in x's dtype, at least float32) so that the conversions below invert it to rounding."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    abar = scheduler.alphas_cumprod.to(device=x.device, dtype=dtype)[_per_sample(timesteps, x)]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (abar**0.5).reshape(shape), ((1 - abar) ** 0.5).reshape(shape)


def _prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"unsupported scheduler prediction_type {kind!r}; use one of "
                          f"{', '.join(PREDICTION_TYPES)}")
    return kind


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses for ``scheduler.config.prediction_type``.

    latents: [B,4,h,w] clean (scaled) latents x0; noise: [B,4,h,w] N(0,1) eps; timesteps: [B].
    Returns [B,4,h,w]: eps (epsilon), sqrt(abar) eps - sqrt(1-abar) x0 (v_prediction, diffusers'
    ``get_velocity``), or x0 (sample). Raises ConfigError for any other prediction type.
    """
    kind = _prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    a, s = _coefficients(scheduler, timesteps, latents)
    return (a * noise - s * latents).to(latents.dtype)


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor,
                   mask: torch.Tensor | None = None, *,
                   mask_weight: float | None = None) -> torch.Tensor:
    """MSE between model output and target, in float32. Returns a scalar.

    model_output, target: [B,C,h,w]; mask: [B,1,h,w] in [0,1] at latent resolution (1 = the
    repainted face). With ``mask_weight`` w, squared errors inside the mask count w times those
    outside (the mean is normalised by the total weight, so w = 1 is the plain MSE).
    """
    err = (model_output.float() - target.float()) ** 2
    if mask is None or mask_weight is None:
        return err.mean()
    weight = (1.0 + (mask_weight - 1.0) * mask.float()).expand_as(err)
    return (weight * err).sum() / weight.sum().clamp_min(1e-12)


def predicted_x0(scheduler, noisy: torch.Tensor, model_output: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by one model output. noisy, model_output: [B,4,h,w] (z_t and the
    prediction of ``scheduler.config.prediction_type``); timesteps: [B]. Returns [B,4,h,w] in
    noisy's dtype; differentiable in both inputs."""
    kind = _prediction_type(scheduler)
    if kind == "sample":
        return model_output
    a, s = _coefficients(scheduler, timesteps, model_output)
    if kind == "epsilon":
        return ((noisy - s * model_output) / a).to(noisy.dtype)
    return (a * noisy - s * model_output).to(noisy.dtype)


def predicted_eps(scheduler, noisy: torch.Tensor, model_output: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
    """The noise implied by one model output; shapes as ``predicted_x0``. For ``sample``
    prediction this divides by sqrt(1 - abar_t), which is small (not zero) at t = 0."""
    kind = _prediction_type(scheduler)
    if kind == "epsilon":
        return model_output
    a, s = _coefficients(scheduler, timesteps, model_output)
    if kind == "v_prediction":
        return (s * noisy + a * model_output).to(noisy.dtype)
    return ((noisy - a * model_output) / s).to(noisy.dtype)


def midpoint_estimate(denoise: Denoiser, scheduler, noisy: torch.Tensor,
                      model_output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """DiffSwap's midpoint estimation of x0 from a training sample at step t.

    From the first prediction at t take (x0, eps), jump deterministically (DDIM, eta = 0) to
    t1 = floor(t / 2): z_t1 = sqrt(abar_t1) x0 + sqrt(1 - abar_t1) eps, predict again with
    ``denoise(z_t1, t1)`` and return the x0 of that second prediction: a much sharper estimate
    than the one-step x0 at large t, for one extra UNet call. Gradients flow through both calls.

    noisy: [B,4,h,w] z_t; model_output: [B,4,h,w] the UNet's output at (z_t, t); timesteps: [B].
    Returns x0_hat [B,4,h,w] (scaled latent space, unclamped).
    """
    t = _per_sample(timesteps, noisy)
    t1 = torch.div(t, 2, rounding_mode="floor")
    x0 = predicted_x0(scheduler, noisy, model_output, t)
    eps = predicted_eps(scheduler, noisy, model_output, t)
    a1, s1 = _coefficients(scheduler, t1, noisy)
    z1 = (a1 * x0 + s1 * eps).to(noisy.dtype)
    return predicted_x0(scheduler, z1, denoise(z1, t1), t1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B,4,h,w] -> images [B,3,H,W] (about [-1,1]) through ``vae.decode``, with
    gradients. SD's VAE overflows in fp16 (``force_upcast``): under autocast it decodes in its
    own (fp32) weights."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (latents / vae.config.scaling_factor + shift).to(vae.dtype)
    if getattr(vae.config, "force_upcast", False):
        with torch.autocast(latents.device.type, enabled=False):
            return vae.decode(latents).sample
    return vae.decode(latents).sample


def midpoint_images(denoise: Denoiser, scheduler, vae, noisy: torch.Tensor,
                    model_output: torch.Tensor, timesteps: torch.Tensor, *,
                    mask: torch.Tensor | None = None, target: torch.Tensor | None = None,
                    t_range: tuple[int, int] = (0, 1000)
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoded midpoint estimate of the clean image: what every image-space training term
    (identity, 3DMM, eye, perceptual) scores, decoded once.

    noisy, model_output, timesteps: z_t [B,4,h,w], the UNet's output for it (the one the
    diffusion loss uses: it is reused, not recomputed) and t [B]. ``denoise`` runs the UNet with
    the same conditions on a whole batch. Only samples with t_range[0] <= t < t_range[1] count.
    For them x0_hat (``midpoint_estimate``) is decoded through the VAE with gradients (the VAE's
    own parameters may be frozen), optionally composited as ``mask * decoded + (1 - mask) *
    target`` (mask: [B,1,H',W'] in [0,1], resized to H,W if needed, 1 = generated; target:
    [B,3,H,W] in [-1,1]; pass both or neither) so the judges see what inference produces.
    Returns (rows [R] long: the counted samples, images [R,3,H,W] or None when R = 0; then
    nothing was run).
    Cost: one extra UNet call (and its backward) over the batch, plus one VAE decode over the
    selected samples. At 512 px SD's VAE decoder alone is three UNet forwards; ``vae`` may be any
    decoder with the same interface, e.g. diffusers' ``AutoencoderTiny`` (TAESD, 18x cheaper).
    To spend the extra call on fewer samples pass sliced tensors and a closure over the sliced
    conditions.
    """
    if (mask is None) != (target is None):
        raise ValueError("compositing needs both mask and target (or neither)")
    t = _per_sample(timesteps, noisy)
    rows = torch.nonzero((t >= t_range[0]) & (t < t_range[1])).flatten()
    if rows.numel() == 0:
        return rows, None
    x0_hat = midpoint_estimate(denoise, scheduler, noisy, model_output, t)[rows]
    images = decode_latents(vae, x0_hat)
    if mask is not None:
        mask = mask[rows].to(images)
        if mask.shape[-2:] != images.shape[-2:]:
            mask = F.interpolate(mask, size=images.shape[-2:], mode="bilinear",
                                 align_corners=False)
        images = target[rows].to(images) + mask * (images - target[rows].to(images))
    return rows, images


def midpoint_identity_loss(denoise: Denoiser, scheduler, vae, noisy: torch.Tensor,
                           model_output: torch.Tensor, timesteps: torch.Tensor, *,
                           kps: torch.Tensor, source_embeds: torch.Tensor,
                           id_loss: IdentityLoss, mask: torch.Tensor | None = None,
                           target: torch.Tensor | None = None,
                           t_range: tuple[int, int] = (0, 1000)) -> torch.Tensor:
    """DiffSwap's identity loss on the midpoint estimate of the clean image. Returns a scalar.

    The images are ``midpoint_images`` (same arguments; see there for the cost), scored with
    ``id_loss``: kps [B,5,2] keypoints in pixels of the decoded image; source_embeds [B,512]
    unit-norm source identities (the target's own in self-reconstruction). If no sample is in
    ``t_range`` the result is an exact, graph-attached 0 and nothing is run.
    """
    rows, images = midpoint_images(denoise, scheduler, vae, noisy, model_output, timesteps,
                                   mask=mask, target=target, t_range=t_range)
    if images is None:
        return model_output.sum().float() * 0.0
    return id_loss(images, kps[rows], source_embeds[rows])


class MidpointJudges(nn.Module):
    """The frozen judges of the decoded midpoint estimate, each optional, all scoring the same
    images (decoded once, ``midpoint_images``):

    - identity: ``IdentityLoss`` (DiffSwap): 1 - cos(ArcFace(swap), source identity);
    - tddfa: ``ThreeDMMLoss`` (MFIM): the swap's 3DMM shape equal to the source's, its pose and
      expression equal to the target's, L1 on std-normalised 3DDFA_V2 params;
    - eye: ``EyeLoss`` (GHOST): the swap's eye-landmark heatmaps equal to the target's;
    - perceptual: ``PerceptualLoss``: VGG16 features of the swap equal to the target's.

    tddfa and eye share one ``TDDFAParams`` (one regressor pass per image). The regressor's roi
    is ``roi_boxes_from_kps`` of each sample's five keypoints: on aligned crops nearly a fixed
    box, cut with the differentiable ``roi_crop``. In self-reconstruction the source is the
    target's own face (an augmented copy of it, whose flips and elastic warps would distort the
    regressed shape), so the shape reference is the regressor's reading of the clean target
    crop; ``forward`` takes ``shape_source`` to supply another.
    """

    def __init__(self, *, identity: IdentityLoss | None = None, tddfa=None, eye=None,
                 perceptual: PerceptualLoss | None = None) -> None:
        super().__init__()
        if tddfa is not None and eye is not None and tddfa.params is not eye.params:
            raise ValueError("the 3DMM and eye losses must share one TDDFAParams")
        self.identity, self.tddfa, self.eye, self.perceptual = identity, tddfa, eye, perceptual

    @property
    def names(self) -> list[str]:
        """The terms ``forward`` returns (their metrics.jsonl keys)."""
        return [n for n in ("identity", "tddfa", "eye", "perceptual")
                if getattr(self, n) is not None]

    def forward(self, images: torch.Tensor, target: torch.Tensor, kps: torch.Tensor,
                source_embeds: torch.Tensor,
                shape_source: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images: [R,3,S,S] decoded swaps in [-1,1] (with gradients); target: [R,3,S,S] the
        target crops (the reconstruction ground truth in self-reconstruction); kps: [R,5,2]
        target keypoints in crop pixels; source_embeds: [R,512] unit-norm; shape_source:
        [R,3,S,S] the source aligned like the target, None for the target itself.
        Returns {name: float32 scalar} for ``names``; the 3DMM loss adds its parts as
        tddfa_shape, tddfa_pose and tddfa_expression."""
        out: dict[str, torch.Tensor] = {}
        if self.identity is not None:
            out["identity"] = self.identity(images, kps, source_embeds)
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(images, target).float()
        params = (self.tddfa or self.eye)
        if params is None:
            return out
        from diffswap_igfi.geometry.tddfa_torch import roi_boxes_from_kps

        regressor = params.params
        boxes = roi_boxes_from_kps(kps).to(images)
        with torch.no_grad():
            want = regressor(target.to(images), boxes)
            src = want if shape_source is None else regressor(shape_source.to(images), boxes)
        got = regressor(images, boxes)
        if self.tddfa is not None:
            terms = self.tddfa.terms(got, src, want)
            out["tddfa"] = terms["total"].float()
            out.update({f"tddfa_{k}": terms[k].detach().float()
                        for k in ("shape", "pose", "expression")})
        if self.eye is not None:
            out["eye"] = self.eye.from_params(got, want, boxes, images.shape[-2:]).float()
        return out

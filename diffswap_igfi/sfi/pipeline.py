"""``DiffSwapIGFIPipeline``: styled face inpainting (SFI) as a diffusers pipeline.

``__call__`` reads top to bottom as the algorithm: for every (target face, source) pair build
the conditions (identity of the source, CLIP tokens of the target crop with the face blanked,
swapped geometry and the 3D-aware mask; cached on the face records), encode the target crops
(and the crops with the face blanked, or blurred: ``config.condition``),
run masked sampling with identity guidance, decode, keep the target's pixels outside the mask,
and paste back into the photo. Faces come in already detected: the pipeline detects nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput

from diffswap_igfi.conditions.builder import ConditionBuilder, SwapConditions
from diffswap_igfi.conditions.clip import ClipVisionEncoderModel
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.projectors import ClipTokenProjector, IdentityTokenProjector
from diffswap_igfi.conditions.source import Source
from diffswap_igfi.conditions.tensors import to_tensor, to_uint8
from diffswap_igfi.faces.blend import composite
from diffswap_igfi.faces.paste import paste_back
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.sfi.blurred import CONDITIONS
from diffswap_igfi.sfi.conditioning import UNetConditions, encode_crops
from diffswap_igfi.sfi.sampling import (guided, id_mix_processors, masked_sample,
                                        warm_start_timesteps)

Pair = tuple[FaceRecord, Source]


@dataclass
class IdMix:
    """Identity mixing (MFIM): a second identity (``sources``, photos of one person, their
    embeddings averaged) drives the fine UNet blocks (``blocks``), or the two identities'
    tokens are mixed with ``weight`` on the first (``weighted``)."""

    sources: list[Source]
    mode: str = "blocks"
    weight: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("blocks", "weighted"):
            raise ValueError(f"id mix mode must be 'blocks' or 'weighted', got {self.mode!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"id mix weight must be in [0, 1], got {self.weight}")
        if not self.sources:
            raise ValueError("id mixing needs at least one source")


@dataclass
class SwapStats:
    """Where a call's time went: UNet calls (one per step, guidance batched in) and the batch
    rows they ran, seconds in the UNet, the VAE, the refiner, and the whole call."""

    unet_calls: int = 0
    unet_rows: int = 0
    unet_seconds: float = 0.0
    vae_seconds: float = 0.0
    refiner_seconds: float = 0.0
    total_seconds: float = 0.0

    def add(self, other: SwapStats) -> SwapStats:
        for name in ("unet_calls", "unet_rows", "unet_seconds", "vae_seconds",
                     "refiner_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


@dataclass
class FaceJob:
    """One face to swap: the index of its target photo, the target face, the identity it gets
    (a source photo and face), and the pair's conditions in the target's crop."""

    photo: int
    face: FaceRecord
    source_rgb: np.ndarray
    source_face: FaceRecord
    conditions: SwapConditions


@dataclass
class PreparedCrops:
    """The tensors of a batch of target crops that every sampling run over them shares.

    x: [B,3,S,S] in [-1,1] target crops; crops: the same as [B,S,S,3] uint8; soft: [B,S,S]
    float32 feathered masks; geometry: [B,C,h,w] heatmaps; latents, masked_latents: [B,4,h,w];
    mask: [B,1,h,w] latent repaint mask; clip_tokens: [B,T,D] of the blanked crops;
    vae_seconds: what encoding them cost.
    """

    x: torch.Tensor
    crops: np.ndarray
    soft: np.ndarray
    geometry: torch.Tensor
    latents: torch.Tensor
    masked_latents: torch.Tensor
    mask: torch.Tensor
    clip_tokens: torch.Tensor
    vae_seconds: float = 0.0


@dataclass
class Sampled:
    """crops: [B,S,S,3] uint8 swaps, equal to the target crops where the soft mask is 0."""

    crops: np.ndarray
    stats: SwapStats


@dataclass
class DiffSwapIGFIOutput(BaseOutput):
    """images: full photos [H,W,3] uint8 (one per target); crops: [F,S,S,3] uint8 aligned swaps
    (one per swapped face); masks: [F,S,S] float32 soft masks in the crops; alphas: [H,W]
    float32 per photo, where it changed (0 = the target's pixels exactly); stats: UNet calls
    and seconds; residual: [F,3,S,S] JR's residual map (target - self-swap), None without JR."""

    images: list[np.ndarray]
    crops: np.ndarray
    masks: np.ndarray
    alphas: list[np.ndarray]
    stats: SwapStats = field(default_factory=SwapStats)
    residual: torch.Tensor | None = None


class DiffSwapIGFIPipeline(DiffusionPipeline):
    """SFI pipeline. Components save and load as one diffusers folder."""

    model_cpu_offload_seq = "identity_encoder->clip_encoder->unet->vae->refiner"
    _optional_components = ["refiner", "dictionary"]

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler,
                 id_projector: IdentityTokenProjector, clip_projector: ClipTokenProjector,
                 identity_encoder: ArcFaceEncoderModel, clip_encoder: ClipVisionEncoderModel,
                 refiner: torch.nn.Module | None = None,
                 dictionary: torch.nn.Module | None = None, crop_size: int = 512,
                 template: str = "ffhq", region: str = "face", condition: str = "masked",
                 condition_blur: float = 0.125) -> None:
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got "
                             f"{condition!r}")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, id_projector=id_projector,
                              clip_projector=clip_projector, identity_encoder=identity_encoder,
                              clip_encoder=clip_encoder, refiner=refiner, dictionary=dictionary)
        # region: what the model was trained to repaint (face | head), the default of __call__;
        # condition: what the UNet's masked-image input shows of the face (sfi.blurred); both
        # part of the checkpoint, so inference does what training did
        self.register_to_config(crop_size=crop_size, template=template, region=region,
                                condition=condition, condition_blur=float(condition_blur))
        for module in (vae, unet, id_projector, clip_projector, identity_encoder, clip_encoder,
                       refiner, dictionary):
            if module is not None:
                module.eval()  # sampling is deterministic; training switches what it trains
        self._geometry = None

    # ------------------------------------------------------------------------------ conditions
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def condition_builder(self) -> ConditionBuilder:
        """The builder of this pipeline's conditions, with its own encoders: identity, CLIP
        tokens and geometry fits are cached on the face records, once per face."""
        if self._geometry is None:
            from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend

            self._geometry = MediaPipeBackend()
        return ConditionBuilder(self._geometry, self.identity_encoder, self.clip_encoder,
                                crop_size=self.config.crop_size, template=self.config.template,
                                latent_factor=self.vae_factor)

    def _identity(self, builder: ConditionBuilder, sources: Sequence[tuple[np.ndarray,
                  FaceRecord]]) -> torch.Tensor:
        """Mean unit-norm identity of one person's (photo, face) list -> [512] (cached per
        face)."""
        embeds = torch.stack([torch.from_numpy(builder.identity(rgb, face))
                              for rgb, face in sources])
        return torch.nn.functional.normalize(embeds.mean(0), dim=-1).to(self.device)

    def identity_tokens(self, embeds: torch.Tensor, mix: torch.Tensor | None, mode: str,
                        weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) identity tokens [B,N|2N,D] for the batch."""
        tokens = self.id_projector(embeds.to(self.id_projector.dtype))
        null = self.id_projector.null(len(embeds))
        if mix is None:
            return tokens, null
        other = self.id_projector(mix.to(self.id_projector.dtype))
        if mode == "weighted":
            return weight * tokens + (1 - weight) * other, null
        return torch.cat([tokens, other], 1), torch.cat([null, null], 1)

    # --------------------------------------------------------------------------- the algorithm
    @torch.no_grad()
    def __call__(self, target: np.ndarray | list[np.ndarray],
                 faces: Sequence[Pair] | Sequence[Sequence[Pair]], *,
                 num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None,
                 image: np.ndarray | list[np.ndarray] | None = None, strength: float = 1.0,
                 id_mix: IdMix | None = None, refine: bool = True, residual_seed: int = 0,
                 region: str | None = None,
                 return_dict: bool = True) -> DiffSwapIGFIOutput | tuple:
        """Swap identities onto already-detected faces of one or more target photos.

        target: one [H,W,3] uint8 RGB photo or a list; faces: for one photo a list of (target
        FaceRecord, Source) pairs, for a list of photos one such list per photo: each face gets
        its own source's identity and geometry. guidance_scale: classifier-free guidance on the
        identity (1 = off). image: the warm start (diffusers' img2img ``image=``), one photo per
        target in its pixels (e.g. the geometric engine's swap of it); sampling starts from its
        crop noised to ``strength`` and runs that fraction of the steps; ``strength`` < 1
        without it is refused. refine: run JR after SFI when the pipeline has a refiner (its
        self-swap for the residual map is seeded with ``residual_seed``); the crops are then at
        the refiner's resolution. region: ``face`` or ``head`` (face, hair and ears repainted;
        ``faces.head``); None: what the checkpoint was trained with (``config.region``).
        """
        start = time.perf_counter()
        stats = SwapStats()
        targets = [target] if isinstance(target, np.ndarray) else list(target)
        per_photo = [list(faces)] if isinstance(target, np.ndarray) else [list(f) for f in faces]
        if len(per_photo) != len(targets):
            raise ValueError(f"{len(targets)} target photos but {len(per_photo)} face lists")
        warm_photos = None if image is None else (
            [image] if isinstance(image, np.ndarray) else list(image))
        if strength < 1.0 and warm_photos is None:
            raise ValueError("strength < 1 needs a warm_start image (image=)")
        builder = self.condition_builder()
        region = region or self.config.get("region", "face")

        # 1. per target face: its source, aligned crop, swapped geometry, 3D-aware mask and
        # the identity and CLIP conditions (computed once per face, cached on the records)
        jobs = [FaceJob(t, face, src.rgb, src.face,
                        builder.build(src.rgb, src.face, targets[t], face, region=region))
                for t, pairs in enumerate(per_photo) for face, src in pairs]
        if not jobs:
            raise ValueError("no face to swap: pass at least one (face, source) pair")
        embeds = torch.stack([self._identity(builder, [(j.source_rgb, j.source_face)])
                              for j in jobs])
        mix_embeds = None
        if id_mix is not None:
            mix = self._identity(builder, [(s.rgb, s.face) for s in id_mix.sources])
            mix_embeds = mix.expand(len(jobs), -1)
        prepared = self.prepare_jobs(jobs)
        stats.vae_seconds += prepared.vae_seconds
        warm = None
        if warm_photos is not None:
            t0 = time.perf_counter()
            warm = self.vae.encode(to_tensor(self._crops_of(warm_photos, jobs), self.device,
                                             self.unet.dtype)).latent_dist.mode()
            warm = warm * self.vae.config.scaling_factor
            stats.vae_seconds += time.perf_counter() - t0

        # 2. masked sampling with identity guidance, decoding: the swap
        sampled = self.sample(prepared, identity=embeds, mix_identity=mix_embeds, id_mix=id_mix,
                              num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, generator=generator, warm=warm,
                              strength=strength)
        stats.add(sampled.stats)
        out_crops, soft_np = sampled.crops, prepared.soft
        inverses = [j.conditions.inverse for j in jobs]

        # 3. joint refinement (JR), when the checkpoint has a refiner
        residual = None
        if refine and self.refiner is not None:
            out_crops, soft_np, inverses, residual = self._refine(
                builder, jobs, targets, prepared, out_crops, embeds, num_inference_steps,
                guidance_scale, residual_seed, stats, region)

        # 4. paste back: pixels outside the feathered mask stay the target's
        images = [p.copy() for p in targets]
        alphas = [np.zeros(p.shape[:2], np.float32) for p in targets]
        for i, job in enumerate(jobs):
            images[job.photo], a = paste_back(images[job.photo], out_crops[i], inverses[i],
                                              soft_np[i], return_alpha=True)
            alphas[job.photo] = np.maximum(alphas[job.photo], a)
        stats.total_seconds = time.perf_counter() - start
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, out_crops, soft_np, alphas, stats, residual
        return DiffSwapIGFIOutput(images, out_crops, soft_np, alphas, stats, residual)

    def prepare_jobs(self, jobs: Sequence[FaceJob]) -> PreparedCrops:
        """The shared tensors of the jobs' target crops, with their cached CLIP tokens."""
        device, dtype = self.device, self.unet.dtype
        conds = [j.conditions for j in jobs]
        hard = torch.from_numpy(np.stack([c.mask for c in conds]) > 0)[:, None]
        geometry = torch.from_numpy(np.stack([c.heatmaps for c in conds]))
        tokens = torch.from_numpy(np.stack([c.clip_tokens for c in conds]))
        return self.prepare_tensors(to_tensor(np.stack([c.crop for c in conds]), device, dtype),
                                    hard, np.stack([c.soft_mask for c in conds]),
                                    geometry.to(device, dtype), clip_tokens=tokens.to(device))

    def prepare_tensors(self, x: torch.Tensor, hard: torch.Tensor, soft: np.ndarray,
                        geometry: torch.Tensor, *,
                        clip_tokens: torch.Tensor | None = None) -> PreparedCrops:
        """The shared tensors from aligned crops directly (training the JR stage uses this).

        x: [B,3,S,S] in [-1,1] target crops; hard: [B,1,S,S] bool repaint mask; soft: [B,S,S]
        float32 feathered mask; geometry: [B,C,S/f,S/f] heatmaps; clip_tokens: [B,T,D] of the
        blanked crops when already computed (else encoded here, from the same blanked crop).
        """
        t0 = time.perf_counter()
        encoded = encode_crops(self.vae, self.clip_encoder if clip_tokens is None else None, x,
                               hard.to(x.device).to(x), condition=self.config.condition,
                               condition_blur=self.config.condition_blur)
        seconds = time.perf_counter() - t0
        tokens = encoded.clip_tokens if clip_tokens is None else clip_tokens
        return PreparedCrops(x=x, crops=to_uint8(x), soft=soft, geometry=geometry,
                             latents=encoded.latents, masked_latents=encoded.masked_latents,
                             mask=encoded.mask, clip_tokens=self.clip_projector(
                                 tokens.to(self.clip_projector.dtype)), vae_seconds=seconds)

    def sample(self, prepared: PreparedCrops, *, identity: torch.Tensor,
               num_inference_steps: int, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None,
               mix_identity: torch.Tensor | None = None, id_mix: IdMix | None = None,
               warm: torch.Tensor | None = None, strength: float = 1.0) -> Sampled:
        """One masked-sampling run over a batch of prepared crops.

        identity: [B,512] unit-norm embeddings, one per crop; mix_identity: [B,512] the second
        identity of ``id_mix``; warm: [B,4,h,w] latents to start from (with ``strength``).
        Guidance runs the conditional and unconditional halves in one UNet call per step.
        """
        stats = SwapStats()
        device, dtype = self.device, self.unet.dtype
        id_cond, id_uncond = self.identity_tokens(identity, mix_identity,
                                                  id_mix.mode if id_mix else "blocks",
                                                  id_mix.weight if id_mix else 0.5)
        clip = prepared.clip_tokens
        conditions = UNetConditions(prepared.mask, prepared.masked_latents, prepared.geometry,
                                    torch.cat([id_cond, clip], 1).to(dtype))
        if guidance_scale != 1.0:
            conditions = conditions.with_unconditional(torch.cat([id_uncond, clip], 1).to(dtype))

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t1 = time.perf_counter()
            out = conditions.predict(self.unet, latents, t)
            stats.unet_calls += 1
            stats.unet_rows += len(latents)
            stats.unet_seconds += time.perf_counter() - t1
            return out

        denoise = predict if guidance_scale == 1.0 else guided(predict, guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if warm is not None:
            timesteps = warm_start_timesteps(timesteps, strength)
        noise = torch.randn(prepared.latents.shape, generator=generator, dtype=torch.float32)
        noise = noise.to(device, dtype)
        saved = None
        if id_mix is not None and id_mix.mode == "blocks":
            saved = self.unet.attn_processors
            self.unet.set_attn_processor(id_mix_processors(
                self.unet, self.id_projector.config.num_tokens, clip.shape[1]))
        try:
            with self.progress_bar(total=len(timesteps)) as bar:
                latents = masked_sample(denoise, self.scheduler, prepared.latents, prepared.mask,
                                        timesteps, noise, warm=warm, generator=generator,
                                        callback=lambda i, t, z: bar.update())
        finally:
            if saved is not None:
                self.unet.set_attn_processor(saved)
        t0 = time.perf_counter()
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        stats.vae_seconds += time.perf_counter() - t0
        swapped = to_uint8(decoded)
        crops = np.stack([composite(swapped[i].astype(np.float32), prepared.crops[i],
                                    prepared.soft[i]) for i in range(len(swapped))])
        return Sampled(crops, stats)

    def _refine(self, builder, jobs, targets, prepared, swaps, embeds, steps, guidance_scale,
                residual_seed, stats, region="face"):
        """JR: refine the SFI swaps with the self-swap residual map, at the refiner's scale.

        The residual dX = target - SFI(target, target) comes from a real self-swap of this same
        pipeline: each target face's own identity, same crops and conditions, seeded with
        ``residual_seed``. Returns (crops [B,kS,kS,3] uint8, soft masks [B,kS,kS], inverse
        affines for the kS crops, residual [B,3,S,S] float tensor).
        """
        device, dtype = self.device, self.unet.dtype
        # a true self-swap: each face's own identity, own geometry and own mask
        own = torch.stack([self._identity(builder, [(targets[j.photo], j.face)]) for j in jobs])
        self_jobs = [FaceJob(j.photo, j.face, targets[j.photo], j.face,
                             builder.build(targets[j.photo], j.face, targets[j.photo], j.face,
                                           region=region))
                     for j in jobs]
        self_prepared = self.prepare_jobs(self_jobs)
        stats.vae_seconds += self_prepared.vae_seconds
        self_swaps = self.sample(self_prepared, identity=own, num_inference_steps=steps,
                                 guidance_scale=guidance_scale,
                                 generator=torch.Generator().manual_seed(residual_seed))
        stats.add(self_swaps.stats)
        residual = prepared.x - to_tensor(self_swaps.crops, device, dtype)
        t0 = time.perf_counter()
        landmarks = torch.from_numpy(np.stack([j.conditions.target_points for j in jobs]))
        refined = self.refiner(to_tensor(swaps, device, dtype), residual,
                               embeds.to(device, dtype), prepared.x,
                               landmarks=landmarks.to(device, dtype), dictionary=self.dictionary)
        stats.refiner_seconds += time.perf_counter() - t0
        scale = refined.shape[-1] // swaps.shape[1]
        size = refined.shape[-1]
        big_crops, softs, inverses = [], [], []
        for i, job in enumerate(jobs):
            affine = job.conditions.affine * scale  # photo -> crop at the refiner's resolution
            big = cv2.warpAffine(targets[job.photo], affine, (size, size),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
            soft = cv2.resize(prepared.soft[i], (size, size), interpolation=cv2.INTER_LINEAR)
            soft[soft < 1e-3] = 0.0
            out = to_uint8(refined[i:i + 1])[0]
            big_crops.append(composite(out.astype(np.float32), big, soft))
            softs.append(soft)
            inverses.append(cv2.invertAffineTransform(affine))
        return np.stack(big_crops), np.stack(softs), inverses, residual

    def _crops_of(self, photos: list[np.ndarray], jobs: Sequence[FaceJob]) -> np.ndarray:
        """[B,S,S,3] uint8: each job's crop cut from its photo in ``photos`` (e.g. the warm
        start), with the job's crop affine."""
        size = self.config.crop_size
        return np.stack([cv2.warpAffine(photos[j.photo], j.conditions.affine, (size, size),
                                        flags=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT101) for j in jobs])

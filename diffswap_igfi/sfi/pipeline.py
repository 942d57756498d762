"""``DiffSwapIGFIPipeline``: styled face inpainting (SFI) as a diffusers pipeline.

``__call__`` reads top to bottom as the algorithm: find faces, build conditions (identity
tokens of the source, CLIP tokens of the target crop, swapped geometry and the 3D-aware mask),
encode the target crop, run masked sampling with identity guidance, decode, keep the target's
pixels outside the mask, and paste back into the photo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput

from diffswap_igfi.conditions.builder import ConditionBuilder
from diffswap_igfi.conditions.projectors import ClipTokenProjector, IdentityTokenProjector
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.faces.blend import composite
from diffswap_igfi.faces.detect import pick_source_face, select_faces
from diffswap_igfi.faces.paste import paste_back
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.sfi.encoders import (ArcFaceEncoderModel, ClipVisionEncoderModel, to_tensor,
                                        to_uint8)
# Optional components: diffusers only loads classes whose modules are already imported.
from diffswap_igfi.jr import dictionary as _jr_dictionary  # noqa: F401
from diffswap_igfi.jr import network as _jr_network  # noqa: F401
from diffswap_igfi.sfi.sampling import (guided, id_mix_processors, latent_mask, masked_sample,
                                        warm_start_timesteps)


@dataclass
class IdMix:
    """Identity mixing (MFIM): a second source drives the fine UNet blocks (``blocks``), or the
    two identities' tokens are mixed with ``weight`` on the first (``weighted``)."""

    sources: list[np.ndarray]
    mode: str = "blocks"
    weight: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("blocks", "weighted"):
            raise ValueError(f"id mix mode must be 'blocks' or 'weighted', got {self.mode!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"id mix weight must be in [0, 1], got {self.weight}")


@dataclass
class DiffSwapIGFIOutput(BaseOutput):
    """images: full photos [H,W,3] uint8 (one per target); crops: [F,S,S,3] uint8 aligned swaps
    (one per swapped face); masks: [F,S,S] float32 soft masks in the crops; alphas: [H,W]
    float32 per photo, where it changed (0 = the target's pixels exactly); stats: UNet calls
    and seconds by stage."""

    images: list[np.ndarray]
    crops: np.ndarray
    masks: np.ndarray
    alphas: list[np.ndarray]
    stats: dict = field(default_factory=dict)


class DiffSwapIGFIPipeline(DiffusionPipeline):
    """SFI pipeline. Components save and load as one diffusers folder."""

    model_cpu_offload_seq = "identity_encoder->clip_encoder->unet->vae->refiner"
    _optional_components = ["refiner", "dictionary"]

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler,
                 id_projector: IdentityTokenProjector, clip_projector: ClipTokenProjector,
                 identity_encoder: ArcFaceEncoderModel, clip_encoder: ClipVisionEncoderModel,
                 refiner: torch.nn.Module | None = None,
                 dictionary: torch.nn.Module | None = None, crop_size: int = 512,
                 template: str = "ffhq") -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, id_projector=id_projector,
                              clip_projector=clip_projector, identity_encoder=identity_encoder,
                              clip_encoder=clip_encoder, refiner=refiner, dictionary=dictionary)
        self.register_to_config(crop_size=crop_size, template=template)
        for module in (vae, unet, id_projector, clip_projector, identity_encoder, clip_encoder,
                       refiner, dictionary):
            if module is not None:
                module.eval()  # sampling is deterministic; training switches what it trains
        self._detector = None
        self._builder = None

    # ------------------------------------------------------------------ faces and conditions
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _faces(self):
        if self._detector is None:
            from diffswap_igfi.faces.detect import FaceDetector

            self._detector = FaceDetector()
            self._builder = ConditionBuilder(crop_size=self.config.crop_size,
                                             template=self.config.template,
                                             latent_factor=self.vae_factor)
        return self._detector, self._builder

    def encode_identity(self, sources: list[np.ndarray],
                        faces: list[FaceRecord] | None = None) -> torch.Tensor:
        """Mean unit-norm ArcFace embedding of one person's source photos -> [1,512].

        faces: the identity face of each photo when already detected."""
        detector, _ = self._faces()
        crops = []
        for i, rgb in enumerate(sources):
            face = faces[i] if faces is not None else pick_source_face(
                detector.detect(rgb), what=f"source photo {i}")
            crops.append(align_face(rgb, face.kps, 112, "arcface").crop)
        x = to_tensor(np.stack(crops), self.device, self.identity_encoder.dtype)
        emb = self.identity_encoder(x).mean(0, keepdim=True)
        return torch.nn.functional.normalize(emb, dim=-1)

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
    def __call__(self, source: np.ndarray | list[np.ndarray],
                 target: np.ndarray | list[np.ndarray], *, face_selector: str = "largest",
                 face_index: int = 0, num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, warm_start: str | None = None,
                 strength: float = 1.0, id_mix: IdMix | None = None,
                 source_faces: list[FaceRecord] | None = None,
                 target_faces: list[list[FaceRecord]] | None = None, refine: bool = True,
                 residual_seed: int = 0, return_dict: bool = True
                 ) -> DiffSwapIGFIOutput | tuple:
        """Swap one person's identity onto the selected faces of one or more target photos.

        source: one [H,W,3] uint8 RGB photo of the source person, or several of them (their
        embeddings are averaged); target: one photo or a list. face_selector: ``largest``,
        ``index`` (with face_index) or ``all``. guidance_scale: classifier-free guidance on the
        identity (1 = off). warm_start: ``"geometric"`` starts from the geometric engine's swap
        noised to ``strength`` (fewer steps); ``strength`` < 1 without it is refused.
        source_faces / target_faces: faces already detected (one per source photo; a list per
        target photo), which skips detection and face selection. refine: run JR after SFI when
        the pipeline has a refiner (its self-swap for the residual map is seeded with
        ``residual_seed``); the crops are then at the refiner's resolution.
        """
        start = time.perf_counter()
        stats = {"unet_calls": 0, "unet_seconds": 0.0, "vae_seconds": 0.0}
        sources = [source] if isinstance(source, np.ndarray) else list(source)
        targets = [target] if isinstance(target, np.ndarray) else list(target)
        if strength < 1.0 and warm_start is None:
            raise ValueError("strength < 1 needs warm_start='geometric'")
        detector, builder = self._faces()
        device, dtype = self.device, self.unet.dtype

        # 1. identity of the source (and of the mixing source)
        if source_faces is None:
            source_faces = [pick_source_face(detector.detect(rgb), what=f"source photo {i}")
                            for i, rgb in enumerate(sources)]
        embed = self.encode_identity(sources, source_faces)
        mix_embed = self.encode_identity(id_mix.sources) if id_mix is not None else None
        source_face = source_faces[0]

        # 2. per target face: aligned crop, swapped geometry, 3D-aware mask
        items = []
        for t_idx, photo in enumerate(targets):
            faces = target_faces[t_idx] if target_faces is not None else select_faces(
                detector.detect(photo), face_selector, index=face_index,
                what=f"target photo {t_idx}")
            for face in faces:
                items.append((t_idx, face, builder.build(sources[0], source_face, photo, face)))
        prepared = self._prepare(items, stats)
        warm = None
        if warm_start == "geometric":
            t0 = time.perf_counter()
            geometric = to_tensor(self._geometric_crops(sources[0], source_face, targets, items),
                                  device, dtype)
            warm = self.vae.encode(geometric).latent_dist.mode() * self.vae.config.scaling_factor
            stats["vae_seconds"] += time.perf_counter() - t0
        elif warm_start is not None:
            raise ValueError(f"unknown warm_start {warm_start!r}; use 'geometric' or None")

        # 3-5. conditions, masked sampling, decoding: the swap
        batch = len(items)
        out_crops = self._sample(prepared, embed.expand(batch, -1),
                                 None if mix_embed is None else mix_embed.expand(batch, -1),
                                 id_mix, num_inference_steps, guidance_scale, generator, warm,
                                 strength, stats)
        soft_np = prepared["soft"]

        # 6. joint refinement (JR), when the checkpoint has a refiner
        inverses = [c.inverse for _, _, c in items]
        if refine and self.refiner is not None:
            out_crops, soft_np, inverses, residual = self._refine(
                items, targets, prepared, out_crops, embed.expand(batch, -1),
                num_inference_steps, guidance_scale, residual_seed, stats)
            stats["residual"] = residual

        # 7. paste back: pixels outside the feathered mask stay the target's
        images = [p.copy() for p in targets]
        alphas = [np.zeros(p.shape[:2], np.float32) for p in targets]
        for i, (t_idx, _, _) in enumerate(items):
            images[t_idx], a = paste_back(images[t_idx], out_crops[i], inverses[i], soft_np[i],
                                          return_alpha=True)
            alphas[t_idx] = np.maximum(alphas[t_idx], a)
        stats["total_seconds"] = time.perf_counter() - start
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, out_crops, soft_np, alphas, stats
        return DiffSwapIGFIOutput(images, out_crops, soft_np, alphas, stats)

    def _prepare(self, items: list, stats: dict) -> dict:
        """Tensors of the target crops that every sampling run of this call shares."""
        device, dtype = self.device, self.unet.dtype
        crops = np.stack([c.crop for _, _, c in items])
        hard = torch.from_numpy(np.stack([c.mask for _, _, c in items]) > 0)[:, None]
        geometry = torch.from_numpy(np.stack([c.heatmaps for _, _, c in items]))
        return self.prepare_tensors(to_tensor(crops, device, dtype), hard,
                                    np.stack([c.soft_mask for _, _, c in items]),
                                    geometry.to(device, dtype), stats)

    def prepare_tensors(self, x: torch.Tensor, hard: torch.Tensor, soft: np.ndarray,
                        geometry: torch.Tensor, stats: dict) -> dict:
        """The shared tensors from aligned crops directly (training the JR stage uses this).

        x: [B,3,S,S] in [-1,1] target crops; hard: [B,1,S,S] bool repaint mask; soft: [B,S,S]
        float32 feathered mask; geometry: [B,7,S/f,S/f] heatmaps.
        """
        keep = (~hard.to(x.device)).to(x)
        t0 = time.perf_counter()
        scaling = self.vae.config.scaling_factor
        target_latents = self.vae.encode(x).latent_dist.mode() * scaling
        masked_latents = self.vae.encode(x * keep).latent_dist.mode() * scaling
        stats["vae_seconds"] = stats.get("vae_seconds", 0.0) + time.perf_counter() - t0
        # CLIP sees the target with the face blanked: hair, lighting and background, not the
        # identity being replaced (training does the same, or it would learn to copy it)
        clip_tokens = self.clip_projector(
            self.clip_encoder((x * keep).to(self.clip_encoder.dtype))[0])
        return {
            "crops": to_uint8(x), "x": x, "clip_tokens": clip_tokens, "soft": soft,
            "geometry": geometry, "target_latents": target_latents,
            "masked_latents": masked_latents,
            "mask": latent_mask(hard.to(x), tuple(target_latents.shape[-2:])),
        }

    def _sample(self, prepared: dict, embeds: torch.Tensor, mix_embeds: torch.Tensor | None,
                id_mix: IdMix | None, steps: int, guidance_scale: float,
                generator: torch.Generator | None, warm: torch.Tensor | None, strength: float,
                stats: dict) -> np.ndarray:
        """One masked-sampling run for a batch of prepared crops. embeds: [B,512].
        Returns [B,S,S,3] uint8 crops, equal to the target crops where the soft mask is 0."""
        device, dtype = self.device, self.unet.dtype
        mask, masked_latents = prepared["mask"], prepared["masked_latents"]
        geometry, clip_tokens = prepared["geometry"], prepared["clip_tokens"]
        target_latents = prepared["target_latents"]
        id_cond, id_uncond = self.identity_tokens(embeds, mix_embeds,
                                                  id_mix.mode if id_mix else "blocks",
                                                  id_mix.weight if id_mix else 0.5)
        cond = torch.cat([id_cond, clip_tokens], 1).to(dtype)
        uncond = torch.cat([id_uncond, clip_tokens], 1).to(dtype)

        def denoiser(context: torch.Tensor):
            def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                t1 = time.perf_counter()
                inputs = torch.cat([latents, mask, masked_latents, geometry], dim=1)
                out = self.unet(inputs, t, encoder_hidden_states=context).sample
                stats["unet_calls"] += 1
                stats["unet_seconds"] += time.perf_counter() - t1
                return out
            return denoise

        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        if warm is not None:
            timesteps = warm_start_timesteps(timesteps, strength)
        noise = torch.randn(target_latents.shape, generator=generator, dtype=torch.float32)
        noise = noise.to(device, dtype)
        saved = None
        if id_mix is not None and id_mix.mode == "blocks":
            saved = self.unet.attn_processors
            self.unet.set_attn_processor(id_mix_processors(
                self.unet, self.id_projector.config.num_tokens, clip_tokens.shape[1]))
        try:
            with self.progress_bar(total=len(timesteps)) as bar:
                latents = masked_sample(
                    guided(denoiser(cond), denoiser(uncond), guidance_scale), self.scheduler,
                    target_latents, mask, timesteps, noise, warm=warm, generator=generator,
                    callback=lambda i, t, z: bar.update())
        finally:
            if saved is not None:
                self.unet.set_attn_processor(saved)
        t0 = time.perf_counter()
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        stats["vae_seconds"] += time.perf_counter() - t0
        swapped = to_uint8(decoded)
        crops, soft = prepared["crops"], prepared["soft"]
        return np.stack([composite(swapped[i].astype(np.float32), crops[i], soft[i])
                         for i in range(len(crops))])

    def _refine(self, items, targets, prepared, swaps, embeds, steps, guidance_scale,
                residual_seed, stats):
        """JR: refine the SFI swaps with the self-swap residual map, at the refiner's scale.

        The residual dX = target - SFI(target, target) comes from a real self-swap of this same
        pipeline: each target face's own identity, same crops and conditions, seeded with
        ``residual_seed``. Returns (crops [B,kS,kS,3] uint8, soft masks [B,kS,kS], inverse
        affines for the kS crops, residual [B,3,S,S] float tensor).
        """
        import cv2

        device, dtype = self.device, self.unet.dtype
        _, builder = self._faces()
        # a true self-swap: each face's own identity, own geometry and own mask
        own = torch.cat([self.encode_identity([targets[t]], [face]) for t, face, _ in items])
        self_items = [(t, face, builder.build(targets[t], face, targets[t], face))
                      for t, face, _ in items]
        self_swaps = self._sample(self._prepare(self_items, stats), own, None, None, steps,
                                  guidance_scale, torch.Generator().manual_seed(residual_seed),
                                  None, 1.0, stats)
        residual = prepared["x"] - to_tensor(self_swaps, device, dtype)
        t0 = time.perf_counter()
        landmarks = torch.from_numpy(np.stack([c.target_points for _, _, c in items]))
        refined = self.refiner(to_tensor(swaps, device, dtype), residual,
                               embeds.to(device, dtype), prepared["x"],
                               landmarks=landmarks.to(device, dtype), dictionary=self.dictionary)
        stats["refiner_seconds"] = time.perf_counter() - t0
        scale = refined.shape[-1] // swaps.shape[1]
        size = refined.shape[-1]
        big_crops, softs, inverses = [], [], []
        for i, (t_idx, _, cond) in enumerate(items):
            affine = cond.affine * scale  # photo -> crop at the refiner's resolution
            big = cv2.warpAffine(targets[t_idx], affine, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT101)
            soft = cv2.resize(prepared["soft"][i], (size, size), interpolation=cv2.INTER_LINEAR)
            soft[soft < 1e-3] = 0.0
            out = to_uint8(refined[i:i + 1])[0]
            big_crops.append(composite(out.astype(np.float32), big, soft))
            softs.append(soft)
            inverses.append(cv2.invertAffineTransform(affine))
        return np.stack(big_crops), np.stack(softs), inverses, residual

    def _geometric_crops(self, source_rgb, source_face, targets, items) -> np.ndarray:
        """The geometric engine's swap of every item, cut out with the item's crop affine."""
        import cv2

        from diffswap_igfi.engines.geometric import GeometricSwapper

        engine, size = GeometricSwapper(), self.config.crop_size
        out = []
        for t_idx, face, cond in items:
            swapped, _ = engine.swap_one(targets[t_idx], face, source_rgb, source_face)
            out.append(cv2.warpAffine(swapped, cond.affine, (size, size),
                                      flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101))
        return np.stack(out)

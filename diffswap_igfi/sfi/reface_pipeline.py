"""``RefacePipeline``: REFace-format models (WACV 2025) run through our masked sampling.

The UNet is an SD-1.x inpainting UNet whose 9 input channels are [noisy latent (4), latent of
the target with the face blanked (4), keep mask (1, 1 = target pixel kept)] and whose context is
REFace's one conditioning token (``sfi.reface_models``). What is ours: faces come in as
FaceRecords (no detection here), the crop is our FFHQ-template alignment, the region to repaint
is our landmark mask, the unmasked latent is the target's at every step (``sfi.sampling``),
and the crop is composited and pasted back so pixels outside the mask stay the target's, bit
for bit.

The mask stands in for REFace's CelebAMask-HQ parsing labels. Its training removed skin, nose,
eyes, brows, ears, mouth, lips and neck (labels 1,2,4-12,17 of its list) and kept hair, hat,
eyeglasses, earrings, necklace, cloth and background; its inference script removes the FFHQ
parser's lip, brows, eyes, nose, skin, ears and mouth. Our mesh covers the face from mid
forehead to chin: we repaint the face oval grown by ``mask_dilation`` pixels. Differs: no ears
and no neck (outside the mesh), the forehead only up to the mesh's top edge (not the hairline),
and eyeglasses inside the oval are repainted rather than kept.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from diffswap_igfi.conditions.irse50 import IRSEBackbone
from diffswap_igfi.errors import InputError
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.faces.blend import composite
from diffswap_igfi.faces.masks import dilate, feather, region_mask
from diffswap_igfi.faces.paste import paste_back
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.conditions.clip import OPENAI_MEAN, OPENAI_STD
from diffswap_igfi.conditions.tensors import to_tensor, to_uint8
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIOutput, SwapStats
from diffswap_igfi.sfi.reface_models import DLIB68_FROM_MESH, RefaceConditioner
from diffswap_igfi.sfi.sampling import guided, latent_mask, masked_sample

REFACE_STEPS = 50  # its inference scripts: DDIM, 50 steps, eta 0
REFACE_GUIDANCE = 3.5
LANDMARK_FRAME = 512  # REFace measures landmarks in pixels of a 512 crop
CLIP_SIZE = 224


def clip_normalise(x01: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> CLIP (OpenAI) normalised."""
    mean = torch.tensor(OPENAI_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def clip_unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, no antialiasing: what torchvision 0.12's tensor Resize did in REFace's setup."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def arcface_input(reference: torch.Tensor) -> torch.Tensor:
    """REFace's ArcFace view of its source reference: [B,3,224,224] CLIP-normalised ->
    [B,3,112,112] in [-1,1] (pooled to 256, rows 35:223 and columns 32:220, pooled to 112)."""
    x = clip_unnormalise(reference) * 2.0 - 1.0
    x = F.adaptive_avg_pool2d(x, (256, 256))[:, :, 35:223, 32:220]
    return F.adaptive_avg_pool2d(x, (112, 112))


class RefacePipeline(DiffusionPipeline):
    """REFace face swap with our masks and masked sampling. Saves and loads as one folder.

    Components: ``vae`` (SD VAE), ``unet`` (9-channel inpainting UNet, context_dim 768),
    ``scheduler`` (DDIM with LDM's schedule), ``conditioner`` (RefaceConditioner),
    ``clip_encoder`` (CLIP ViT-L/14 image tower with its projection), ``identity_encoder``
    (IR-SE50 ArcFace).
    """

    model_cpu_offload_seq = "identity_encoder->clip_encoder->conditioner->unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler,
                 conditioner: RefaceConditioner, clip_encoder: CLIPVisionModelWithProjection,
                 identity_encoder: IRSEBackbone, crop_size: int = 512,
                 template: str = "ffhq", mask_dilation: int = 8,
                 feather_radius: int = 6, default_steps: int = REFACE_STEPS,
                 default_guidance: float = REFACE_GUIDANCE) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, conditioner=conditioner,
                              clip_encoder=clip_encoder, identity_encoder=identity_encoder)
        self.register_to_config(crop_size=crop_size, template=template,
                                mask_dilation=mask_dilation, feather_radius=feather_radius,
                                default_steps=default_steps, default_guidance=default_guidance)
        for module in (vae, unet, conditioner, clip_encoder, identity_encoder):
            module.eval()

    # ------------------------------------------------------------------------------ the crops
    def face_crop(self, rgb: np.ndarray, face: FaceRecord):
        """(aligned crop [S,S,3] uint8, hard repaint mask [S,S] uint8 {0,255}, soft mask [S,S]
        float32 in [0,1] inside the hard one, 68 landmarks [68,2] in the crop, inverse [2,3])."""
        size = self.config.crop_size
        aligned = align_face(rgb, face.kps, size, self.config.template)
        points = face.transformed(aligned.affine, (size, size)).points
        hard = dilate(region_mask(points, (size, size), ("face",)),
                      round(self.config.mask_dilation * size / 512))
        soft = feather(hard, max(1, round(self.config.feather_radius * size / 512)))
        return aligned.crop, hard, soft, points[list(DLIB68_FROM_MESH)], aligned.inverse

    def source_reference(self, crop: np.ndarray, hard: np.ndarray) -> torch.Tensor:
        """REFace's source input: the crop at 224, CLIP-normalised, zero outside its face mask.
        crop: [S,S,3] uint8; hard: [S,S] uint8. Returns [1,3,224,224]."""
        small = cv2.resize(crop, (CLIP_SIZE, CLIP_SIZE), interpolation=cv2.INTER_LINEAR)
        x = clip_normalise(to_tensor(small[None], self.device, torch.float32) * 0.5 + 0.5)
        mask = torch.from_numpy((hard > 0).astype(np.float32))[None, None].to(self.device)
        return x * resize(mask, CLIP_SIZE)

    # ------------------------------------------------------------------------- the conditions
    def condition(self, reference: torch.Tensor, target: torch.Tensor,
                  landmarks: torch.Tensor) -> torch.Tensor:
        """The conditional token [B,1,768].

        reference: [B,3,224,224] from ``source_reference``; target: [B,3,S,S] target crops in
        [-1,1]; landmarks: [B,68,2] target landmarks in pixels of the S crop."""
        dtype = self.clip_encoder.dtype
        source_clip = self.clip_encoder(pixel_values=reference.to(dtype)).image_embeds
        target_in = resize(clip_normalise(target.float() * 0.5 + 0.5), CLIP_SIZE)
        target_clip = self.clip_encoder(pixel_values=target_in.to(dtype)).image_embeds
        identity = self.identity_encoder(arcface_input(reference).to(self.identity_encoder.dtype))
        scale = LANDMARK_FRAME / target.shape[-1]
        cd = self.conditioner.dtype
        return self.conditioner(source_clip.to(cd), target_clip.to(cd), identity.to(cd),
                                (landmarks * scale).to(self.device, cd))

    def unet_inputs(self, crops: torch.Tensor, hard: torch.Tensor) -> dict:
        """Latents every step shares. crops: [B,3,S,S] in [-1,1]; hard: [B,1,S,S] bool repaint.

        Returns target latents [B,4,h,w], the UNet's extra channels [B,5,h,w] (latent of the
        target with the repaint region at 0, then the keep mask resized bilinearly, as REFace
        feeds them) and our binary latent repaint mask [B,1,h,w]."""
        keep = (~hard).to(crops)
        scaling = self.vae.config.scaling_factor
        target_latents = self.vae.encode(crops).latent_dist.mode() * scaling
        blanked = self.vae.encode(crops * keep).latent_dist.mode() * scaling
        side = tuple(target_latents.shape[-2:])
        keep_small = F.interpolate(keep, size=side, mode="bilinear", align_corners=False)
        return {"target_latents": target_latents,
                "extra": torch.cat([blanked, keep_small], 1),
                "mask": latent_mask(hard.to(crops), side)}

    def denoiser(self, extra: torch.Tensor, context: torch.Tensor, stats: SwapStats):
        """``denoise(latents [B,4,h,w], t) -> eps`` for one context [B,1,768]."""
        def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            out = self.unet(torch.cat([latents, extra], 1), t,
                            encoder_hidden_states=context).sample
            stats.unet_calls += 1
            stats.unet_rows += len(latents)
            stats.unet_seconds += time.perf_counter() - t0
            return out
        return denoise

    # --------------------------------------------------------------------------- the algorithm
    @torch.no_grad()
    def __call__(self, target: np.ndarray, faces, *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 image: np.ndarray | None = None, strength: float = 1.0, id_mix=None,
                 refine: bool = True, return_dict: bool = True) -> DiffSwapIGFIOutput | tuple:
        """Swap identities onto already-detected faces of one target photo (the engine
        contract, as ``DiffSwapIGFIPipeline``).

        target: [H,W,3] uint8; faces: (target FaceRecord, Source) pairs, each face with its own
        source (REFace takes one reference photo per face). Steps and guidance default to
        REFace's (50, 3.5). A warm start (``image``/``strength``) and ID mixing are DiffSwap-IGFI
        features this model was not trained for; they are refused (InputError). ``refine`` is
        accepted for the engine's sake (there is no refiner).
        """
        if image is not None or strength != 1.0 or id_mix is not None:
            raise InputError("REFace models support neither --warm-start nor --mix-source "
                             "(they were not trained for them); drop those options")
        start = time.perf_counter()
        stats = SwapStats()
        steps = num_inference_steps or self.config.default_steps
        scale = self.config.default_guidance if guidance_scale is None else guidance_scale
        pairs = list(faces)
        device, dtype = self.device, self.unet.dtype

        references: dict[int, torch.Tensor] = {}  # one per source, however many faces use it
        for _, source in pairs:
            if id(source) not in references:
                src_crop, src_hard, _, _, _ = self.face_crop(source.rgb, source.face)
                references[id(source)] = self.source_reference(src_crop, src_hard)
        reference = torch.cat([references[id(source)] for _, source in pairs])
        cut = [self.face_crop(target, face) for face, _ in pairs]
        crops = to_tensor(np.stack([c[0] for c in cut]), device, dtype)
        hard = torch.from_numpy(np.stack([c[1] for c in cut]) > 0)[:, None].to(device)
        landmarks = torch.from_numpy(np.stack([c[3] for c in cut]))
        cond = self.condition(reference, crops, landmarks)
        uncond = self.conditioner.null(len(cut))
        t0 = time.perf_counter()
        shared = self.unet_inputs(crops, hard)
        stats.vae_seconds += time.perf_counter() - t0

        self.scheduler.set_timesteps(steps, device=device)
        noise = torch.randn(shared["target_latents"].shape, generator=generator,
                            dtype=torch.float32).to(device, dtype)
        if scale == 1.0:
            denoise = self.denoiser(shared["extra"], cond.to(dtype), stats)
        else:  # guidance: both halves in one UNet call per step
            denoise = guided(self.denoiser(torch.cat([shared["extra"]] * 2),
                                           torch.cat([cond, uncond]).to(dtype), stats), scale)
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            latents = masked_sample(denoise, self.scheduler, shared["target_latents"],
                                    shared["mask"], self.scheduler.timesteps, noise,
                                    generator=generator, callback=lambda i, t, z: bar.update())
        t0 = time.perf_counter()
        swapped = to_uint8(self.vae.decode(latents / self.vae.config.scaling_factor).sample)
        stats.vae_seconds += time.perf_counter() - t0

        image, alpha = target.copy(), np.zeros(target.shape[:2], np.float32)
        out_crops, softs = [], []
        for i, (crop, _, soft, _, inverse) in enumerate(cut):
            out = composite(swapped[i].astype(np.float32), crop, soft)
            image, a = paste_back(image, out, inverse, soft, return_alpha=True)
            alpha = np.maximum(alpha, a)
            out_crops.append(out)
            softs.append(soft)
        stats.total_seconds = time.perf_counter() - start
        self.maybe_free_model_hooks()
        if not return_dict:
            return [image], np.stack(out_crops), np.stack(softs), [alpha], stats
        return DiffSwapIGFIOutput([image], np.stack(out_crops), np.stack(softs), [alpha], stats)

"""What the SFI UNet sees, written once for inference (``sfi.pipeline``) and training
(``sfi.training``): the VAE latents of the target crop and of the crop with the face blanked,
CLIP tokens of the blanked crop (of the whole source crop for head swaps), and the UNet's
input layout
``cat([latents, mask, masked latents, geometry])`` with the cross-attention context. The
"masked latents" encode the crop with the face blanked, or blurred (``sfi.blurred``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from diffswap_igfi.conditions.clip import blank_face
from diffswap_igfi.sfi.blurred import condition_image
from diffswap_igfi.sfi.sampling import latent_mask


@dataclass
class EncodedCrops:
    """latents, masked_latents: [B,4,h,w] VAE latents (scaled) of the target crop and of the
    crop with the face blanked; mask: [B,1,h,w] in {0,1} latent repaint mask; clip_tokens:
    [B,T,D] CLIP tokens of the blanked crop, or None when the caller has them already."""

    latents: torch.Tensor
    masked_latents: torch.Tensor
    mask: torch.Tensor
    clip_tokens: torch.Tensor | None


def encode_crops(vae, clip_encoder, images: torch.Tensor, mask: torch.Tensor, *,
                 condition: str = "masked", condition_blur: float = 0.125) -> EncodedCrops:
    """VAE-encode the target crops and the crops with the face blanked (``condition`` masked)
    or strongly blurred (blurred: ``sfi.blurred.blur_face``, sigma ``condition_blur`` x the face
    size); CLIP-encode the blanked crops either way (skipped when ``clip_encoder`` is None).

    images: [B,3,S,S] float in [-1,1]; mask: [B,1,S,S] in [0,1], 1 = repaint. The latent mask is
    1 wherever any of a cell's pixels is (``latent_mask``).
    """
    blanked = blank_face(images, mask)
    shown = blanked if condition == "masked" else condition_image(images, mask, condition,
                                                                   condition_blur)
    scaling = vae.config.scaling_factor
    latents = vae.encode(images).latent_dist.mode() * scaling
    masked_latents = vae.encode(shown).latent_dist.mode() * scaling
    tokens = None
    if clip_encoder is not None:
        tokens = clip_encoder(blanked.to(clip_encoder.dtype))[0]
    return EncodedCrops(latents, masked_latents,
                        latent_mask(mask.to(images), tuple(latents.shape[-2:])), tokens)


def head_reference_tokens(clip_encoder, tokens: torch.Tensor, source: torch.Tensor,
                          head: torch.Tensor) -> torch.Tensor:
    """The CLIP tokens of a batch where some samples are head swaps: those take the tokens of
    their whole source crop (the hair to paint is the source's: nothing of it is outside a
    head mask), the others keep ``tokens`` (their target crop with the face blanked).

    tokens: [B,T,D]; source: [B,3,S,S] float in [-1,1] source crops (in training, the
    reference-augmented copy of the target); head: [B] bool. Returns [B,T,D] (``tokens``
    itself when no sample is a head swap, so face-only runs compute nothing more).
    """
    if not bool(head.any()):
        return tokens
    rows = torch.nonzero(head.to(torch.bool)).flatten()
    out = tokens.clone()
    out[rows] = clip_encoder(source[rows].to(clip_encoder.dtype))[0].to(tokens)
    return out


@dataclass
class UNetConditions:
    """Everything the SFI UNet takes besides the noisy latents and the timestep.

    mask: [B,1,h,w] latent repaint mask; masked_latents: [B,4,h,w]; geometry: [B,C,h,w] swapped
    geometry heatmaps; context: [B,N,D] cross-attention tokens (identity then CLIP).
    """

    mask: torch.Tensor
    masked_latents: torch.Tensor
    geometry: torch.Tensor
    context: torch.Tensor

    def predict(self, unet, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's output for latents [B,4,h,w] at timesteps (scalar or [B])."""
        inputs = torch.cat([latents, self.mask, self.masked_latents, self.geometry], dim=1)
        return unet(inputs, timesteps, encoder_hidden_states=self.context).sample

    def rows(self, index: torch.Tensor) -> UNetConditions:
        """The conditions of some samples of the batch only."""
        return UNetConditions(self.mask[index], self.masked_latents[index],
                              self.geometry[index], self.context[index])

    def with_unconditional(self, context: torch.Tensor) -> UNetConditions:
        """Conditions for one batched classifier-free-guidance call: the batch twice, the
        conditional context first, then ``context`` ([B,N,D], the null identity tokens)."""
        def twice(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x])

        return replace(self, mask=twice(self.mask), masked_latents=twice(self.masked_latents),
                       geometry=twice(self.geometry), context=torch.cat([self.context, context]))

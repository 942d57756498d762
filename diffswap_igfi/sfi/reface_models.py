"""REFace's conditioning modules as diffusers models (written from its paper and model code).

REFace (Baliah et al., WACV 2025) conditions an SD-1.x inpainting UNet by cross-attention on
ONE 768-d token, a weighted mean of three features:

    clip     = ln(mapper(CLIP-L/14 image embedding of the masked source))   -> proj_out_source
             + ln(mapper(CLIP-L/14 image embedding of the whole target))    -> proj_out_target
    identity = ID_proj_out(IR-SE50 ArcFace of the masked source)
    landmark = landmark_proj_out(68 target landmarks, x,y in pixels of the 512 crop, flattened)
    token    = (w_clip * clip + w_id * identity + w_lm * landmark) / (w_clip + w_id + w_lm)

with weights 1, 10 and 0.05 in its released configuration; the unconditional token for
classifier-free guidance is a learned vector. ``mapper`` is a small pre-norm transformer over
that single token (GLIDE's ``xf`` layout: fused qkv, 4x GELU MLP); with one token, attention
is the value projection, but the layer is kept whole so the weights load as published.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

# REFace's landmark feature: dlib's 68 points. The mesh vertex nearest to each of dlib's points
# (shape_predictor_68_face_landmarks) on the faces of our shipped sample photos, in interocular
# units: 0.02-0.06 inside the face, 0.07-0.15 along the jaw (the mesh's oval runs a little
# inside dlib's jawline).
DLIB68_FROM_MESH = (
    34, 227, 147, 213, 138, 136, 149, 176, 152, 377, 378, 365, 397, 288, 361, 454, 356,  # jaw
    70, 63, 105, 66, 55, 336, 296, 334, 293, 300,  # brows
    168, 197, 5, 4, 166, 20, 94, 326, 305,  # nose
    33, 160, 158, 173, 153, 144, 382, 385, 387, 249, 373, 380,  # eyes
    61, 40, 37, 0, 267, 269, 306, 405, 314, 17, 84, 91,  # outer lips
    77, 38, 12, 312, 407, 317, 14, 87)  # inner lips


class TokenAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, heads laid out [q|k|v] per head."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        qkv = self.c_qkv(x).view(b, n, self.heads, 3 * width // self.heads)
        q, k, v = qkv.chunk(3, dim=-1)  # [B,N,H,C] each
        scale = 1.0 / math.sqrt(q.shape[-1])
        weights = torch.einsum("bthc,bshc->bhts", q, k * scale).float().softmax(-1)
        out = torch.einsum("bhts,bshc->bthc", weights.to(v.dtype), v)
        return self.c_proj(out.reshape(b, n, width))


class TokenMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TokenBlock(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = TokenAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = TokenMLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TokenMapper(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TokenBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class RefaceConditioner(ModelMixin, ConfigMixin):
    """REFace's trained conditioning head: CLIP image embeddings, an identity embedding and 68
    landmarks -> the one cross-attention token [B,1,D] (D = context_dim, 768).

    Parameter names follow the released checkpoint with ``cond_stage_model.`` dropped for the
    mapper (``mapper2`` -> ``mapper``, ``final_ln2`` -> ``final_ln``); the rest keep their
    names.
    """

    @register_to_config
    def __init__(self, context_dim: int = 768, clip_dim: int = 768, id_dim: int = 512,
                 num_landmarks: int = 68, mapper_layers: int = 5, mapper_heads: int = 1,
                 clip_weight: float = 1.0, id_weight: float = 10.0,
                 landmark_weight: float = 0.05) -> None:
        super().__init__()
        self.mapper = TokenMapper(clip_dim, mapper_layers, mapper_heads)
        self.final_ln = nn.LayerNorm(clip_dim)
        self.proj_out_source = nn.Linear(clip_dim, context_dim)
        self.proj_out_target = nn.Linear(clip_dim, context_dim)
        self.ID_proj_out = nn.Linear(id_dim, context_dim)
        self.landmark_proj_out = nn.Linear(2 * num_landmarks, context_dim)
        self.learnable_vector = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.requires_grad_(False)

    def map_clip(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B,E] projected CLIP image embeddings -> [B,1,E] mapped tokens."""
        return self.final_ln(self.mapper(image_embeds[:, None]))

    def forward(self, source_clip: torch.Tensor, target_clip: torch.Tensor,
                identity: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """source_clip, target_clip: [B,E] CLIP image embeddings (after visual projection);
        identity: [B,512] unit-norm ArcFace; landmarks: [B,68,2] pixels of the 512 crop.
        Returns the conditional token [B,1,D]."""
        c = self.config
        clip = (self.proj_out_source(self.map_clip(source_clip))
                + self.proj_out_target(self.map_clip(target_clip)))
        ident = self.ID_proj_out(identity)[:, None]
        marks = self.landmark_proj_out(landmarks.reshape(len(landmarks), -1))[:, None]
        total = c.clip_weight + c.id_weight + c.landmark_weight
        return (clip * c.clip_weight + ident * c.id_weight + marks * c.landmark_weight) / total

    def null(self, batch: int) -> torch.Tensor:
        """The learned unconditional token, [B,1,D]."""
        return self.learnable_vector.expand(batch, -1, -1)

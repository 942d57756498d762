"""Token projectors: conditions -> tokens the SFI UNet cross-attends to.

Both projectors are learned-query resamplers (the idea of Flamingo's Perceiver resampler, as used
by IP-Adapter and Face-Adapter): ``N`` learned queries attend, in ``depth`` pre-norm blocks, to
context tokens derived from the condition (and to themselves), then a projection to the UNet's
``cross_attention_dim`` and a final LayerNorm.

Initialisation, so that training starts stable: every residual branch ends in a small-init linear
(std ``0.02 / sqrt(2 * depth)``, zero bias), so each block starts close to the identity and the
output starts as the (distinct) learned queries, gently shaped by the condition; the final
LayerNorm keeps every token at unit scale, like the LayerNormed CLIP text states Stable
Diffusion's cross-attention was trained on, whatever the condition's magnitude. The learned null
tokens start at zero: a zero token adds no key/value content (diffusers' to_k/to_v have no bias),
so the unconditional branch starts as "no condition".

Classifier-free guidance: ``forward(x, drop)`` puts the learned ``null_tokens`` in the rows where
``drop`` is True (condition dropout while training); ``null(batch_size)`` gives the
unconditional tokens at sampling time.

Both are diffusers citizens (``ModelMixin`` + ``ConfigMixin``): ``save_pretrained(folder)`` writes
``config.json`` + ``diffusion_pytorch_model.safetensors`` and ``from_pretrained(folder)`` reads
them back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from diffswap_igfi.errors import ConfigError


class _Attention(nn.Module):
    """Multi-head attention of queries [B,N,C] over a context [B,L,C]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = q.shape
        k, v = self.to_kv(context).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(q)), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class _ResamplerBlock(nn.Module):
    """Pre-norm block: queries attend to [context; queries], then an MLP; both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm_context = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        qn = self.norm_queries(q)
        # attending to the queries too lets them exchange what they took from the context
        q = q + self.attn(qn, torch.cat([self.norm_context(context), qn], dim=1))
        return q + self.mlp(self.norm_mlp(q))


class _TokenProjector(ModelMixin, ConfigMixin):
    """Shared core: learned queries, resampler blocks, output projection, null tokens."""

    def _build(self, num_tokens: int, cross_attention_dim: int, hidden_dim: int, depth: int,
               heads: int, mlp_ratio: float) -> None:
        if min(num_tokens, cross_attention_dim, hidden_dim, heads) < 1 or depth < 0:
            raise ConfigError(f"{type(self).__name__}: sizes must be positive (num_tokens="
                              f"{num_tokens}, hidden_dim={hidden_dim}, heads={heads}, depth={depth})")
        if hidden_dim % heads:
            raise ConfigError(f"{type(self).__name__}: hidden_dim={hidden_dim} is not divisible "
                              f"by heads={heads}")
        self.queries = nn.Parameter(torch.randn(num_tokens, hidden_dim) / math.sqrt(hidden_dim))
        self.blocks = nn.ModuleList(_ResamplerBlock(hidden_dim, heads, mlp_ratio)
                                    for _ in range(depth))
        self.proj_out = nn.Linear(hidden_dim, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.null_tokens = nn.Parameter(torch.zeros(num_tokens, cross_attention_dim))
        small = 0.02 / math.sqrt(2 * max(depth, 1))
        for block in self.blocks:
            for layer in (block.attn.to_out, block.mlp[-1]):
                nn.init.normal_(layer.weight, std=small)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        nn.init.zeros_(self.proj_out.bias)

    def _resample(self, context: torch.Tensor) -> torch.Tensor:
        """context: [B,L,hidden_dim] -> tokens [B,N,cross_attention_dim]."""
        q = self.queries.unsqueeze(0).expand(context.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, context)
        return self.norm_out(self.proj_out(q))

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: the condition (see the subclass); drop: [B] bool, True -> null tokens for that row.

        Returns [B,N,cross_attention_dim]. Rows not dropped are exactly what they would be
        without ``drop``; dropped rows are exactly ``null_tokens`` (gradients reach them).
        """
        tokens = self._resample(self._context(x.to(self.queries.dtype)))
        if drop is None:
            return tokens
        drop = torch.as_tensor(drop, device=tokens.device)
        if drop.dtype != torch.bool or drop.shape != tokens.shape[:1]:
            raise ValueError(f"drop must be a [{tokens.shape[0]}] bool tensor, got "
                             f"{tuple(drop.shape)} {drop.dtype}")
        null = self.null_tokens.to(tokens.dtype).unsqueeze(0)
        return torch.where(drop[:, None, None], null, tokens)

    def null(self, batch_size: int) -> torch.Tensor:
        """The unconditional tokens: [batch_size,N,cross_attention_dim] (an expanded view)."""
        return self.null_tokens.unsqueeze(0).expand(batch_size, -1, -1)


class IdentityTokenProjector(_TokenProjector):
    """Identity embedding [B,embed_dim] (e.g. ArcFace 512-d) -> tokens [B,num_tokens,D].

    The embedding is L2-normalised (identity is its direction, so raw and normalised ArcFace
    outputs give the same tokens), projected to ``num_context_tokens`` context tokens of width
    ``hidden_dim``, and resampled by ``num_tokens`` learned queries through ``depth`` blocks.
    D = ``cross_attention_dim``.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 512, num_tokens: int = 4, cross_attention_dim: int = 768,
                 hidden_dim: int = 768, depth: int = 2, heads: int = 8,
                 num_context_tokens: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if embed_dim < 1 or num_context_tokens < 1:
            raise ConfigError(f"IdentityTokenProjector: embed_dim={embed_dim} and "
                              f"num_context_tokens={num_context_tokens} must be positive")
        self.to_context = nn.Linear(embed_dim, num_context_tokens * hidden_dim)
        self._build(num_tokens, cross_attention_dim, hidden_dim, depth, heads, mlp_ratio)

    def _context(self, embeds: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if embeds.ndim != 2 or embeds.shape[1] != cfg.embed_dim:
            raise ValueError(f"embeds must be [B,{cfg.embed_dim}], got {tuple(embeds.shape)}")
        ctx = self.to_context(F.normalize(embeds, dim=-1))
        return ctx.reshape(embeds.shape[0], cfg.num_context_tokens, cfg.hidden_dim)

    def forward(self, embeds: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """embeds: [B,embed_dim] float; drop: [B] bool or None -> [B,num_tokens,D]."""
        return super().forward(embeds, drop)


class ClipTokenProjector(_TokenProjector):
    """CLIP patch tokens [B,T,clip_dim] -> tokens [B,num_tokens,D] (learned-query resampler).

    Any T works (the queries attend over however many tokens come in). D =
    ``cross_attention_dim``; ``clip_dim`` is the ViT width (``ClipImageEncoder.token_dim``).
    """

    @register_to_config
    def __init__(self, clip_dim: int = 1024, num_tokens: int = 16, cross_attention_dim: int = 768,
                 hidden_dim: int = 768, depth: int = 4, heads: int = 12,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if clip_dim < 1:
            raise ConfigError(f"ClipTokenProjector: clip_dim={clip_dim} must be positive")
        self.proj_in = nn.Linear(clip_dim, hidden_dim)
        self._build(num_tokens, cross_attention_dim, hidden_dim, depth, heads, mlp_ratio)

    def _context(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[2] != self.config.clip_dim:
            raise ValueError(f"tokens must be [B,T,{self.config.clip_dim}], got "
                             f"{tuple(tokens.shape)}")
        return self.proj_in(tokens)

    def forward(self, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B,T,clip_dim] float; drop: [B] bool or None -> [B,num_tokens,D]."""
        return super().forward(tokens, drop)

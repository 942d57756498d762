"""An IP-Adapter-style identity adapter that attaches to STOCK diffusers pipelines.

The adapter is a projector plus decoupled cross-attention (the IP-Adapter idea): an
``IdentityTokenProjector`` turns an identity embedding [B,512] into N tokens, and every
cross-attention layer of the UNet gets its own key/value projections for those tokens. The
layer's ``IdentityAttnProcessor`` computes

    out = to_out( attention(q, text k/v) + scale * attention(q, identity k/v) )

so the text path is untouched and, at ``scale == 0`` (or with no embedding set), the output is
the stock processor's to the last bit.

Initialisation (``IdentityAdapter.for_unet(init="copy")``, the default): the identity k/v start
as copies of the layer's text ``to_k``/``to_v``. The projector's tokens are LayerNormed like the
CLIP text states those weights were trained on, so from step 0 the identity tokens act as extra,
well-scaled "words" and training starts from a working attention rather than from nothing (this
is IP-Adapter's choice). ``init="zero"`` makes a freshly built adapter an exact no-op instead.

Passing the embedding at call time: ``StableDiffusionInpaintPipeline.__call__`` is used unmodified;
the embedding is set around the call with a context manager, which projects it to tokens once::

    attach_identity_adapter(pipe, adapter, scale=1.0)
    with identity_embedding(pipe, embeds):          # embeds: [B,512]
        image = pipe(prompt=..., image=..., mask_image=...).images
    detach_identity_adapter(pipe)                   # the original processors, restored

Classifier-free guidance: the stock pipeline runs the UNet on [uncond; cond] (batch doubled)
when ``guidance_scale > 1``. The processor reads ``pipe.do_classifier_free_guidance`` at run time
and gives the unconditional half the projector's learned null tokens (zero at initialisation,
which add no key/value content: the unconditional branch starts as "no identity") and the
conditional half the identity tokens. On a bare UNet (``identity_embedding(unet, ...)``) say
``guidance=True`` if the batch is [uncond; cond]; the default treats every row as conditional.
Embeddings broadcast over ``num_images_per_prompt``: a batch of b embeddings serves b*k rows
(each embedding repeated k times, in the pipeline's order).

The adapter's modules are not registered inside the UNet (its ``state_dict`` and
``save_pretrained`` stay stock); they follow the UNet's device and dtype whenever an embedding is
set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from torch import nn

from diffswap_igfi.conditions.projectors import IdentityTokenProjector
from diffswap_igfi.errors import ConfigError, InputError


class _IdentityKV(nn.Module):
    """The decoupled key/value projections of one cross-attention layer (no bias, like SD's)."""

    def __init__(self, context_dim: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.to_k = nn.Linear(context_dim, key_dim, bias=False)
        self.to_v = nn.Linear(context_dim, value_dim, bias=False)


def _cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """module name -> cross-attention ``Attention`` module of ``unet``, in module order."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention}


def _widths(to_k: nn.Module, to_v: nn.Module) -> tuple[int, int, int]:
    """(context width, key width, value width) of a layer (the plain Linear under a LoRA)."""
    to_k, to_v = getattr(to_k, "base_layer", to_k), getattr(to_v, "base_layer", to_v)
    return to_k.in_features, to_k.out_features, to_v.out_features


class IdentityAdapter(ModelMixin, ConfigMixin):
    """Identity projector + per-layer identity key/value projections for one UNet layout.

    ``layer_names`` are the UNet's cross-attention module names (``...transformer_blocks.0.attn2``)
    and ``key_dims``/``value_dims`` their inner widths; build it with ``for_unet``.
    """

    @register_to_config
    def __init__(self, layer_names: list[str] = (), key_dims: list[int] = (),
                 value_dims: list[int] = (), embed_dim: int = 512, num_tokens: int = 4,
                 cross_attention_dim: int = 768, projector_hidden_dim: int = 768,
                 projector_depth: int = 2, projector_heads: int = 8) -> None:
        super().__init__()
        if not (len(layer_names) == len(key_dims) == len(value_dims)):
            raise ConfigError(f"IdentityAdapter: {len(layer_names)} layer names but "
                              f"{len(key_dims)} key and {len(value_dims)} value widths")
        self.projector = IdentityTokenProjector(
            embed_dim=embed_dim, num_tokens=num_tokens, cross_attention_dim=cross_attention_dim,
            hidden_dim=projector_hidden_dim, depth=projector_depth, heads=projector_heads)
        self.layers = nn.ModuleList(_IdentityKV(cross_attention_dim, k, v)
                                    for k, v in zip(key_dims, value_dims))

    @classmethod
    def for_unet(cls, unet: nn.Module, embed_dim: int = 512, num_tokens: int = 4, *,
                 init: str = "copy", projector_hidden_dim: int = 768, projector_depth: int = 2,
                 projector_heads: int = 8) -> IdentityAdapter:
        """An adapter shaped for ``unet``'s cross-attention layers.

        init: "copy" (identity k/v = the layer's text to_k/to_v, IP-Adapter's choice) or "zero"
        (identity k/v = 0: the adapter starts as an exact no-op).
        """
        if init not in ("copy", "zero"):
            raise ConfigError(f"IdentityAdapter.for_unet: init must be 'copy' or 'zero', "
                              f"got {init!r}")
        layers = _cross_attention_layers(unet)
        if not layers:
            raise ConfigError("IdentityAdapter.for_unet: the UNet has no cross-attention layers")
        widths = [_widths(a.to_k, a.to_v) for a in layers.values()]
        if len({w[0] for w in widths}) != 1:
            raise ConfigError(f"IdentityAdapter.for_unet: cross-attention context widths differ "
                              f"between layers ({widths}); one token width is needed")
        adapter = cls(layer_names=list(layers), key_dims=[w[1] for w in widths],
                      value_dims=[w[2] for w in widths], embed_dim=embed_dim,
                      num_tokens=num_tokens, cross_attention_dim=widths[0][0],
                      projector_hidden_dim=projector_hidden_dim, projector_depth=projector_depth,
                      projector_heads=projector_heads)
        with torch.no_grad():
            for kv, attn in zip(adapter.layers, layers.values()):
                for mine, theirs in ((kv.to_k, attn.to_k), (kv.to_v, attn.to_v)):
                    if init == "copy":
                        mine.weight.copy_(getattr(theirs, "base_layer", theirs).weight)
                    else:
                        mine.weight.zero_()
        return adapter

    def tokens(self, embeds: torch.Tensor, drop: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [B,embed_dim] float; drop: [B] bool (True -> null tokens in that row, for
        condition dropout while training) -> (identity tokens, null tokens), each [B,N,D]."""
        tokens = self.projector(embeds.to(self.device, self.dtype), drop)
        return tokens, self.projector.null(tokens.shape[0]).to(tokens.dtype)


@dataclass
class _IdentityState:
    """What the processors of one attached adapter share."""

    adapter: IdentityAdapter
    scale: float
    originals: dict[str, Any]
    tokens: torch.Tensor | None = None
    null: torch.Tensor | None = None
    guidance: Any = False  # bool, or a callable returning one (read at run time)

    def context_for(self, rows: int) -> torch.Tensor | None:
        """Identity tokens for a UNet batch of ``rows`` ([rows,N,D]), or None when inactive."""
        if self.tokens is None or self.scale == 0:
            return None
        cfg = bool(self.guidance() if callable(self.guidance) else self.guidance)
        branches = 2 if cfg else 1
        if rows % branches:
            raise InputError(f"identity adapter: classifier-free guidance needs an even UNet "
                             f"batch, got {rows}")
        per = rows // branches
        cond = _broadcast(self.tokens, per)
        return torch.cat([_broadcast(self.null, per), cond]) if cfg else cond


def _broadcast(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    b = tokens.shape[0]
    if rows % b:
        raise InputError(f"identity adapter: {b} identity embedding(s) for {rows} images per "
                         f"guidance branch; give one embedding, or one per prompt")
    return tokens if b == rows else tokens.repeat_interleave(rows // b, dim=0)


class IdentityAttnProcessor:
    """Decoupled cross-attention: text attention + scale * identity attention (torch SDPA).

    With no identity tokens (or scale 0) the call is handed to the layer's original processor,
    so the output is the stock output by construction, bit for bit on any CPU. With identity
    tokens the text path follows diffusers' ``AttnProcessor2_0`` step for step: the same maths,
    equal to the stock text path up to float rounding.
    """

    def __init__(self, kv: _IdentityKV, state: _IdentityState, stock: Any) -> None:
        self.kv = kv
        self.state = state
        self.stock = stock

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """hidden_states: [B,L,C] (or [B,C,H,W]); encoder_hidden_states: text [B,T,D]."""
        rows = hidden_states.shape[0]
        ids = self.state.context_for(rows)
        if ids is None:
            return self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, temb=temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = self._heads(query, attn, head_dim)
        key, value = self._heads(key, attn, head_dim), self._heads(value, attn, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        id_key = self._heads(self.kv.to_k(ids.to(query.dtype)), attn, head_dim)
        id_value = self._heads(self.kv.to_v(ids.to(query.dtype)), attn, head_dim)
        if attn.norm_k is not None:
            id_key = attn.norm_k(id_key)
        id_out = F.scaled_dot_product_attention(query, id_key, id_value)
        out = out + self.state.scale * id_out.transpose(1, 2).reshape(out.shape)

        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads(x: torch.Tensor, attn: Attention, head_dim: int) -> torch.Tensor:
        """[B,L,heads*head_dim] -> [B,heads,L,head_dim]."""
        return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)


def _unet_of(target: Any) -> nn.Module:
    unet = getattr(target, "unet", target)
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ConfigError(f"identity adapter: {type(target).__name__} is neither a diffusers "
                          f"UNet nor a pipeline with a .unet")
    return unet


def _follow(adapter: IdentityAdapter, unet: nn.Module) -> None:
    """Put the adapter on the UNet's device and dtype (the adapter is not a UNet submodule)."""
    if (adapter.device, adapter.dtype) != (unet.device, unet.dtype):
        adapter.to(device=unet.device, dtype=unet.dtype)


def _state(target: Any, required: bool = True) -> _IdentityState | None:
    for proc in _unet_of(target).attn_processors.values():
        if isinstance(proc, IdentityAttnProcessor):
            return proc.state
    if required:
        raise ConfigError("no identity adapter is attached; call attach_identity_adapter first")
    return None


def attach_identity_adapter(pipe_or_unet: Any, adapter: IdentityAdapter,
                            scale: float = 1.0) -> None:
    """Swap the cross-attention processors of the pipeline's UNet (or a UNet) for identity ones,
    whatever processors they were (``detach_identity_adapter`` puts those back).

    Raises ConfigError when an adapter is already attached or the adapter was built for another
    UNet layout. The adapter is moved to the UNet's device and dtype.
    """
    unet = _unet_of(pipe_or_unet)
    if _state(unet, required=False) is not None:
        raise ConfigError("an identity adapter is already attached; detach_identity_adapter first")
    names = list(adapter.config.layer_names)
    want = {n: _widths(a.to_k, a.to_v) for n, a in _cross_attention_layers(unet).items()}
    have = {n: _widths(kv.to_k, kv.to_v) for n, kv in zip(names, adapter.layers)}
    if want != have:
        odd = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        raise ConfigError(f"identity adapter was built for another UNet layout (cross-attention "
                          f"layers differ, e.g. {odd[:2]}); build it with IdentityAdapter.for_unet")
    _follow(adapter, unet)
    originals = dict(unet.attn_processors)
    state = _IdentityState(adapter=adapter, scale=float(scale), originals=originals)
    procs = dict(originals)
    for name, kv in zip(names, adapter.layers):
        key = f"{name}.processor"
        procs[key] = IdentityAttnProcessor(kv, state, originals[key])
    unet.set_attn_processor(procs)


def set_identity_scale(pipe_or_unet: Any, scale: float) -> None:
    """Set the weight of the identity attention (0 = stock output exactly)."""
    _state(pipe_or_unet).scale = float(scale)


def detach_identity_adapter(pipe_or_unet: Any) -> IdentityAdapter:
    """Restore the processors the UNet had before attaching; return the detached adapter."""
    unet = _unet_of(pipe_or_unet)
    state = _state(unet)
    unet.set_attn_processor(dict(state.originals))
    return state.adapter


@contextlib.contextmanager
def identity_embedding(pipe_or_unet: Any, embeds: torch.Tensor, *,
                       guidance: bool | None = None,
                       drop: torch.Tensor | None = None) -> Iterator[None]:
    """Condition every UNet call inside the block on ``embeds``: [B,embed_dim] float.

    guidance: whether the UNet batch is [uncond; cond]. None reads a pipeline's
    ``do_classifier_free_guidance`` at run time (False for a bare UNet). drop: [B] bool, rows
    that get the null tokens (condition dropout when training). The projection runs once, here,
    in the caller's grad mode (so the adapter can be trained through it).
    """
    unet = _unet_of(pipe_or_unet)
    state = _state(unet)
    if embeds.ndim != 2 or embeds.shape[1] != state.adapter.config.embed_dim:
        raise InputError(f"identity embedding must be [B,{state.adapter.config.embed_dim}], got "
                         f"{tuple(embeds.shape)}")
    saved = (state.tokens, state.null, state.guidance)
    _follow(state.adapter, unet)
    state.tokens, state.null = state.adapter.tokens(embeds, drop)
    state.guidance = bool(guidance)
    if guidance is None and pipe_or_unet is not unet:
        pipe = pipe_or_unet
        # read at run time: the pipeline sets its guidance scale inside __call__
        state.guidance = lambda: (hasattr(pipe, "_guidance_scale")
                                  and pipe.do_classifier_free_guidance)
    try:
        yield
    finally:
        state.tokens, state.null, state.guidance = saved

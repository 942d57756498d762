"""JR-Net: the joint-refinement stage (IGFI's JR-Net, a descendant of FaceShifter's HEAR-Net).

The SFI swap is good where the target was visible and weak where it was not: occluders (hands,
hair, glasses) that the inpainting painted over, and fine detail. JR sees the swap together with
the self-swap residual dX = target - SFI(target, target), which is large exactly where SFI cannot
reproduce the target (the occlusions), and refines (and upsamples) the swap:

    concat(swap, dX) -> stem -> 3 stride-2 blocks (S/8) -> AdaIN residual blocks, styled by an
    MLP on [source identity, attribute embedding of the target] -> 4 upsampling blocks with
    U-Net skips (S/4, S/2, S, then S * upscale) -> RGB delta
    output = tanh(atanh(upsample(swap)) + delta)

The last convolution starts at zero, so an untrained JR returns the (bilinearly upsampled) swap
to within 1e-3 and training starts from "change nothing". Component dictionaries (``jr.dictionary``)
enter the decoder by SFT: the matched atom of every component predicts a per-pixel scale and
shift at patch resolution, and these are pasted into the decoder features at the component's box
(from the landmarks) at the decoder scales S/s of the dictionary's scales s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from torchvision.ops import roi_align

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.faces import topology

COMPONENTS = ("left_eye", "right_eye", "nose", "mouth")
COMPONENT_LANDMARKS = {"left_eye": topology.LEFT_EYE, "right_eye": topology.RIGHT_EYE,
                       "nose": topology.NOSE, "mouth": topology.LIPS_OUTER}
# box side = max(grow * longest side of the landmarks' bounding box, least * crop size): the
# floor keeps an eye's box sensible when the eye is closed or seen from the side.
_BOX_GROW = {"left_eye": 1.5, "right_eye": 1.5, "nose": 1.1, "mouth": 1.3}
_BOX_LEAST = {"left_eye": 0.16, "right_eye": 0.16, "nose": 0.2, "mouth": 0.25}
_EPS_TANH = 1e-3


# ------------------------------------------------------------------------- component geometry
def component_boxes(landmarks: torch.Tensor, size: int,
                    components: Sequence[str] = COMPONENTS) -> dict[str, torch.Tensor]:
    """Square boxes around the facial components.

    landmarks: [B,N,2] (N >= 468, MediaPipe mesh order) in pixels of a size x size crop, pixel
    centres at integer coordinates. Returns name -> [B,4] float32 (x0, y0, x1, y1) in continuous
    pixel coordinates of that crop (pixel i spans [i, i+1)), centred on the landmarks' bounding box.
    """
    landmarks = torch.as_tensor(landmarks, dtype=torch.float32)
    boxes = {}
    for name in components:
        if name not in COMPONENT_LANDMARKS:
            raise ConfigError(f"unknown face component {name!r}; use {', '.join(COMPONENTS)}")
        points = landmarks[:, list(COMPONENT_LANDMARKS[name])] + 0.5
        low, high = points.amin(1), points.amax(1)
        centre = (low + high) / 2
        side = ((high - low).amax(1) * _BOX_GROW[name]).clamp_min(_BOX_LEAST[name] * size)
        half = side[:, None] / 2
        boxes[name] = torch.cat([centre - half, centre + half], dim=1)
    return boxes


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """Resample box contents to patch x patch (area-averaged, differentiable).

    images: [B,C,H,W] any range, the picture of a size x size crop at any resolution;
    boxes: [B,4] from ``component_boxes`` (pixels of the size crop). Returns [B,C,patch,patch];
    outside the image reads as 0.
    """
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)[:, None],
                      boxes], dim=1).to(images)
    return roi_align(images, rois, output_size=patch, spatial_scale=images.shape[-1] / size,
                     sampling_ratio=-1, aligned=True)


def paste_patches(patches: torch.Tensor, boxes: torch.Tensor, size: int,
                  out_hw: tuple[int, int], window: tuple[int, int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``crop_patches``: place patches [B,C,h,w] into boxes [B,4] (pixels of the size
    crop) of a canvas [B,C,H,W] covering that crop (out_hw = (H, W)), or only into its part
    ``window`` = (top, left, height, width) in canvas pixels. Returns (canvas, coverage [B,1,...]
    in [0,1]); both are 0 outside the box and the box edge is bilinearly soft."""
    top, left, height, width = window or (0, 0, *out_hw)
    ys = (torch.arange(top, top + height, device=patches.device, dtype=patches.dtype) + 0.5)
    xs = (torch.arange(left, left + width, device=patches.device, dtype=patches.dtype) + 0.5)
    ys, xs = ys * (size / out_hw[0]), xs * (size / out_hw[1])
    boxes = boxes.to(patches)
    gx = 2 * (xs[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) - 1  # [B,width]
    gy = 2 * (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) - 1  # [B,height]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    ones = torch.ones_like(patches[:, :1])
    sampled = F.grid_sample(torch.cat([patches, ones], 1), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled[:, :-1], sampled[:, -1:]


def boxes_window(boxes: Sequence[torch.Tensor], size: int,
                 out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in pixels of an out_hw canvas covering the size crop: the part
    that ``paste_patches`` can touch for any of the boxes [B,4] (one pixel of margin)."""
    union = torch.cat([b.reshape(-1, 4) for b in boxes])
    sx, sy = out_hw[1] / size, out_hw[0] / size
    x0, y0 = union[:, 0].min().item() * sx, union[:, 1].min().item() * sy
    x1, y1 = union[:, 2].max().item() * sx, union[:, 3].max().item() * sy
    top, left = max(0, math.floor(y0) - 1), max(0, math.floor(x0) - 1)
    bottom, right = min(out_hw[0], math.ceil(y1) + 1), min(out_hw[1], math.ceil(x1) + 1)
    return top, left, max(0, bottom - top), max(0, right - left)


# ------------------------------------------------------------------------------------- blocks
def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(cin, cout, 2), _conv(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self.conv2(_act(self.conv1(x))))


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1, self.conv2 = _conv(cin + cskip, cout), _conv(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return _act(self.conv2(_act(self.conv1(x))))


def _adain(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(x) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class _AdaINResBlock(nn.Module):
    """x + conv(act(AdaIN(conv(act(AdaIN(x)))))); style [B,4C] = (gamma1, beta1, gamma2, beta2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(channels, channels), _conv(channels, channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        g1, b1, g2, b2 = style.chunk(4, dim=1)
        h = self.conv1(_act(_adain(x, g1, b1)))
        return x + self.conv2(_act(_adain(h, g2, b2)))


class _AttributeEncoder(nn.Module):
    """Target [B,3,S,S] in [-1,1] -> [B,attr_dim]: 4 stride-2 convs and global average pooling."""

    def __init__(self, base: int, attr_dim: int) -> None:
        super().__init__()
        widths = (base, 2 * base, 4 * base, 4 * base)
        self.convs = nn.ModuleList(_conv(cin, cout, 2) for cin, cout in zip((3,) + widths, widths))
        self.proj = nn.Linear(widths[-1], attr_dim)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        x = target
        for conv in self.convs:
            x = _act(conv(x))
        return self.proj(x.mean(dim=(2, 3)))


class _SFT(nn.Module):
    """Matched atom [B,Cd,h,w] -> (scale, shift) [B,C,h,w] each, at patch resolution."""

    def __init__(self, atom_channels: int, channels: int) -> None:
        super().__init__()
        self.body = _conv(atom_channels, channels)
        self.out = _conv(channels, 2 * channels)
        nn.init.zeros_(self.out.weight)  # an untrained fusion changes nothing
        nn.init.zeros_(self.out.bias)

    def forward(self, atoms: torch.Tensor) -> torch.Tensor:
        return self.out(_act(self.body(atoms)))


# -------------------------------------------------------------------------------------- model
class JRNet(ModelMixin, ConfigMixin):
    """Joint refinement. Channels: stem C, then 2C, 4C, 4C at S/2, S/4, S/8 (C = base_channels);
    the decoder mirrors them and ends with C/2 channels at S * upscale.

    upscale: 1 or 2 (output S * upscale). use_dictionary: build the SFT fusion layers for a
    ``ComponentDictionary`` whose encoder has ``dictionary_channels`` (one per encoder block) and
    whose scales are ``dictionary_scales`` (each 1, 2 or 4: fused at decoder resolution S/s).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, base_channels: int = 64, id_dim: int = 512, attr_dim: int = 256,
                 num_res_blocks: int = 8, upscale: int = 2, style_hidden: int = 512,
                 use_dictionary: bool = True, components: Sequence[str] = COMPONENTS,
                 dictionary_channels: Sequence[int] = (64, 128),
                 dictionary_scales: Sequence[int] = (1, 2)) -> None:
        super().__init__()
        if upscale not in (1, 2):
            raise ConfigError(f"JRNet upscale must be 1 or 2, got {upscale}")
        if any(s not in (1, 2, 4) for s in dictionary_scales):
            raise ConfigError(f"dictionary scales must be 1, 2 or 4, got {list(dictionary_scales)}")
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ConfigError(f"unknown face components {sorted(unknown)}; use {COMPONENTS}")
        c = base_channels
        widths = (c, 2 * c, 4 * c, 4 * c)
        self.stem = _conv(6, c)
        self.downs = nn.ModuleList(_Down(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.blocks = nn.ModuleList(_AdaINResBlock(widths[3]) for _ in range(num_res_blocks))
        self.attribute_encoder = _AttributeEncoder(c, attr_dim)
        self.style = nn.Sequential(nn.Linear(id_dim + attr_dim, style_hidden), nn.LeakyReLU(0.2),
                                   nn.Linear(style_hidden, num_res_blocks * 4 * widths[3]))
        nn.init.zeros_(self.style[-1].weight)  # AdaIN starts as plain instance norm
        nn.init.zeros_(self.style[-1].bias)
        # decoder levels: S/4, S/2, S (with skips), then S * upscale
        self.ups = nn.ModuleList([_Up(widths[3], widths[2], widths[2], True),
                                  _Up(widths[2], widths[1], widths[1], True),
                                  _Up(widths[1], widths[0], widths[0], True),
                                  _Up(widths[0], 0, c // 2, upscale == 2)])
        self.to_rgb = _conv(c // 2, 3)
        nn.init.zeros_(self.to_rgb.weight)  # output = upsampled swap until trained
        nn.init.zeros_(self.to_rgb.bias)
        self.level_channels = {4: widths[2], 2: widths[1], 1: widths[0]}
        self.sft = nn.ModuleDict()
        if use_dictionary:
            if len(dictionary_channels) != len(dictionary_scales):
                raise ConfigError("one dictionary channel count per dictionary scale")
            for s, cd in zip(dictionary_scales, dictionary_channels):
                self.sft[f"s{s}"] = _SFT(cd, self.level_channels[s])
        self.gradient_checkpointing = False

    def attribute_embedding(self, target: torch.Tensor) -> torch.Tensor:
        """target: [B,3,S,S] float in [-1,1] -> [B,attr_dim]."""
        return self.attribute_encoder(target)

    def styles(self, identity: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        """identity [B,id_dim], attributes [B,attr_dim] -> AdaIN styles [B,blocks,4C]."""
        style = self.style(torch.cat([identity.to(attributes), attributes], dim=1))
        return style.view(len(style), self.config.num_res_blocks, -1)

    def forward(self, swap: torch.Tensor, residual: torch.Tensor, identity: torch.Tensor,
                target: torch.Tensor, landmarks: torch.Tensor | None = None,
                dictionary=None, return_stats: bool = False,
                fusion_rows: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Refine an SFI swap.

        swap: [B,3,S,S] float in [-1,1], the SFI output crop (S divisible by 8); residual:
        [B,3,S,S] float in [-2,2], target - SFI(target, target); identity: [B,id_dim] unit-norm
        source embedding; target: [B,3,S,S] in [-1,1]; landmarks: [B,N>=468,2] target mesh in
        crop pixels and dictionary: a ``ComponentDictionary``, both needed for component fusion
        (skipped when either is None or the model has no fusion layers); fusion_rows: [k] long,
        the samples that get fusion (None: all; training fuses a share of the batch to bound
        the cost of matching, as the identity loss does).
        Returns [B,3,S*upscale,S*upscale] float in (-1,1); with ``return_stats`` also the
        fusion's 0-d diagnostics (detached; empty without fusion): ``dictionary_distance``, the
        mean match distance of the components (0: every query is an atom, 2: uncorrelated; see
        ``ComponentDictionary.match``), and ``fusion_scale`` / ``fusion_shift``, the mean
        |SFT scale| and |SFT shift| over the pixels the component boxes cover (0 untrained).
        """
        size = swap.shape[-1]
        if size % 8 or swap.shape[-2] != size:
            raise ConfigError(f"JRNet needs square inputs with a side divisible by 8, got "
                              f"{tuple(swap.shape[-2:])}")
        styles = self.styles(identity, self.attribute_embedding(target))
        skips = [_act(self.stem(torch.cat([swap, residual.to(swap)], dim=1)))]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for k, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, styles[:, k])
            else:
                h = block(h, styles[:, k])
        rows = slice(None) if fusion_rows is None else fusion_rows.to(swap.device)
        fusion, stats = self._fusion_maps(
            swap[rows], None if landmarks is None else torch.as_tensor(landmarks)[rows],
            dictionary)
        for up, scale in zip(self.ups, (4, 2, 1, None)):
            h = up(h, skips.pop() if skips else None)
            if scale in fusion:  # SFT inside the components' window only
                (top, left, height, width), gamma, beta = fusion[scale]
                ys, xs = slice(top, top + height), slice(left, left + width)
                inner = h[rows, :, ys, xs]
                h = h.clone()
                h[rows, :, ys, xs] = inner * (1 + gamma) + beta
        delta = self.to_rgb(h)
        base = swap
        if delta.shape[-1] != size:
            base = F.interpolate(swap, size=delta.shape[-2:], mode="bilinear", align_corners=False)
        base = base.clamp(-1 + _EPS_TANH, 1 - _EPS_TANH)
        out = torch.tanh(torch.atanh(base) + delta)
        return (out, stats) if return_stats else out

    def _fusion_maps(self, swap: torch.Tensor, landmarks, dictionary
                     ) -> tuple[Mapping[int, tuple], dict[str, torch.Tensor]]:
        """(decoder scale s -> (window, gamma, beta), diagnostics): gamma, beta
        [B,C,height,width] over the window (top, left, height, width) of the S/s decoder map that
        holds every component box, 0 outside the boxes; diagnostics as in ``forward``."""
        if dictionary is None or landmarks is None or not len(self.sft):
            return {}, {}
        self._check_dictionary(dictionary)
        size = swap.shape[-1]
        landmarks = torch.as_tensor(landmarks).to(device=swap.device, dtype=torch.float32)
        boxes = component_boxes(landmarks, size, self.config.components)
        with torch.no_grad():  # matching is a nearest-neighbour lookup in a frozen dictionary
            matched = dictionary.match_faces(swap, landmarks, self.config.components)
        maps, scales, shifts = {}, [], []
        for s in self.config.dictionary_scales:
            level = (size // s, size // s)
            window = boxes_window(list(boxes.values()), size, level)
            if not window[2] or not window[3]:
                continue  # every box lies outside the crop
            acc = cover = None
            for name in self.config.components:
                params = self.sft[f"s{s}"](matched[name][s].atoms.to(swap))
                pasted, weight = paste_patches(params, boxes[name], size, level, window)
                acc = pasted if acc is None else acc + pasted
                cover = weight if cover is None else cover + weight
            acc = acc / cover.clamp_min(1.0)  # overlapping boxes average rather than add up
            gamma, beta = acc.chunk(2, dim=1)
            maps[s] = (window, gamma, beta)
            with torch.no_grad():
                inside = (cover > 0.5).to(gamma)
                covered = inside.sum().clamp_min(1) * gamma.shape[1]
                scales.append((gamma.abs() * inside).sum() / covered)
                shifts.append((beta.abs() * inside).sum() / covered)
        distances = [m.distance.float().mean() for per in matched.values() for m in per.values()]
        none = [swap.new_zeros((), dtype=torch.float32)]  # every box outside the crop
        # the same keys whatever the batch: processes gather them by name
        stats = {"dictionary_distance": torch.stack(distances).mean().detach(),
                 "fusion_scale": torch.stack(scales or none).mean().float(),
                 "fusion_shift": torch.stack(shifts or none).mean().float()}
        return maps, stats

    def _check_dictionary(self, dictionary) -> None:
        config = dictionary.config
        have = dictionary.scale_channels
        want = dict(zip(self.config.dictionary_scales, self.config.dictionary_channels))
        missing = set(self.config.components) - set(config.components)
        if missing or any(have.get(s) != c for s, c in want.items()):
            raise ConfigError(f"component dictionary (components {list(config.components)}, "
                              f"channels by scale {have}) does not fit this JRNet (components "
                              f"{list(self.config.components)}, channels by scale {want})")

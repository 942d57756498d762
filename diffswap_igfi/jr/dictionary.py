"""DFDNet-style component dictionaries: K feature atoms per face component and scale.

Build (offline, once, from good crops): cut each component (left eye, right eye, nose, mouth)
out of every crop by its landmark box (``jr.network.component_boxes``), resample it to the
component's patch size, encode it with the dictionary's own ``ComponentEncoder``, normalise each
feature channel over the patch (instance norm: what is left is structure, not colour or light),
and run k-means per component and scale. The atoms are the cluster centres.

Match (at run time): encode the swap's component patch the same way, restyle every atom to the
query's per-channel mean and std (AdaIN of the atoms to the query, as DFDNet does), take the atom
nearest in L2 and return it restyled: the dictionary's structure in the query's colours.

The encoder is a small fixed network owned by the dictionary and saved with it (VGG16's first
two blocks: 3x3 convs 3-64-64, max-pool, 64-128-128, ReLU), not JR's own encoder: so a
dictionary is built before JR is trained, does not go stale while JR trains, and one folder
holds everything matching needs. Its weights are seeded random features by default, or VGG16's
ImageNet ones from a local state dict (``ComponentEncoder.from_vgg16``), which match better.

On disk: a diffusers-style folder (``config.json`` + safetensors) with buffers
``atoms_<component>_s<scale>`` [K,C_s,P/s,P/s] float32 (standardised centres, see ``atoms``;
C_s = encoder_channels[log2 s], P = the component's patch size) and ``counts_<component>_s<scale>``
[K] (patches per atom), plus the encoder's weights.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from diffswap_igfi.errors import ConfigError, InputError, ModelNotFoundError, OutputError
from diffswap_igfi.jr.arguments import PATCH_SIZES, add_build_dictionaries_arguments  # noqa: F401
from diffswap_igfi.jr.network import COMPONENTS, component_boxes, crop_patches
from diffswap_igfi.losses import IMAGENET_MEAN, IMAGENET_STD, load_state_dict

_EPS = 1e-5
_VGG16_CONVS = ("0", "2", "5", "7")  # features.N of torchvision's vgg16: conv1_1 .. conv2_2


class Match(NamedTuple):
    """One component's match: atoms [B,C,h,w] restyled to the queries, index [B] long,
    distance [B] float32 in [0,4] (0: the query is an atom; see ``ComponentDictionary.match``)."""

    atoms: torch.Tensor
    index: torch.Tensor
    distance: torch.Tensor


class ComponentEncoder(ModelMixin, ConfigMixin):
    """[B,3,P,P] in [-1,1] -> one feature map per block: [B,channels[i],P/2^i,P/2^i] (ReLU).

    Block 0 is two 3x3 convs; every later block max-pools first (VGG16's layout). Weights are
    random (Kaiming, from ``seed``) unless loaded; ``image_mean``/``image_std`` normalise [0,1] RGB.
    """

    @register_to_config
    def __init__(self, channels: Sequence[int] = (64, 128),
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), seed: int = 0) -> None:
        super().__init__()
        convs, cin = [], 3
        for cout in channels:
            convs += [nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)]
            cin = cout
        self.convs = nn.ModuleList(convs)
        generator = torch.Generator().manual_seed(seed)
        for conv in self.convs:
            if conv.weight.device.type != "meta":  # from_pretrained loads the weights instead
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(conv.bias)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        x = ((patches + 1) / 2 - self.mean.to(patches)) / self.std.to(patches)
        features = []
        for i in range(0, len(self.convs), 2):
            if i:
                x = F.max_pool2d(x, 2)
            x = F.relu(self.convs[i + 1](F.relu(self.convs[i](x))))
            features.append(x)
        return features

    @classmethod
    def from_vgg16(cls, path: str | Path) -> ComponentEncoder:
        """VGG16's conv1_1..conv2_2 from a local torchvision ``vgg16`` state dict (.pth/.pt or
        .safetensors); see ``losses.PerceptualLoss`` for how to get one."""
        state = load_state_dict(Path(path).expanduser())
        missing = [i for i in _VGG16_CONVS if f"features.{i}.weight" not in state]
        if missing:
            raise ModelNotFoundError(f"{path} is not a torchvision vgg16 state dict (no "
                                     f"features.{missing[0]}.weight)")
        encoder = cls(channels=(64, 128), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        for conv, index in zip(encoder.convs, _VGG16_CONVS):
            conv.weight.copy_(state[f"features.{index}.weight"])
            conv.bias.copy_(state[f"features.{index}.bias"])
        return encoder


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B,C,h,w] -> (per-channel standardised x, mean [B,C,1,1], std [B,C,1,1])."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + _EPS).sqrt()
    return (x - mean) / std, mean, std


def _standardise_atoms(centres: torch.Tensor) -> torch.Tensor:
    """[K,C,h,w] -> zero mean and variance 1 - eps per channel (all-zero channels stay 0).

    A centre is a mean of standardised maps, so its variance is below 1. With variance 1 - eps
    ``_normalise`` leaves an atom as it is: matching compares like with like without
    re-normalising the bank on every call, and an atom restyled to its own statistics is itself.
    """
    mean = centres.mean(dim=(2, 3), keepdim=True)
    var = centres.var(dim=(2, 3), keepdim=True, unbiased=False)
    scale = torch.where(var > 1e-12, ((1 - _EPS) / var.clamp_min(1e-12)).sqrt(),
                        torch.zeros_like(var))
    return (centres - mean) * scale


class ComponentDictionary(ModelMixin, ConfigMixin):
    """K atoms per component and scale, with the encoder that made them (frozen, no parameters
    train). scales: 2**i for encoder blocks i; patch_sizes: component -> P, divisible by every
    scale. Fill it with ``build_dictionaries``; load it with ``from_pretrained``."""

    @register_to_config
    def __init__(self, components: Sequence[str] = COMPONENTS, num_atoms: int = 64,
                 scales: Sequence[int] = (1, 2), patch_sizes: Mapping[str, int] | None = None,
                 encoder_channels: Sequence[int] = (64, 128),
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), encoder_seed: int = 0) -> None:
        super().__init__()
        sizes = {name: int((patch_sizes or PATCH_SIZES)[name]) for name in components}
        bad = [s for s in scales if s not in [2**i for i in range(len(encoder_channels))]]
        if bad or any(p % max(scales) for p in sizes.values()) or num_atoms < 1:
            raise ConfigError(f"component dictionary: scales {list(scales)} must be powers of two "
                             f"below 2**{len(encoder_channels)} that divide every patch size "
                             f"{sizes}, and num_atoms ({num_atoms}) at least 1")
        self.patch_sizes = sizes
        self.encoder = ComponentEncoder(encoder_channels, image_mean, image_std, encoder_seed)
        for name in components:
            for s in scales:
                side = sizes[name] // s
                channels = encoder_channels[s.bit_length() - 1]
                self.register_buffer(f"atoms_{name}_s{s}",
                                     torch.zeros(num_atoms, channels, side, side))
                self.register_buffer(f"counts_{name}_s{s}", torch.zeros(num_atoms))
        self.requires_grad_(False)

    @property
    def scale_channels(self) -> dict[int, int]:
        """scale -> feature channels of its atoms."""
        return {s: self.config.encoder_channels[s.bit_length() - 1] for s in self.config.scales}

    @property
    def fusion_config(self) -> dict:
        """The ``JRNet`` arguments whose SFT fusion layers fit this dictionary:
        ``dictionary_scales`` and ``dictionary_channels`` (one per scale)."""
        scales = tuple(self.config.scales)
        return {"dictionary_scales": scales,
                "dictionary_channels": tuple(self.scale_channels[s] for s in scales)}

    def atoms(self, component: str, scale: int = 1) -> torch.Tensor:
        """[K,C_s,P/s,P/s] the atoms: k-means centres of per-channel standardised features,
        themselves standardised (zero mean, variance 1 - 1e-5 per channel over the patch)."""
        return getattr(self, f"atoms_{component}_s{scale}")

    def encode(self, patches: torch.Tensor) -> dict[int, torch.Tensor]:
        """patches: [B,3,P,P] in [-1,1] -> scale -> [B,C_s,P/s,P/s] features."""
        features = self.encoder(patches.to(self.encoder.convs[0].weight.dtype))
        return {s: features[s.bit_length() - 1] for s in self.config.scales}

    def match(self, features: torch.Tensor, component: str, scale: int = 1) -> Match:
        """Nearest atom to each query, restyled to the query (AdaIN of atom to query).

        features: [B,C_s,P/s,P/s] encoder features of the component's patches. Returns a
        ``Match``: atoms [B,C_s,P/s,P/s], the chosen atom given the query's per-channel mean and
        std; index [B] long; distance [B] float32, the squared L2 distance between the query and
        that restyled atom over the query's own spread (sum over channels of std_c^2 * n), so
        0 = the query is an atom, 2 = uncorrelated with its nearest atom, 4 at most. An atom's
        own features give back that atom (and its own index).
        """
        query, mean, std = _normalise(features.float())
        bank = self.atoms(component, scale).float()  # stored standardised
        b, c = len(query), query.shape[1]
        q, a = query.flatten(2), bank.flatten(2)  # [B,C,n], [K,C,n]
        # ||f - restyle(atom)||^2 = sum_c std_c^2 ||q_c - a_c||^2, channel by channel
        cross = torch.einsum("bcn,kcn->bkc", q, a)
        per_channel = (q.pow(2).sum(2)[:, None] + a.pow(2).sum(2)[None] - 2 * cross)
        weights = std.view(b, 1, c).pow(2)
        distance = (per_channel * weights).sum(2)  # [B,K]
        nearest, index = distance.min(1)
        spread = weights.sum(2)[:, 0] * q.shape[2]
        return Match((bank[index] * std + mean).to(features.dtype), index,
                     nearest.clamp_min(0) / spread.clamp_min(1e-12))

    def match_faces(self, images: torch.Tensor, landmarks: torch.Tensor,
                    components: Sequence[str] | None = None) -> dict[str, dict[int, Match]]:
        """images: [B,3,S,S] in [-1,1]; landmarks: [B,N>=468,2] in their pixels.
        Returns component -> scale -> ``Match`` (restyled atoms [B,C_s,P/s,P/s], index,
        distance; see ``match``)."""
        size = images.shape[-1]
        names = list(components or self.config.components)
        boxes = component_boxes(landmarks.to(images.device), size, names)
        out = {}
        for name in names:
            patches = crop_patches(images, boxes[name], size, self.patch_sizes[name])
            out[name] = {s: self.match(f, name, s) for s, f in self.encode(patches).items()}
        return out


# -------------------------------------------------------------------------------------- build
def kmeans(x: torch.Tensor, k: int, *, iters: int = 30,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding from ``torch.Generator().manual_seed(seed)``.

    x: [N,D] float, N >= k. Returns (centres [k,D], assignment [N] long). Stops when the
    assignment no longer changes; an emptied cluster restarts at the point farthest from its
    centre.
    """
    n = len(x)
    if n < k:
        raise InputError(f"k-means needs at least {k} samples, got {n}")
    generator = torch.Generator().manual_seed(seed)
    squared = x.pow(2).sum(1)

    def distances(centres: torch.Tensor) -> torch.Tensor:
        return (squared[:, None] - 2 * x @ centres.T + centres.pow(2).sum(1)[None]).clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = distances(x[chosen])[:, 0]
    for _ in range(1, k):
        weights = nearest.cpu().double() if nearest.sum() > 0 else torch.ones(n, dtype=torch.double)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, distances(x[chosen[-1:]])[:, 0])
    centres, assign = x[chosen].clone(), None
    for _ in range(iters):
        d = distances(centres)
        new = d.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts.clamp_min(1)[:, None]
        own = d.gather(1, assign[:, None])[:, 0]
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(own.argmax())
            centres[j], own[far] = x[far], -1.0
    return centres, distances(centres).argmin(1)


def component_patches(crops: torch.Tensor, landmarks: torch.Tensor,
                      patch_sizes: Mapping[str, int] | None = None,
                      components: Sequence[str] = COMPONENTS) -> dict[str, torch.Tensor]:
    """crops: [N,3,S,S] in [-1,1]; landmarks: [N,M>=468,2] crop pixels -> name -> [N,3,P,P]."""
    sizes = dict(patch_sizes or PATCH_SIZES)
    crops = torch.as_tensor(crops, dtype=torch.float32)
    boxes = component_boxes(torch.as_tensor(landmarks), crops.shape[-1], components)
    return {name: crop_patches(crops, boxes[name], crops.shape[-1], sizes[name])
            for name in components}


def dictionaries_from_patches(patches: Mapping[str, torch.Tensor], *,
                              encoder: ComponentEncoder | None = None, num_atoms: int = 64,
                              scales: Sequence[int] = (1, 2), iters: int = 30, seed: int = 0,
                              batch_size: int = 64, device: str | torch.device = "cpu"
                              ) -> ComponentDictionary:
    """Cluster component patches (name -> [N,3,P,P] in [-1,1]) into a ComponentDictionary.
    Memory: N * C_s * (P/s)^2 * 4 bytes for one component and scale at a time."""
    encoder = encoder if encoder is not None else ComponentEncoder()
    cfg = encoder.config
    dictionary = ComponentDictionary(
        components=tuple(patches), num_atoms=num_atoms, scales=tuple(scales),
        patch_sizes={name: int(p.shape[-1]) for name, p in patches.items()},
        encoder_channels=tuple(cfg.channels), image_mean=tuple(cfg.image_mean),
        image_std=tuple(cfg.image_std), encoder_seed=cfg.seed)
    dictionary.encoder.load_state_dict(encoder.state_dict())
    dictionary.to(device)
    for name, stack in patches.items():
        with torch.no_grad():
            chunks = [dictionary.encode(stack[i:i + batch_size].to(device))
                      for i in range(0, len(stack), batch_size)]
        for s in scales:
            features = _normalise(torch.cat([c[s] for c in chunks]).float())[0]
            centres, assign = kmeans(features.flatten(1), num_atoms, iters=iters, seed=seed)
            atoms = _standardise_atoms(centres.view_as(dictionary.atoms(name, s)))
            dictionary.atoms(name, s).copy_(atoms)
            getattr(dictionary, f"counts_{name}_s{s}").copy_(
                torch.bincount(assign, minlength=num_atoms).float())
    return dictionary.to("cpu")


def build_dictionaries(crops: torch.Tensor, landmarks: torch.Tensor, *,
                       encoder: ComponentEncoder | None = None, num_atoms: int = 64,
                       scales: Sequence[int] = (1, 2),
                       patch_sizes: Mapping[str, int] | None = None,
                       components: Sequence[str] = COMPONENTS, iters: int = 30, seed: int = 0,
                       batch_size: int = 64, device: str | torch.device = "cpu"
                       ) -> ComponentDictionary:
    """Component dictionaries from crops [N,3,S,S] in [-1,1] with landmarks [N,M>=468,2] in crop
    pixels. encoder: None for the seeded random ``ComponentEncoder``; ``from_vgg16`` for VGG's.
    Every component needs N >= num_atoms patches (InputError otherwise)."""
    patches = component_patches(crops, landmarks, patch_sizes, components)
    return dictionaries_from_patches(patches, encoder=encoder, num_atoms=num_atoms,
                                     scales=scales, iters=iters, seed=seed,
                                     batch_size=batch_size, device=device)


def build_dictionaries_from_shards(data_dir: str | Path, out_dir: str | Path | None, *,
                                   num_atoms: int = 64, scales: Sequence[int] = (1, 2),
                                   patch_sizes: Mapping[str, int] | None = None,
                                   max_samples: int | None = 1024, vgg16: str | Path | None = None,
                                   iters: int = 30, seed: int = 0, batch_size: int = 64,
                                   device: str | torch.device = "cpu") -> ComponentDictionary:
    """Dictionaries from a DATA_DIR written by ``diffswap-igfi preprocess`` (its crops and mesh
    landmarks), saved to ``out_dir`` with ``save_pretrained`` unless it is None. At most
    ``max_samples`` samples are used, evenly spaced over the data (None: all); vgg16: a local
    torchvision vgg16 state dict for ``ComponentEncoder.from_vgg16`` (None: random features)."""
    from diffswap_igfi.data.dataset import to_tensor_image
    from diffswap_igfi.data.shards import ShardIndex

    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be at least 1 (or None for all), got {max_samples}")
    shards = ShardIndex(data_dir)
    count = len(shards) if max_samples is None else min(len(shards), int(max_samples))
    indices = np.unique(np.linspace(0, len(shards) - 1, count).round().astype(int)).tolist()
    if len(indices) < num_atoms:
        raise InputError(f"{data_dir} has {len(indices)} usable faces, fewer than --num-atoms "
                         f"{num_atoms}: lower it or preprocess more photos")
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(indices), batch_size):  # only patches stay in memory, not crops
        samples = [shards[j] for j in indices[i:i + batch_size]]
        crops = torch.stack([to_tensor_image(sample["crop"]) for sample in samples])
        landmarks = np.stack([sample["landmarks"] for sample in samples]).astype(np.float32)
        for name, p in component_patches(crops, torch.from_numpy(landmarks), patch_sizes).items():
            parts.setdefault(name, []).append(p)
    encoder = ComponentEncoder.from_vgg16(vgg16) if vgg16 else None
    dictionary = dictionaries_from_patches(
        {name: torch.cat(p) for name, p in parts.items()}, encoder=encoder,
        num_atoms=num_atoms, scales=scales, iters=iters, seed=seed, batch_size=batch_size,
        device=device)
    if out_dir is not None:
        dictionary.save_pretrained(str(out_dir))
    return dictionary


# ---------------------------------------------------------------------------------------- CLI
def run_build_dictionaries(args: argparse.Namespace) -> int:
    """Build and save the dictionaries for parsed ``add_build_dictionaries_arguments`` args."""
    out = Path(args.out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not args.force):
        raise OutputError(f"{out} exists and is not an empty folder: pick a new OUT or pass "
                          f"--force")
    started = time.perf_counter()
    sizes = {"left_eye": args.eye_size, "right_eye": args.eye_size, "nose": args.nose_size,
             "mouth": args.mouth_size}
    dictionary = build_dictionaries_from_shards(
        args.data, out, num_atoms=args.num_atoms, scales=tuple(args.scales), patch_sizes=sizes,
        max_samples=args.max_samples or None, vgg16=args.vgg16, iters=args.iters,
        seed=args.seed, device=args.device)
    config = dictionary.config
    faces = int(getattr(dictionary, f"counts_{config.components[0]}_s{config.scales[0]}").sum())
    print(f"{args.num_atoms} atoms x {len(dictionary.config.components)} components x "
          f"{len(args.scales)} scale(s) from {faces} faces written to {out} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0

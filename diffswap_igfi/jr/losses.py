"""Training losses of the JR stage: identity, reconstruction, perceptual, contextual, adversarial.

JR's output is ``upscale`` times the input crop. Losses that compare it with the target crop
(reconstruction, perceptual, contextual) first area-average it down to the target's size, so an
S-pixel target supervises a 2S output without inventing detail it does not have; pass a 2S target
where you have one and nothing is resized. Reconstruction and perceptual count only samples
whose source is the target (``same``); identity, contextual and adversarial count all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.losses import IdentityLoss, PerceptualLoss

ADVERSARIAL_KINDS = ("hinge", "non_saturating")


def resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,C,H,W] -> [B,C,*size]: area average when shrinking, bilinear when growing."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    mode = "area" if images.shape[-1] > size[-1] else "bilinear"
    return F.interpolate(images, size=size, mode=mode,
                         **({"align_corners": False} if mode == "bilinear" else {}))


def _rows(same: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    if same is None:
        return torch.arange(batch, device=device)
    return torch.nonzero(torch.as_tensor(same, device=device).flatten().bool()).flatten()


# ------------------------------------------------------------------ identity and reconstruction
def jr_identity_loss(id_loss: IdentityLoss, output: torch.Tensor, kps: torch.Tensor,
                     source_embeds: torch.Tensor, *, input_size: int,
                     weight_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``losses.IdentityLoss`` on JR outputs. output: [B,3,H,W] in [-1,1]; kps: [B,5,2] in
    pixels of the input_size crop (scaled here to the output, pixel centres kept); source_embeds:
    [B,512] unit norm. Returns 1 - cos averaged over the (weighted) samples, in [0,2]."""
    factor = output.shape[-1] / input_size
    kps = (torch.as_tensor(kps, dtype=torch.float32, device=output.device) + 0.5) * factor - 0.5
    return id_loss(output, kps, source_embeds, weight_mask)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor,
                        same: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 between output [B,3,H,W] and target [B,3,h,w] (both in [-1,1]) over the samples
    with source == target (same: [B] bool; None = all). Exactly 0, still attached to the graph,
    when none is selected."""
    rows = _rows(same, len(output), output.device)
    if rows.numel() == 0:
        return output.sum().float() * 0.0
    out = resize_to(output[rows].float(), target.shape[-2:])
    return F.l1_loss(out, target[rows].to(out))


# ------------------------------------------------------------------------------------ contextual
def _limit_positions(x: torch.Tensor, max_positions: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h * w <= max_positions:
        return x
    factor = (h * w / max_positions) ** 0.5
    return F.adaptive_avg_pool2d(x, (max(1, int(h / factor)), max(1, int(w / factor))))


def contextual_loss(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float = 0.5,
                    eps: float = 1e-5, max_positions: int = 1024) -> torch.Tensor:
    """Contextual loss (Mechrez et al., ECCV 2018) between feature maps, alignment free.

    x: [B,C,H,W] features of the generated image; y: [B,C,H',W'] of the reference (a constant).
    Both are centred on y's mean feature and L2-normalised per position; d_ij = 1 - cos(x_i, y_j);
    relative d~_ij = d_ij / (min_k d_ik + eps); CX_ij = softmax_j((1 - d~_ij) / bandwidth);
    CX = mean_j max_i CX_ij. Returns mean over the batch of -log CX, a float32 scalar >= 0: about
    0 when every y feature has its own close match in x (e.g. x is y with positions shuffled).
    Maps with more than ``max_positions`` positions are average-pooled down first (memory is
    B * N * M).
    """
    x = _limit_positions(x.float(), max_positions)
    y = _limit_positions(y.detach().float(), max_positions)
    centre = y.mean(dim=(2, 3), keepdim=True)
    xn = F.normalize((x - centre).flatten(2), dim=1)  # [B,C,N]
    yn = F.normalize((y - centre).flatten(2), dim=1)  # [B,C,M]
    distance = (1 - torch.bmm(xn.transpose(1, 2), yn)).clamp_min(0)  # [B,N,M]
    relative = distance / (distance.amin(dim=2, keepdim=True) + eps)
    cx = torch.softmax((1 - relative) / bandwidth, dim=2)
    score = cx.amax(dim=1).mean(dim=1)  # [B]
    return -torch.log(score.clamp_min(eps)).mean()


class ContextualLoss(nn.Module):
    """``contextual_loss`` summed over feature maps of an extractor.

    extractor: a ``PerceptualLoss`` (its VGG16 taps: build one with e.g. layers=("relu3_3",
    "relu4_3") for this loss), any callable images -> list of [B,C,h,w], or None to compare the
    images themselves. The reference's features are computed without gradients.
    """

    def __init__(self, extractor: PerceptualLoss | Callable | None = None, *,
                 bandwidth: float = 0.5, max_positions: int = 1024) -> None:
        super().__init__()
        self.extractor = extractor
        self.bandwidth, self.max_positions = bandwidth, max_positions

    def features(self, images: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.extractor is None:
            return [images]
        if isinstance(self.extractor, PerceptualLoss):
            return self.extractor._taps(images)  # the same frozen VGG16, its chosen layers
        return self.extractor(images)

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """images, reference: [B,3,H,W] in [-1,1] (sizes may differ). Returns a scalar >= 0."""
        with torch.no_grad():
            wanted = self.features(reference)
        return sum(contextual_loss(a, b, bandwidth=self.bandwidth, max_positions=self.max_positions)
                   for a, b in zip(self.features(images), wanted))


# ----------------------------------------------------------------------------------- adversarial
class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN: [B,in_channels,H,W] in [-1,1] -> logits [B,1,h,w], one per overlapping patch.

    ``num_layers`` stride-2 4x4 convs (widths base, 2 base, ... capped at max_channels), one
    stride-1 conv and a 1-channel stride-1 conv; LeakyReLU(0.2); norm "none" (pair it with
    ``r1_penalty``) or "instance". With 3 layers each logit sees a 70-pixel patch.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3,
                 max_channels: int = 512, norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "instance"):
            raise ConfigError(f"PatchDiscriminator norm must be 'none' or 'instance', got {norm!r}")
        widths = [min(base_channels * 2**i, max_channels) for i in range(num_layers + 1)]
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(widths):
            layers.append(nn.Conv2d(cin, cout, 4, 2 if i < num_layers else 1, 1))
            if i > 0 and norm == "instance":
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2))
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_KINDS:
        raise ConfigError(f"adversarial loss must be one of {ADVERSARIAL_KINDS}, got {kind!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       kind: str = "hinge") -> torch.Tensor:
    """Discriminator objective (minimise). hinge: E[relu(1 - D(real))] + E[relu(1 + D(fake))];
    non_saturating: E[softplus(-D(real))] + E[softplus(D(fake))]. Pass fake logits of detached
    generator outputs."""
    _check_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator objective (minimise): hinge -E[D(fake)]; non_saturating E[softplus(-D(fake))]."""
    _check_kind(kind)
    fake = fake_logits.float()
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real images [B,3,H,W]. Returns a scalar
    >= 0 that back-propagates into the discriminator (create_graph). Add (gamma / 2) times it to
    the discriminator loss, e.g. every 16 steps scaled by 16 (lazy regularisation)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


# ------------------------------------------------------------------------------------- combined
@dataclass
class JRLossWeights:
    """Weights of the generator's terms (starting points after FaceShifter: rec 10, id 5)."""

    identity: float = 5.0
    reconstruction: float = 10.0
    perceptual: float = 1.0
    contextual: float = 1.0
    adversarial: float = 1.0


class JRGeneratorLoss(nn.Module):
    """JR's generator objective: the weighted sum of the terms whose parts are given.

    identity: an ``IdentityLoss`` (frozen ArcFace); perceptual: a ``PerceptualLoss``; contextual:
    a ``ContextualLoss``; each None to leave its term out. adversarial: "hinge" or
    "non_saturating", used when fake logits are passed.
    """

    def __init__(self, weights: JRLossWeights | dict | None = None, *,
                 identity: IdentityLoss | None = None, perceptual: PerceptualLoss | None = None,
                 contextual: ContextualLoss | None = None, adversarial: str = "hinge") -> None:
        super().__init__()
        _check_kind(adversarial)
        self.weights = (weights if isinstance(weights, JRLossWeights)
                        else JRLossWeights(**(weights or {})))
        self.identity, self.perceptual, self.contextual = identity, perceptual, contextual
        self.adversarial = adversarial

    def forward(self, output: torch.Tensor, target: torch.Tensor, *,
                same: torch.Tensor | None = None, kps: torch.Tensor | None = None,
                source_embeds: torch.Tensor | None = None,
                fake_logits: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """output: [B,3,H,W] JR output in [-1,1]; target: [B,3,S,S] in [-1,1]; same: [B] bool
        (source == target; None = all); kps: [B,5,2] target keypoints in target pixels and
        source_embeds [B,512], both needed for the identity term; fake_logits: D(output).
        Returns (weighted total, term name -> detached value)."""
        terms = {"reconstruction": reconstruction_loss(output, target, same)}
        if self.identity is not None and kps is not None and source_embeds is not None:
            terms["identity"] = jr_identity_loss(self.identity, output, kps, source_embeds,
                                                 input_size=target.shape[-1])
        small = resize_to(output, target.shape[-2:])
        if self.perceptual is not None:
            rows = _rows(same, len(output), output.device)
            terms["perceptual"] = (self.perceptual(small[rows], target[rows]) if rows.numel()
                                   else output.sum().float() * 0.0)
        if self.contextual is not None:
            terms["contextual"] = self.contextual(small, target)
        if fake_logits is not None:
            terms["adversarial"] = generator_adversarial_loss(fake_logits, self.adversarial)
        weights = asdict(self.weights)
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

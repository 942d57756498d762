"""FID and KID between two image sets, on Inception-v3 pool features from local weights.

The network is torchvision's ``inception_v3`` architecture; its weights come from a local file
(``--inception PATH`` or ``$DIFFSWAP_IGFI_INCEPTION``): a torch state dict (read with
``weights_only=True``) or safetensors. torchvision's ImageNet weights and pytorch-fid's
``pt_inception-2015-12-05`` weights both load (the classifier and auxiliary head are dropped).
pytorch-fid's numbers use modified pooling inside some blocks, so scores from this plain
architecture are close to, not identical with, published TF-FID numbers: compare methods under
one setup, never against numbers copied from papers.

Images go in whole, as [H,W,3] uint8, resized to 299x299 (bilinear, antialiased) and scaled
to [-1,1], which is what both weight sets expect once torchvision's ``transform_input`` is off.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffswap_igfi.errors import ModelNotFoundError

INCEPTION_ENV = "DIFFSWAP_IGFI_INCEPTION"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NO_INCEPTION_NOTE = ("FID skipped: no Inception weights; pass --inception PATH (a torchvision "
                     "inception_v3 state dict) or set DIFFSWAP_IGFI_INCEPTION")
INCEPTION_HINT = (
    "save torchvision's weights once where you have network access: torch.save(torchvision."
    "models.inception_v3(weights='IMAGENET1K_V1').state_dict(), 'inception_v3.pt')"
)


def load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch file read with weights_only
    (never unpickling code). A ``{"state_dict": ...}`` wrapper and ``module.`` prefixes go."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"{what} weights {path} not found: check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelNotFoundError(f"cannot read {what} weights {path} ({first}): pass a torch "
                                 f"state dict or a .safetensors file") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelNotFoundError(f"{path} is not a state dict of tensors ({what} weights)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def inception_weights_path(path: str | Path | None = None) -> Path | None:
    """The Inception weights to use: ``path``, else $DIFFSWAP_IGFI_INCEPTION, else None."""
    chosen = path or os.environ.get(INCEPTION_ENV) or None
    return Path(chosen).expanduser() if chosen else None


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 up to its 2048-d average pool (classifier replaced by identity)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False,
                           transform_input=False)
        net.fc = nn.Identity()
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B,3,299,299] float in [-1,1]. Returns [B,2048] pool features."""
        return self.net(x)

    @torch.no_grad()
    def features(self, images: Iterable[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """images: [H,W,3] uint8 photos of any sizes. Returns [N,2048] float64."""
        device = next(self.parameters()).device
        out, batch = [], []

        def flush():
            x = torch.cat(batch).to(device)
            out.append(self(x).double().cpu().numpy())
            batch.clear()

        for rgb in images:
            t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
            t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
            batch.append(t / 127.5 - 1.0)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def load_inception(path: str | Path, device: str = "cpu") -> InceptionFeatures:
    """Inception-v3 feature extractor from a local state dict (see the module docstring)."""
    state = load_state_dict(path, "Inception")
    state = {k.removeprefix("net."): v for k, v in state.items()
             if not k.removeprefix("net.").startswith(("fc.", "AuxLogits."))}
    model = InceptionFeatures()
    expected = model.net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what, keys = ("missing", missing) if missing else ("unexpected", unexpected)
        raise ModelNotFoundError(
            f"{path} is not a torchvision inception_v3 state dict ({what} {', '.join(keys[:3])}"
            f"{' ...' if len(keys) > 3 else ''}): {INCEPTION_HINT}")
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes that do not fit
        first = str(err).strip().splitlines()[-1].strip()
        raise ModelNotFoundError(f"{path} does not fit inception_v3 ({first}): "
                                 f"{INCEPTION_HINT}") from None
    return model.to(device).eval()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a: [N,D] and b: [M,D].

    ||mu_a - mu_b||^2 + tr(Ca) + tr(Cb) - 2 tr((Ca^1/2 Cb Ca^1/2)^1/2). With centred, scaled
    features Ca = Xa^T Xa and Cb = Xb^T Xb, the last trace is the sum of the singular values
    of Xa Xb^T [N,M] (the eigenvalues of Ca Cb are those of (Xa Xb^T)(Xa Xb^T)^T), so small
    sets never form D x D matrices; large ones use the symmetric D x D form. Both keep every
    matrix positive semi-definite: no complex square roots, even with singular covariances.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two feature vectors per set")
    mu = a.mean(0) - b.mean(0)
    xa = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    xb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    if len(a) * len(b) <= a.shape[1] ** 2:
        cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum()
    else:
        root_a = _sqrt_psd(xa.T @ xa)
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ (xb.T @ xb) @ root_a), 0, None)).sum()
    return float(mu @ mu + (xa**2).sum() + (xb**2).sum() - 2.0 * cross)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel k(x,y) = (x.y/D + 1)^3,
    averaged over ``subsets`` random subsets of min(subset_size, N, M) vectors per set.
    Returns (mean, standard deviation over subsets)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two feature vectors per set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(same - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def set_scores(swaps: list[np.ndarray], targets: list[np.ndarray], *,
               subset_size: int = 1000) -> tuple[dict | None, str | None]:
    """FID and KID of swap features vs target features ([2048] each, one per evaluated pair).
    Returns ({fid, kid, kid_std, fid_n}, None), or (None, a note saying why they were skipped)."""
    if len(swaps) < 2:
        return None, "FID skipped: it needs at least 2 evaluated pairs"
    a, b = np.stack(swaps), np.stack(targets)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None, "FID skipped: the Inception features are not finite (wrong weights?)"
    kid, kid_std = kernel_inception_distance(a, b, subset_size=subset_size)
    return {"fid": frechet_distance(a, b), "kid": kid, "kid_std": kid_std, "fid_n": len(a)}, None

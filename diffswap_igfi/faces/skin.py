"""A face's own skin colour model, to tell skin from what covers it (hair, glasses frames, a hat
brim, a hand) without any trained parser.

The model is a Gaussian in Lab fitted on colours sampled at the face's skin (mesh vertices away
from eyes, brows and lips); a pixel whose Mahalanobis distance from it is large is "not this
face's skin". Shadows and highlights move mostly L, so L's spread is floored generously.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# minimum standard deviation per Lab channel: keeps a flat (greyscale, or evenly lit) face from
# calling every shadow or faint tint foreign
MIN_STD = np.array([8.0, 3.0, 3.0])


@dataclass(frozen=True)
class SkinModel:
    """mean: [3] Lab; inv_cov: [3,3] inverse covariance (regularised)."""

    mean: np.ndarray
    inv_cov: np.ndarray


def fit_skin_model(lab: np.ndarray, weights: np.ndarray) -> SkinModel | None:
    """Fit on samples lab: [K,3] (L 0..100, a, b) with weights [K] >= 0. Two passes: the second
    drops samples beyond 3 deviations of the first (a strand of hair among the samples).
    Returns None with fewer than 20 usable samples."""
    x = np.asarray(lab, np.float64)
    w = np.asarray(weights, np.float64).copy()
    model = None
    for _ in range(2):
        if (w > 0.1).sum() < 20:
            return model
        mean = (x * w[:, None]).sum(0) / w.sum()
        d = x - mean
        cov = (d * w[:, None]).T @ d / w.sum() + np.diag(MIN_STD**2)
        model = SkinModel(mean, np.linalg.inv(cov))
        w = w * (distance(model, x) < 3.0)
    return model


def distance(model: SkinModel, lab: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of Lab colours [...,3] from the model. Returns [...] float."""
    x = np.asarray(lab, np.float32)
    # whiten with the Cholesky factor of the inverse covariance: |W (x - mean)|
    whiten = np.linalg.cholesky(model.inv_cov).T  # inv_cov = W^T W
    shift = -(whiten @ model.mean)
    m = np.concatenate([whiten, shift[:, None]], axis=1).astype(np.float32)  # [3,4]
    flat = x.reshape(-1, 1, 3)
    z = cv2.transform(flat, m).reshape(x.shape)
    zz = z * z
    # (z * z).sum(-1), summed in the order NumPy's reduction over a last axis of 3 takes
    # (checked equal bit for bit on float32), without the reduction's overhead (~5x)
    return np.sqrt((zz[..., 0] + zz[..., 1]) + zz[..., 2])


def skin_likelihood(model: SkinModel | None, lab: np.ndarray, near: float = 3.0,
                    far: float = 5.0) -> np.ndarray:
    """1 where a colour fits the skin model (distance <= near), 0 beyond ``far``, linear in
    between. lab: [H,W,3] float32. Returns [H,W] float32 (all ones without a model)."""
    if model is None:
        return np.ones(lab.shape[:2], np.float32)
    return np.clip((far - distance(model, lab)) / (far - near), 0.0, 1.0).astype(np.float32)

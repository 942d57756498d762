"""Moving a face's outline toward another face's shape: the swapped geometry (source shape, target
pose and expression) as landmarks, and a smooth displacement field to warp the photo around it."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from diffswap_igfi.faces import topology
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend

N = topology.NUM_MESH_POINTS


@functools.lru_cache(maxsize=1)
def backend() -> MediaPipeBackend:
    """The MediaPipe geometry backend (canonical face loaded once)."""
    return MediaPipeBackend()


def reshaped_face(target: FaceRecord, source_shape: np.ndarray, amount: float) -> FaceRecord:
    """The target face with its identity shape moved ``amount`` (0..1) toward the source's:
    source shape, target pose and expression (the swapped geometry of geometry.base), in the
    target's pixels. source_shape: [1404] from ``MediaPipeBackend.fit``."""
    mp = backend()
    fit = mp.fit(None, target)
    swapped = mp.landmarks3d(source_shape, fit.expression, fit)  # [468,3]
    lm = target.landmarks.copy()
    delta = amount * (swapped - lm[:N])
    delta[:, 2] -= delta[:, 2].mean()  # depth is relative; keep the target's offset
    lm[:N] += delta
    for iris, eye in ((topology.RIGHT_IRIS + (topology.RIGHT_IRIS_CENTER,), topology.RIGHT_EYE),
                      (topology.LEFT_IRIS + (topology.LEFT_IRIS_CENTER,), topology.LEFT_EYE)):
        lm[list(iris)] += delta[list(eye)].mean(0)
    return FaceRecord(lm, target.image_size, target.blendshapes, target.blendshape_names,
                      target.transform, dict(target.extras))


def displacement_field(old: np.ndarray, new: np.ndarray, shape: tuple[int, int],
                       sigma: float) -> np.ndarray:
    """A smooth field that carries ``old`` points onto ``new`` ones and fades to zero away
    from them: D(x) = sum_i g_i(x) (new_i - old_i) / (sum_i g_i(x) + 0.5), g_i a Gaussian of
    width ``sigma`` around new_i. old, new: [K,2] pixels; shape: (H, W). Evaluated on a grid of
    about sigma / 3 and interpolated. Returns [H,W,2] float32 (x, y) pixels."""
    h, w = shape
    step = max(1.0, sigma / 3.0)
    gw, gh = max(2, int(np.ceil(w / step)) + 1), max(2, int(np.ceil(h / step)) + 1)
    gx = np.linspace(0, w - 1, gw)
    gy = np.linspace(0, h - 1, gh)
    grid = (np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2) / sigma).astype(np.float32)
    pts = (np.asarray(new, np.float64) / sigma).astype(np.float32)  # [K,2], units of sigma
    move = (np.asarray(new, np.float64) - old).astype(np.float32)  # [K,2] pixels
    # float32 elementwise products, no BLAS: this runs on every video frame, and float64
    # exponentials or matrix products with an inner size of 2 cost several times as much
    dx = grid[:, 0:1] - pts[None, :, 0]
    dy = grid[:, 1:2] - pts[None, :, 1]
    g = np.exp(-0.5 * (dx * dx + dy * dy))  # [G,K]
    field = np.stack([(g * move[:, 0]).sum(1), (g * move[:, 1]).sum(1)], axis=1)
    field /= g.sum(1, keepdims=True) + 0.5
    field = field.reshape(gh, gw, 2).astype(np.float32)
    return cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)

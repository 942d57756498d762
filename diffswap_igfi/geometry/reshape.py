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
    width ``sigma`` (peak 1) around new_i. old, new: [K,2] pixels; shape: (H, W). Returns
    [H,W,2] float32 (x, y) pixels.

    Both sums are computed on a grid of about sigma / 3 by splatting each point bilinearly
    onto it and blurring with the Gaussian, then interpolated to pixels: this runs on every
    video frame, and evaluating K Gaussians at every grid node cost 25 times as much. The
    splat widens each Gaussian by a fraction of a grid step (under 0.1 px of difference on a
    field moving the outline by 6 px).
    """
    h, w = shape
    step = max(1.0, sigma / 3.0)
    gw, gh = max(2, int(np.ceil(w / step)) + 1), max(2, int(np.ceil(h / step)) + 1)
    sx, sy = (w - 1) / (gw - 1), (h - 1) / (gh - 1)  # grid spacing, pixels
    new = np.asarray(new, np.float64)
    values = np.stack([np.ones(len(new)), new[:, 0] - old[:, 0], new[:, 1] - old[:, 1]])
    u, v = new[:, 0] / sx, new[:, 1] / sy  # grid coordinates
    # a margin of three widths, so points near the edge splat fully and blur without loss
    pad = int(np.ceil(3 * sigma / min(sx, sy))) + 1
    sums = np.zeros((3, gh + 2 * pad, gw + 2 * pad), np.float64)
    i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
    fy, fx = v - i0, u - j0
    for di, dj, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                           (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        ii = np.clip(i0 + di + pad, 0, gh + 2 * pad - 1)
        jj = np.clip(j0 + dj + pad, 0, gw + 2 * pad - 1)
        for c in range(3):
            np.add.at(sums[c], (ii, jj), values[c] * weight)
    kx, ky = sigma / sx, sigma / sy
    blurred = [cv2.GaussianBlur(sums[c].astype(np.float32), (2 * pad + 1, 2 * pad + 1), kx,
                                sigmaY=ky, borderType=cv2.BORDER_CONSTANT)[pad:pad + gh,
                                                                             pad:pad + gw]
               * np.float32(2 * np.pi * kx * ky)  # the blur's kernel sums to 1; g peaks at 1
               for c in range(3)]
    field = np.stack(blurred[1:], axis=-1) / (blurred[0][..., None] + 0.5)
    return cv2.resize(field.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)

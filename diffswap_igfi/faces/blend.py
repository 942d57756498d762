"""Colour matching and seamless blending of a face region into a photo.

All functions work on float32 RGB in [0,255] and take a soft alpha in [0,1]; they are plain
functions so the geometric engine, the diffusion paste-back and the tests share them.
"""

from __future__ import annotations

import cv2
import numpy as np


def match_color(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer in Lab: give ``source`` the target's mean and spread.

    source, target: [H,W,3] uint8 RGB of the same size; mask: [H,W] bool, the pixels whose
    statistics count. Returns [H,W,3] float32 RGB in [0,255].
    """
    src = cv2.cvtColor(source, cv2.COLOR_RGB2LAB).astype(np.float32)
    tgt = cv2.cvtColor(target, cv2.COLOR_RGB2LAB).astype(np.float32)
    if mask.sum() < 16:
        return source.astype(np.float32)
    s_mean, s_std = src[mask].mean(0), src[mask].std(0) + 1e-3
    t_mean, t_std = tgt[mask].mean(0), tgt[mask].std(0) + 1e-3
    out = (src - s_mean) * (t_std / s_std) + t_mean
    out = np.clip(out, 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB).astype(np.float32)


def match_shading(source: np.ndarray, target: np.ndarray, mask: np.ndarray,
                  sigma: float) -> np.ndarray:
    """Carry the target's low-frequency lighting onto the source.

    Multiplies the source by blur(target) / blur(source), both blurs normalised inside the mask
    so pixels outside it do not leak in. source, target: [H,W,3] float32 in [0,255]; mask:
    [H,W] bool; sigma: blur in pixels (about half the inter-ocular distance keeps identity
    detail and moves shadows). Returns [H,W,3] float32 in [0,255].
    """
    m = mask.astype(np.float32)
    size = 2 * int(np.ceil(3 * sigma)) + 1
    weight = cv2.GaussianBlur(m, (size, size), sigma)[..., None] + 1e-6
    low_s = cv2.GaussianBlur(source * m[..., None], (size, size), sigma) / weight
    low_t = cv2.GaussianBlur(target * m[..., None], (size, size), sigma) / weight
    ratio = np.clip((low_t + 1.0) / (low_s + 1.0), 0.5, 2.0)
    return np.clip(source * ratio, 0, 255)


def laplacian_blend(foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray,
                    levels: int = 4) -> np.ndarray:
    """Multi-band (Laplacian pyramid) blend: low frequencies mix over wide seams, detail over
    narrow ones.

    foreground, background: [H,W,3] float32; alpha: [H,W] float32 in [0,1] (1 = foreground).
    Returns [H,W,3] float32. The result is NOT confined to alpha's support; callers that must
    keep outside pixels exact composite it again with ``alpha``.
    """
    h, w = alpha.shape
    levels = max(1, min(levels, int(np.log2(max(1, min(h, w) // 8))) + 1))
    gf, gb, ga = [foreground], [background], [alpha]
    for _ in range(levels - 1):
        gf.append(cv2.pyrDown(gf[-1]))
        gb.append(cv2.pyrDown(gb[-1]))
        ga.append(cv2.pyrDown(ga[-1]))
    out = gf[-1] * ga[-1][..., None] + gb[-1] * (1 - ga[-1][..., None])
    for i in range(levels - 2, -1, -1):
        size = (gf[i].shape[1], gf[i].shape[0])
        lf = gf[i] - cv2.pyrUp(gf[i + 1], dstsize=size)
        lb = gb[i] - cv2.pyrUp(gb[i + 1], dstsize=size)
        band = lf * ga[i][..., None] + lb * (1 - ga[i][..., None])
        out = cv2.pyrUp(out, dstsize=size) + band
    return out


def poisson_blend(foreground: np.ndarray, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient-domain (Poisson) clone of the masked foreground into the background.

    foreground, background: [H,W,3] uint8; mask: [H,W] uint8 {0,255}. Returns [H,W,3] float32.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return background.astype(np.float32)
    # seamlessClone needs the mask's bounding box strictly inside the image
    pad = 2
    fg = cv2.copyMakeBorder(foreground, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    bg = cv2.copyMakeBorder(background, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    m = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    x0, x1, y0, y1 = xs.min() + pad, xs.max() + pad, ys.min() + pad, ys.max() + pad
    center = ((x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2)
    out = cv2.seamlessClone(fg, bg, m, center, cv2.NORMAL_CLONE)
    return out[pad:-pad, pad:-pad].astype(np.float32)


def composite(foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha composite that leaves the background bit-identical wherever alpha == 0.

    foreground: [H,W,3] float32 in [0,255]; background: [H,W,3] uint8; alpha: [H,W] float32 in
    [0,1]. Returns [H,W,3] uint8.
    """
    a = alpha[..., None]
    mixed = np.clip(foreground * a + background.astype(np.float32) * (1 - a) + 0.5, 0, 255)
    return np.where(a > 0, mixed.astype(np.uint8), background)

"""Colour matching and seamless blending of a face region into a photo.

All functions work on float32 RGB in [0,255] and take a soft alpha in [0,1]; they are plain
functions so the geometric engine, the diffusion paste-back and the tests share them.
"""

from __future__ import annotations

import cv2
import numpy as np


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

    foreground: [H,W,3] uint8, or float32 in [0,255] (rounded to uint8 first); background:
    [H,W,3] uint8; alpha: [H,W] float32 in [0,1]. Returns [H,W,3] uint8. Runs in OpenCV's
    blendLinear (one pass, no float copies of the image): where alpha is 0 the background's
    weight is exactly 1 and its value comes back unchanged.
    """
    if foreground.dtype != np.uint8:
        foreground = np.clip(foreground + 0.5, 0, 255).astype(np.uint8)
    a = np.ascontiguousarray(alpha, np.float32)
    return cv2.blendLinear(np.ascontiguousarray(foreground), np.ascontiguousarray(background),
                           a, 1.0 - a)

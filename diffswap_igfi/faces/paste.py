"""Paste an edited aligned crop back into the full photo through the inverse affine."""

from __future__ import annotations

import cv2
import numpy as np

from diffswap_igfi.faces.blend import composite


def paste_back(photo: np.ndarray, crop: np.ndarray, inverse: np.ndarray,
               crop_alpha: np.ndarray, *, return_alpha: bool = False):
    """Composite ``crop`` into ``photo`` with a feathered mask.

    photo: [H,W,3] uint8; crop: [S,S,3] uint8 or float32 in [0,255]; inverse: [2,3] crop ->
    photo affine (AlignedFace.inverse); crop_alpha: [S,S] float32 in [0,1], feathered (see
    masks.feather) and zero at the crop border. Only the bounding box of the warped mask is
    touched; pixels where the warped alpha is 0 stay bit-identical. Returns [H,W,3] uint8, and
    with ``return_alpha`` also the warped alpha [H,W] float32 in [0,1].
    """
    h, w = photo.shape[:2]
    s = crop_alpha.shape[0]
    corners = np.array([[0, 0], [s, 0], [0, s], [s, s]], np.float64)
    mapped = corners @ np.asarray(inverse)[:, :2].T + np.asarray(inverse)[:, 2]
    x0, y0 = np.floor(mapped.min(0)).astype(int)
    x1, y1 = np.ceil(mapped.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out = photo.copy()
    full_alpha = np.zeros((h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return (out, full_alpha) if return_alpha else out
    shift = np.asarray(inverse, np.float64).copy()
    shift[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    fg = cv2.warpAffine(crop.astype(np.float32), shift, size, flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(crop_alpha.astype(np.float32), shift, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = np.clip(alpha, 0.0, 1.0)
    out[y0:y1, x0:x1] = composite(fg, photo[y0:y1, x0:x1], alpha)
    full_alpha[y0:y1, x0:x1] = alpha
    return (out, full_alpha) if return_alpha else out

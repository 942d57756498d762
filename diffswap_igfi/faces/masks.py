"""Region masks from landmark polygons, and mask morphology (dilate, erode, feather)."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from diffswap_igfi.faces import topology


def polygon_mask(points: np.ndarray, shape: tuple[int, int], *, convex: bool = False) -> np.ndarray:
    """Fill one polygon. points: [N,2] pixels; shape: (H, W). Returns [H,W] uint8 in {0,255}."""
    mask = np.zeros(shape, np.uint8)
    pts = np.asarray(points, np.float64)
    if convex:
        pts = cv2.convexHull(pts.astype(np.float32))[:, 0, :]
    # 4 fractional bits: sub-pixel vertex positions, so masks do not jitter by a pixel
    fixed = np.round(pts * 16).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 255, lineType=cv2.LINE_8, shift=4)
    return mask


def region_mask(points: np.ndarray, shape: tuple[int, int],
                regions: Iterable[str] = ("face",)) -> np.ndarray:
    """Union of named face regions.

    points: [478,2] landmark pixels (FaceRecord.points). regions: names from
    ``topology.REGIONS`` (face, left_eye, right_eye, left_brow, right_brow, nose, lips,
    mouth_inner). Returns [H,W] uint8 in {0,255}.
    """
    mask = np.zeros(shape, np.uint8)
    for name in regions:
        if name not in topology.REGIONS:
            raise ValueError(f"unknown region {name!r}; choose from {sorted(topology.REGIONS)}")
        idx = list(topology.REGIONS[name])
        convex = name not in topology.CONTOUR_REGIONS
        mask |= polygon_mask(points[idx], shape, convex=convex)
    return mask


def _ellipse(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """[H,W] uint8 mask grown by ``radius`` pixels (elliptic element)."""
    return mask if radius <= 0 else cv2.dilate(mask, _ellipse(radius))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """[H,W] uint8 mask shrunk by ``radius`` pixels (elliptic element)."""
    return mask if radius <= 0 else cv2.erode(mask, _ellipse(radius))


def feather(mask: np.ndarray, radius: int) -> np.ndarray:
    """A soft alpha that stays inside the hard mask.

    mask: [H,W] uint8 {0,255}. The mask is eroded by ``radius`` and blurred with a Gaussian of
    about the same reach, then clipped to the original mask, so alpha > 0 only where the hard
    mask is set. Returns [H,W] float32 in [0,1].
    """
    if radius <= 0:
        return (mask > 0).astype(np.float32)
    inner = erode(mask, radius)
    sigma = radius / 2.0
    size = 2 * int(np.ceil(3 * sigma)) + 1
    alpha = cv2.GaussianBlur(inner.astype(np.float32) / 255.0, (size, size), sigma)
    np.clip(alpha, 0.0, 1.0, out=alpha)  # the blur's float sums overshoot 1 by an ulp or two
    alpha[mask == 0] = 0.0
    return alpha

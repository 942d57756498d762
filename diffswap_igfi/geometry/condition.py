"""The SFI stage's geometry condition: swapped landmarks rendered as an edge map and as heatmap
channels, and the 3D-aware inpainting mask.

All functions take landmarks in the pixels of the image they render into (usually the target's
aligned crop: map photo landmarks with ``faces.align.transform_points(points, crop.affine)``).
Landmarks are MediaPipe mesh indices (468 points); 3DDFA_V2's 68 points render through
``IBUG68_REGIONS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from diffswap_igfi.faces import head, masks, topology

# Heatmap / edge-map channels, in order.
MESH_REGIONS: dict[str, tuple[int, ...]] = {
    "face": topology.FACE_OVAL,
    "left_brow": topology.LEFT_EYEBROW,
    "right_brow": topology.RIGHT_EYEBROW,
    "left_eye": topology.LEFT_EYE,
    "right_eye": topology.RIGHT_EYE,
    "nose": topology.NOSE,
    "lips": topology.LIPS_OUTER + topology.LIPS_INNER,
}
# The same channels on the iBUG 68-point layout (3DDFA_V2, dlib); "left" is the subject's.
IBUG68_REGIONS: dict[str, tuple[int, ...]] = {
    "face": tuple(range(0, 17)),
    "left_brow": tuple(range(22, 27)),
    "right_brow": tuple(range(17, 22)),
    "left_eye": tuple(range(42, 48)),
    "right_eye": tuple(range(36, 42)),
    "nose": tuple(range(27, 36)),
    "lips": tuple(range(48, 68)),
}
_CLOSED = {"left_eye", "right_eye"}


def regions_for(num_points: int) -> Mapping[str, tuple[int, ...]]:
    """The channel layout for a landmark set of this size (468/478 mesh or 68 iBUG)."""
    if num_points >= topology.NUM_MESH_POINTS:
        return MESH_REGIONS
    if num_points == 68:
        return IBUG68_REGIONS
    raise ValueError(f"no region layout for {num_points} landmarks (need 468, 478 or 68)")


def landmark_heatmaps(points: np.ndarray, image_size: int, out_size: int,
                      sigma: float = 1.0) -> np.ndarray:
    """Gaussian landmark heatmaps, one channel per region, at latent resolution.

    points: [K,2] pixels in an ``image_size`` square; out_size: heatmap side (e.g. 64 for a
    512 crop and an 8x VAE); sigma: in heatmap pixels. Returns [C,out,out] float32 in [0,1],
    each channel the max over its region's Gaussians (C = len(MESH_REGIONS) = 7).
    """
    layout = regions_for(len(points))
    scale = out_size / image_size
    grid = (np.arange(out_size, dtype=np.float32) + 0.5)
    maps = np.zeros((len(layout), out_size, out_size), np.float32)
    for c, idx in enumerate(layout.values()):
        p = np.asarray(points, np.float32)[list(idx)] * scale  # [N,2] heatmap pixels
        gx = np.exp(-0.5 * ((grid[None, :] - p[:, 0:1]) / sigma) ** 2)  # [N,W]
        gy = np.exp(-0.5 * ((grid[None, :] - p[:, 1:2]) / sigma) ** 2)  # [N,H]
        maps[c] = np.max(gy[:, :, None] * gx[:, None, :], axis=0)
    return maps


def _outlines(points: np.ndarray, name: str, idx: Sequence[int]) -> list[tuple[np.ndarray, bool]]:
    """(polyline [N,2] float, closed?) pieces that draw one region."""
    pts = np.asarray(points, np.float64)
    if len(points) == 68:  # iBUG: index runs are ordered; only the eyes and lips close
        if name == "lips":
            return [(pts[48:60], True), (pts[60:68], True)]
        return [(pts[list(idx)], name in _CLOSED)]
    if name == "lips":  # the mesh's lip contours are ordered cycles
        return [(pts[list(topology.LIPS_OUTER)], True), (pts[list(topology.LIPS_INNER)], True)]
    if name in ("face", "left_eye", "right_eye"):
        return [(pts[list(idx)], True)]
    # brows and nose are unordered index sets on the mesh: draw their hull
    return [(cv2.convexHull(pts[list(idx)].astype(np.float32))[:, 0, :].astype(np.float64),
             True)]


def landmark_edge_map(points: np.ndarray, size: int, thickness: int = 1) -> np.ndarray:
    """The face drawn as region outlines. points: [K,2] pixels. Returns [C,size,size] uint8
    {0,255}, one channel per region (max over channels for a single edge image)."""
    layout = regions_for(len(points))
    out = np.zeros((len(layout), size, size), np.uint8)
    for c, (name, idx) in enumerate(layout.items()):
        for line, closed in _outlines(points, name, idx):
            fixed = np.round(line * 16).astype(np.int32)
            cv2.polylines(out[c], [fixed], closed, 255, thickness, cv2.LINE_8, shift=4)
    return out


def aware_mask(target_points: np.ndarray, swapped_points: np.ndarray, shape: tuple[int, int],
               *, dilate: int = 8, feather: int = 6,
               occlusion: np.ndarray | None = None, region: str = "face",
               image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 3D-aware inpainting mask: hull of the target face U hull of the swapped face.

    target_points, swapped_points: [K,2] pixels (mesh or 68 points); shape: (H, W); dilate,
    feather: pixels; occlusion: [H,W] bool pixels to keep from the target (hands, glasses,
    hair from a parser), subtracted after dilation: the hook for occluder masks.
    region "head" (mesh points only): the target's head (face, hair, ears; ``faces.head``,
    refined on ``image`` [H,W,3] uint8, the target crop, when given) U the swapped face's
    geometric head prior, instead of the two face hulls.
    Returns (hard [H,W] uint8 {0,255}, soft [H,W] float32 in [0,1], zero outside hard).
    """
    if region == "head":
        hard = head.head_mask(target_points, shape, image)
        hard |= head.head_prior(swapped_points, shape)
    elif region == "face":
        face_idx = list(regions_for(len(target_points))["face"])
        hard = masks.polygon_mask(np.asarray(target_points)[face_idx], shape, convex=True)
        hard |= masks.polygon_mask(np.asarray(swapped_points)[face_idx], shape, convex=True)
    else:
        raise ValueError(f"unknown region {region!r}: choose from {', '.join(head.REGIONS)}")
    hard = masks.dilate(hard, dilate)
    if occlusion is not None:
        if occlusion.shape != tuple(shape):
            raise ValueError(f"occlusion mask is {occlusion.shape}, expected {tuple(shape)}")
        hard[occlusion] = 0
    return hard, masks.feather(hard, feather)


def debug_panel(crop: np.ndarray, target_points: np.ndarray, swapped_points: np.ndarray,
                soft_mask: np.ndarray, heatmaps: np.ndarray,
                labels: Sequence[str] = ("target landmarks", "swapped geometry",
                                         "3D-aware mask", "heatmaps")) -> np.ndarray:
    """A side-by-side picture for humans: crop + target landmarks (green), crop + swapped
    projected landmarks (red) over the target's (green), mask overlay, heatmap channels summed.
    crop: [S,S,3] uint8. Returns [S+24, 4S, 3] uint8."""
    s = crop.shape[0]
    a = crop.copy()
    for x, y in np.asarray(target_points):
        cv2.circle(a, (int(round(x)), int(round(y))), 1, (0, 255, 0), -1, cv2.LINE_AA)
    b = (crop * 0.6).astype(np.uint8)
    edges_t = landmark_edge_map(target_points, s).max(0)
    edges_s = landmark_edge_map(swapped_points, s).max(0)
    b[edges_t > 0] = (0, 255, 0)
    b[edges_s > 0] = (255, 60, 60)
    c = (crop * (1 - 0.5 * soft_mask[..., None]) + np.array([255, 0, 255]) * 0.5
         * soft_mask[..., None]).astype(np.uint8)
    heat = cv2.resize(heatmaps.max(0), (s, s), interpolation=cv2.INTER_LINEAR)
    d = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    panel = np.concatenate([a, b, c, d], axis=1)
    header = np.full((24, panel.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(labels):
        cv2.putText(header, text, (i * s + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)

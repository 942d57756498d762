"""The 478-point face mesh as a surface: rasterising its triangles, interpolating per-vertex values
over them, normals, per-triangle visibility and the left/right mirror of the mesh.

Coordinates: landmarks as in ``FaceRecord.landmarks`` ([N,3] pixels; z relative depth in x units,
growing away from the camera). Triangles: [T,3] vertex indices, ordered counter-clockwise seen
from the front in model space (x right, y up), as MediaPipe's canonical mesh lists them; in image
space (y down) a front-facing triangle is therefore clockwise.
"""

from __future__ import annotations

import cv2
import numpy as np


FACING_FROM, FACING_TO = 0.05, 0.35  # cosine to the view at which a triangle starts to count,
                                    # and fully counts


def raster_index(points: np.ndarray, triangles: np.ndarray, shape: tuple[int, int],
                 depth: np.ndarray | None = None) -> np.ndarray:
    """Which triangle covers each pixel.

    points: [N,2] pixels; triangles: [T,3]; shape: (H, W); depth: [N] (larger = farther) or
    None. With depth, triangles are painted far to near so the nearest surface wins (a turned
    head's nose hides the cheek behind it). Returns [H,W] int32, -1 where no triangle covers.
    """
    index = np.zeros(shape, np.int32)  # 0 = none, k = triangle k-1 while painting
    fixed = np.round(np.asarray(points, np.float64)[triangles] * 16).astype(np.int32)  # [T,3,2]
    order = np.arange(len(triangles))
    if depth is not None:
        order = np.argsort(-np.asarray(depth, np.float64)[triangles].mean(1), kind="stable")
    for k in order:
        cv2.fillConvexPoly(index, fixed[k], int(k) + 1, lineType=cv2.LINE_8, shift=4)
    return index - 1


def triangle_affines(points: np.ndarray, triangles: np.ndarray, values: np.ndarray
                     ) -> np.ndarray:
    """Per-triangle affine maps from pixel (x, y, 1) to the linear interpolation of ``values``.

    points: [N,2] pixels; values: [N,C]. Returns [T,3,C] float64 (zeros for degenerate
    triangles), so that value(x, y) = [x, y, 1] @ A[t].
    """
    dst = np.asarray(points, np.float64)[triangles]  # [T,3,2]
    dst_h = np.concatenate([dst, np.ones((len(triangles), 3, 1))], axis=2)  # [T,3,3]
    vals = np.asarray(values, np.float64)[triangles]  # [T,3,C]
    ok = np.abs(np.linalg.det(dst_h)) > 1e-9
    out = np.zeros((len(triangles), 3, vals.shape[2]))
    out[ok] = np.linalg.solve(dst_h[ok], vals[ok])
    return out


def interpolate(points: np.ndarray, triangles: np.ndarray, values: np.ndarray,
                index: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Per-vertex values interpolated linearly over the triangle that covers each pixel.

    points: [N,2] pixels in the frame ``index`` lives in, shifted by ``offset`` (pixel (0,0) of
    ``index`` is at ``offset``); values: [N,C]; index: [H,W] from ``raster_index`` (-1 = none).
    Returns [H,W,C] float32; uncovered pixels are 0.
    """
    affines = triangle_affines(np.asarray(points, np.float64) - offset, triangles,
                               values).astype(np.float32)
    h, w = index.shape
    # only the covered pixels (often a small part of ``index``: an eye's opening) are
    # evaluated, each with the same float32 operations as a whole-frame evaluation would do
    ys, xs = np.nonzero(index >= 0)
    m = affines[index[ys, xs]]  # [P,3,C]
    out = np.zeros((h, w, affines.shape[2]), np.float32)
    out[ys, xs] = (xs.astype(np.float32)[:, None] * m[:, 0]
                   + ys.astype(np.float32)[:, None] * m[:, 1] + m[:, 2])
    return out


def extend_index(index: np.ndarray) -> np.ndarray:
    """Give uncovered pixels (-1) the triangle of the nearest covered pixel."""
    covered = index >= 0
    if not covered.any() or covered.all():
        return index
    _, labels = cv2.distanceTransformWithLabels((~covered).astype(np.uint8), cv2.DIST_L2, 3,
                                                labelType=cv2.DIST_LABEL_PIXEL)
    nearest = np.zeros(labels.max() + 1, np.int32)
    nearest[labels[covered]] = index[covered]
    return nearest[labels]


def camera_space(landmarks: np.ndarray) -> np.ndarray:
    """[N,3] FaceRecord landmarks -> x right, y up, z towards the camera (same units)."""
    return np.asarray(landmarks, np.float64) * np.array([1.0, -1.0, -1.0])


def triangle_normals(landmarks: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unnormalised outward normals [T,3] in camera space (length = twice the area)."""
    cam = camera_space(landmarks)
    a, b, c = cam[triangles[:, 0]], cam[triangles[:, 1]], cam[triangles[:, 2]]
    return np.cross(b - a, c - a)


def vertex_normals(landmarks: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals [N,3] in camera space (z > 0 faces the camera)."""
    tn = triangle_normals(landmarks, triangles)
    out = np.zeros((len(landmarks), 3))
    for j in range(3):
        np.add.at(out, triangles[:, j], tn)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def triangle_visibility(landmarks: np.ndarray, triangles: np.ndarray, *,
                        raster_side: int = 192) -> np.ndarray:
    """How well each triangle's texture can be seen in the photo, [T] float in [0,1].

    Two factors: facing, the cosine between its normal and the view direction ramped from
    0 at FACING_FROM to 1 at FACING_TO (grazing triangles are smeared; back-facing ones show
    something else), times the share of its area not hidden by nearer triangles, measured on a
    ``raster_side`` px depth-ordered rasterisation (a turned head's nose hides part of a cheek).
    """
    lm = np.asarray(landmarks, np.float64)
    n = triangle_normals(lm, triangles)
    cos = n[:, 2] / np.maximum(np.linalg.norm(n, axis=1), 1e-12)
    facing = np.clip((cos - FACING_FROM) / (FACING_TO - FACING_FROM), 0.0, 1.0)
    used = np.unique(triangles)
    lo, hi = lm[used, :2].min(0), lm[used, :2].max(0)
    scale = raster_side / max(float((hi - lo).max()), 1e-6)
    pts = (lm[:, :2] - lo) * scale + 2
    side = raster_side + 5
    index = raster_index(pts, triangles, (side, side), depth=lm[:, 2])
    counts = np.bincount(index[index >= 0], minlength=len(triangles))[: len(triangles)]
    area = 0.5 * np.abs(n[:, 2]) * scale**2  # projected area in raster pixels
    shown = np.where(area > 2.0, np.clip(counts / np.maximum(area, 1e-6) / 0.7, 0.0, 1.0), 1.0)
    return facing * shown


def vertex_mean(values: np.ndarray, triangles: np.ndarray, num_vertices: int) -> np.ndarray:
    """Per-triangle values [T] averaged onto vertices, [N] (vertices in no triangle: 0)."""
    total = np.zeros(num_vertices)
    count = np.zeros(num_vertices)
    for j in range(3):
        np.add.at(total, triangles[:, j], values)
        np.add.at(count, triangles[:, j], 1.0)
    return total / np.maximum(count, 1.0)


def mirror_indices(vertices: np.ndarray) -> np.ndarray:
    """The left/right mirror of each vertex of a symmetric model mesh.

    vertices: [N,3] model space with x across the face (MediaPipe's canonical face). Returns
    [N] int: the vertex nearest to (-x, y, z) of each (an involution on a symmetric mesh).
    """
    v = np.asarray(vertices, np.float64)
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    dist = np.linalg.norm(v[:, None, :] - mirrored[None, :, :], axis=2)
    return dist.argmin(axis=1)

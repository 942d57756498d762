"""The geometric swap engine: the embedded default that runs anywhere, with no trained weights.

Classical landmark-warp swap: the source face is warped onto the target's 478 landmarks by a
piecewise-affine map over a Delaunay triangulation, its colour and low-frequency lighting are
matched to the target, and it is blended in (Laplacian pyramid or Poisson) under a feathered
mask of the target's face oval. Pixels where that mask is zero are the target's, bit for bit.
It is also the baseline the diffusion stage is measured against and its optional warm start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.faces import masks, topology
from diffswap_igfi.faces.blend import (composite, laplacian_blend, match_color, match_shading,
                                       poisson_blend)
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC

BLENDS = ("laplacian", "poisson", "alpha")


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles of the mesh vertices. points: [478,2]. Returns [T,3] int indices."""
    from scipy.spatial import Delaunay  # scipy.spatial is slow to import; only swaps need it

    return Delaunay(points[: topology.NUM_MESH_POINTS].astype(np.float64)).simplices


def piecewise_affine_maps(src_points: np.ndarray, dst_points: np.ndarray, triangles: np.ndarray,
                          roi: tuple[int, int, int, int], *, extend: bool = True
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel sampling maps that carry each destination triangle onto its source triangle.

    src_points, dst_points: [N,2] pixels in their photos; triangles: [T,3] indices; roi:
    (x0, y0, x1, y1) of the destination region; extend: give pixels outside every triangle the
    map of the nearest one. Returns (map_xy [h,w,2] float32 source pixel
    for every ROI pixel, covered [h,w] bool: pixels inside some triangle, before extension).
    """
    x0, y0, x1, y1 = roi
    h, w = y1 - y0, x1 - x0
    dst = dst_points[triangles].astype(np.float64) - (x0, y0)  # [T,3,2]
    src = src_points[triangles].astype(np.float64)
    ones = np.ones((len(triangles), 3, 1))
    dst_h = np.concatenate([dst, ones], axis=2)  # [T,3,3]
    # Solve dst_h @ M = src for each triangle's 3x2 affine M; skip degenerate triangles.
    det = np.linalg.det(dst_h)
    ok = np.abs(det) > 1e-9
    affines = np.zeros((len(triangles), 3, 2))
    affines[ok] = np.linalg.solve(dst_h[ok], src[ok])
    index = np.zeros((h, w), np.int32)  # 0 = no triangle; k = triangle k-1
    fixed = np.round(dst * 16).astype(np.int32)
    for k in np.nonzero(ok)[0]:
        cv2.fillConvexPoly(index, fixed[k], int(k) + 1, lineType=cv2.LINE_8, shift=4)
    covered = index > 0
    if extend and covered.any() and not covered.all():
        # Pixels outside the mesh take the affine of the nearest triangle, so a mask may reach
        # a little past the outermost landmarks without sampling garbage.
        _, labels = cv2.distanceTransformWithLabels((~covered).astype(np.uint8), cv2.DIST_L2, 3,
                                                    labelType=cv2.DIST_LABEL_PIXEL)
        nearest = np.zeros(labels.max() + 1, np.int32)
        nearest[labels[covered]] = index[covered]
        index = nearest[labels]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    m = affines[np.maximum(index - 1, 0)]  # [h,w,3,2]
    map_x = xs * m[..., 0, 0] + ys * m[..., 1, 0] + m[..., 2, 0]
    map_y = xs * m[..., 0, 1] + ys * m[..., 1, 1] + m[..., 2, 1]
    return np.stack([map_x, map_y], axis=-1).astype(np.float32), covered


def face_roi(face: FaceRecord, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) around a face's mesh with ``margin`` pixels, inside the photo."""
    x0, y0, x1, y1 = face.box
    h, w = shape
    return (int(max(0, np.floor(x0 - margin))), int(max(0, np.floor(y0 - margin))),
            int(min(w, np.ceil(x1 + margin))), int(min(h, np.ceil(y1 + margin))))


def swap_mask(face: FaceRecord, roi: tuple[int, int, int, int], *, grow: int = 0,
              keep_mouth_interior: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hard swap mask of the target face inside ``roi``: the face oval grown by ``grow`` pixels,
    less the open mouth.

    The target's own mouth interior (teeth, tongue) is kept: a closed source mouth warped onto
    an open one would smear lips over it. Returns (mask, oval), both [h,w] uint8 {0,255} in
    ROI coordinates; ``oval`` is the ungrown face oval.
    """
    x0, y0, x1, y1 = roi
    pts = face.points - (x0, y0)
    oval = masks.region_mask(pts, (y1 - y0, x1 - x0), ("face",))
    mask = masks.dilate(oval, grow)
    if keep_mouth_interior:
        inner = masks.region_mask(pts, mask.shape, ("mouth_inner",))
        mask[inner > 0] = 0
        oval = np.where(inner > 0, 0, oval).astype(np.uint8)
    return mask, oval


def mouth_opening(face: FaceRecord) -> float:
    """Area of the inner-lip polygon over the squared inter-ocular distance (0 = closed)."""
    pts = face.points[list(topology.LIPS_INNER)].astype(np.float64)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return float(area / max(face.interocular, 1e-6) ** 2)


OPEN_MOUTH = 0.02  # mouth_opening above this shows teeth or tongue


@dataclass
class GeometricSwapper:
    """Swaps one source face onto target faces by landmark warping and blending.

    blend: ``laplacian`` (multi-band, default), ``poisson`` (gradient domain) or ``alpha``.
    feather: feather reach as a fraction of the inter-ocular distance.
    grow: how far the mask reaches past the face oval, as a fraction of the inter-ocular
        distance (the feather then ends at the grown edge; the oval itself is fully swapped).
    shading_sigma: lighting-transfer blur as a fraction of the inter-ocular distance (0 = off).
    keep_mouth_interior: ``auto`` keeps the target's teeth and tongue when the target's mouth is
        open and the source's is closed (warping closed lips over an open mouth smears them);
        ``always`` or ``never``.
    """

    name = "geometric"
    digital_source_type = COMPOSITE_SYNTHETIC  # a composite of real photos, no trained generator
    blend: str = "laplacian"
    feather: float = 0.25
    grow: float = 0.4
    shading_sigma: float = 1.0
    keep_mouth_interior: str = "auto"
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep_mouth_interior not in ("auto", "always", "never"):
            raise ValueError("keep_mouth_interior must be auto, always or never")
        if self.blend not in BLENDS:
            raise ValueError(f"unknown blend {self.blend!r}; choose from {BLENDS}")

    def swap_one(self, target: np.ndarray, target_face: FaceRecord, source: np.ndarray,
                 source_face: FaceRecord) -> tuple[np.ndarray, np.ndarray]:
        """Swap the source identity onto one target face.

        target: [H,W,3] uint8; source: [h,w,3] uint8; faces in their photos' pixels.
        Returns (image [H,W,3] uint8, alpha [H,W] float32 in [0,1]); image equals target
        exactly wherever alpha == 0.
        """
        iod = target_face.interocular
        radius = max(1, int(round(self.feather * iod)))
        grow = int(round(self.grow * iod))
        # room for the grown mask and the pyramid's reach, so alpha is 0 on the ROI border
        roi = face_roi(target_face, target.shape[:2], grow + 2 * radius + 8)
        x0, y0, x1, y1 = roi
        triangles = triangulate(target_face.points)
        maps, covered = piecewise_affine_maps(source_face.points, target_face.points, triangles,
                                              roi)
        warped = cv2.remap(source, maps, None, interpolation=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        keep_mouth = self.keep_mouth_interior == "always" or (
            self.keep_mouth_interior == "auto" and mouth_opening(target_face) > OPEN_MOUTH
            and mouth_opening(source_face) <= OPEN_MOUTH)
        hard, oval = swap_mask(target_face, roi, grow=grow, keep_mouth_interior=keep_mouth)
        alpha = masks.feather(hard, radius)
        patch = target[y0:y1, x0:x1]
        # colour statistics from the face itself, not the hair or background the grown mask
        # reaches
        stats_region = masks.erode(oval, radius // 2) > 0
        if stats_region.sum() < 64:
            stats_region = oval > 0
        colored = match_color(warped, patch, stats_region)
        if self.shading_sigma > 0:
            sigma = max(1.0, self.shading_sigma * iod)
            colored = match_shading(colored, patch.astype(np.float32), stats_region, sigma)
        if self.blend == "laplacian":
            blended = laplacian_blend(colored, patch.astype(np.float32), alpha)
        elif self.blend == "poisson":
            fg = np.clip(colored + 0.5, 0, 255).astype(np.uint8)
            blended = poisson_blend(fg, patch, masks.erode(hard, max(1, radius // 2)))
        else:
            blended = colored
        out = target.copy()
        out[y0:y1, x0:x1] = composite(blended, patch, alpha)
        full_alpha = np.zeros(target.shape[:2], np.float32)
        full_alpha[y0:y1, x0:x1] = alpha
        return out, full_alpha

    def swap_pairs(self, target: np.ndarray, pairs: Sequence[tuple[FaceRecord, Source]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The engine contract (``engines.base.SwapEngine``): each target face with its own
        source. Returns (image, union alpha) as swap_one."""
        image = target
        alpha = np.zeros(target.shape[:2], np.float32)
        for face, source in pairs:
            image, a = self.swap_one(image, face, source.image.rgb, source.face)
            alpha = np.maximum(alpha, a)
        return image, alpha

    def swap(self, target: np.ndarray, target_faces: list[FaceRecord], source: np.ndarray,
             source_face: FaceRecord) -> tuple[np.ndarray, np.ndarray]:
        """Swap onto several target faces in turn. Returns (image, union alpha) as swap_one."""
        image = target
        alpha = np.zeros(target.shape[:2], np.float32)
        for face in target_faces:
            image, a = self.swap_one(image, face, source, source_face)
            alpha = np.maximum(alpha, a)
        return image, alpha

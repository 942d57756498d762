"""Measures and maps of the eyes and mouth on the 478-point mesh: how open they are, and a warp
that moves one face's irises onto another's (the same eyes, another gaze)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay

from diffswap_igfi.faces import masks, mesh, topology
from diffswap_igfi.faces.record import FaceRecord


def mouth_opening(face: FaceRecord) -> float:
    """Area of the inner-lip polygon over the squared inter-ocular distance (0 = closed)."""
    pts = face.points[list(topology.LIPS_INNER)].astype(np.float64)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    return float(area / max(face.interocular, 1e-6) ** 2)


OPEN_MOUTH = 0.02  # mouth_opening above this shows teeth or tongue


def eye_opening(face: FaceRecord) -> float:
    """Mean lid gap over eye width of the two eyes (about 0.3 open, under 0.1 closed)."""
    p = face.points
    gaps = [np.linalg.norm(p[159] - p[145]) / max(np.linalg.norm(p[33] - p[133]), 1e-6),
            np.linalg.norm(p[386] - p[374]) / max(np.linalg.norm(p[263] - p[362]), 1e-6)]
    return float(np.mean(gaps))


EYES = ((topology.RIGHT_EYE, topology.RIGHT_IRIS + (topology.RIGHT_IRIS_CENTER,)),
        (topology.LEFT_EYE, topology.LEFT_IRIS + (topology.LEFT_IRIS_CENTER,)))


def align_irises(sample_xy: np.ndarray, target: FaceRecord, source: FaceRecord) -> None:
    """Re-map each eye opening so the source's iris lands on the target's: the eye is then
    the source's, its gaze the target's. sample_xy: [h,w,2] float32 source pixel per target
    pixel (changed in place inside the eye openings); faces in the same frames as it."""
    h, w = sample_xy.shape[:2]
    for contour, iris in EYES:
        idx = list(contour) + list(iris)
        pts = target.points[idx].astype(np.float64)
        if np.ptp(pts[:, 0]) < 2 or np.ptp(pts[:, 1]) < 1:
            continue
        try:
            tris = Delaunay(pts).simplices
        except Exception:  # degenerate (a closed eye): keep the mesh's own map
            continue
        index = mesh.raster_index(pts, tris, (h, w))
        opening = masks.polygon_mask(target.points[list(contour)], (h, w)) > 0
        inside = (index >= 0) & opening
        if inside.any():
            xy = mesh.interpolate(pts, tris, source.points[idx].astype(np.float64), index)
            sample_xy[inside] = xy[inside]

"""Alignment of a face to a canonical crop by a five-point similarity transform, and back.

Templates are the standard ones: insightface's ArcFace 112x112 points and the FFHQ 512x512
points used by face-restoration models, scaled to any crop size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Five points (eyes, nose tip, mouth corners; image-left first) in a 112x112 ArcFace crop.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
# The same points in a 512x512 FFHQ-style crop (more context: forehead, chin, some hair).
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], np.float64)
TEMPLATES = {"arcface": (ARCFACE_112, 112), "ffhq": (FFHQ_512, 512)}


def template_points(size: int, template: str = "arcface") -> np.ndarray:
    """[5,2] float64 template keypoints for a ``size`` x ``size`` crop."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose {sorted(TEMPLATES)}")
    points, native = TEMPLATES[template]
    return points * (size / native)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    src, dst: [N,2] point sets, N >= 2. Returns [2,3] float64 (Umeyama's closed form, no
    reflection).
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * np.diag(sign)).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """Inverse of a [2,3] affine transform."""
    return cv2.invertAffineTransform(np.asarray(affine, np.float64))


def transform_points(points: np.ndarray, affine: np.ndarray, dtype=np.float32) -> np.ndarray:
    """[K,2] pixels through a [2,3] affine (e.g. photo -> aligned crop), computed in float64,
    returned as ``dtype``."""
    a = np.asarray(affine, np.float64)
    return (np.asarray(points, np.float64) @ a[:, :2].T + a[:, 2]).astype(dtype, copy=False)


@dataclass
class AlignedFace:
    """A canonical crop of one face.

    crop: [S,S,3] uint8. affine: [2,3] photo pixels -> crop pixels. inverse: crop -> photo.
    """

    crop: np.ndarray
    affine: np.ndarray
    inverse: np.ndarray

    @property
    def size(self) -> int:
        return self.crop.shape[0]


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 256, template: str = "arcface",
               *, border: int = cv2.BORDER_REFLECT101) -> AlignedFace:
    """Warp a face to the canonical crop.

    image: [H,W,3] uint8; kps: [5,2] keypoints in image pixels (FaceRecord.kps).
    """
    affine = similarity_transform(kps, template_points(size, template))
    crop = cv2.warpAffine(image, affine, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=border)
    return AlignedFace(crop, affine, invert_affine(affine))

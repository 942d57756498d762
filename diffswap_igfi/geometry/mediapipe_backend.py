"""The offline default geometry backend, on MediaPipe's 478-landmark mesh.

Fitting: the mesh (x, y in pixels, z relative depth in x units) is aligned to MediaPipe's
canonical face by a 3D similarity (Umeyama); that gives rotation, scale and translation, and the
face's own 3D shape in canonical space, C. What is left, D = C - canonical, is the face's
deformation from the mean face.

What it can and cannot separate. MediaPipe's mesh carries identity and expression together and
ships no basis to tell them apart, so this backend splits D *spatially*: vertices near the lips
and eyelids (a Gaussian fall-off of 0.8 cm around them in canonical space) count as expression,
the rest (face outline, nose, brow ridge, cheeks, eye spacing) as identity shape. Consequences:
a smile's raised cheeks stay with the source, and the source's lip and eyelid shapes are lost
to the target's; a jaw dropped by an open mouth is read as identity. The 52 blendshapes on the
FaceRecord remain the better expression *descriptor*; they are not a geometric basis. The
3DDFA_V2 backend separates the two properly with its BFM basis, when its files are available.
"""

from __future__ import annotations

import numpy as np

from diffswap_igfi.faces import topology
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.geometry.base import GeometryBackend, GeometryFit, project_weak_perspective
from diffswap_igfi.geometry.canonical import canonical_face

EXPRESSION_ANCHORS = (topology.LIPS_OUTER + topology.LIPS_INNER + topology.LEFT_EYE
                      + topology.RIGHT_EYE)
EXPRESSION_FALLOFF_CM = 0.8


def similarity_3d(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Least-squares (R, s, t) with dst ≈ s * R @ src + t. src, dst: [N,3]. R proper rotation."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rot = u @ sign @ vt
    scale = float((sig * np.diag(sign)).sum() / ((a**2).sum() / len(src)))
    return rot, scale, mu_d - scale * rot @ mu_s


def image_to_camera(landmarks: np.ndarray) -> np.ndarray:
    """MediaPipe landmarks [K,3] (x right, y down, z away from camera, pixels) -> x right, y up,
    z towards the camera."""
    return np.asarray(landmarks, np.float64) * np.array([1.0, -1.0, -1.0])


class MediaPipeBackend(GeometryBackend):
    """Geometry from MediaPipe's mesh: S = E = 1404 (468 vertices x 3, in centimetres)."""

    name = "mediapipe"
    num_landmarks = topology.NUM_MESH_POINTS

    def __init__(self, model_path=None) -> None:
        self.mean, _ = canonical_face(model_path)
        self.mean = self.mean.astype(np.float64)
        anchors = self.mean[list(EXPRESSION_ANCHORS)]
        dist = np.linalg.norm(self.mean[:, None, :] - anchors[None, :, :], axis=2).min(axis=1)
        #: [468] weight of each vertex's deformation that counts as expression
        self.expression_weight = np.exp(-0.5 * (dist / EXPRESSION_FALLOFF_CM) ** 2)

    def fit(self, rgb: np.ndarray | None, face: FaceRecord) -> GeometryFit:
        """Fit from the FaceRecord's mesh alone (``rgb`` is not needed and may be None)."""
        return self.fit_points(face.landmarks[: self.num_landmarks])

    def fit_points(self, landmarks: np.ndarray) -> GeometryFit:
        """Fit [468,3] MediaPipe-convention landmarks (pixels, z away from the camera)."""
        cam = image_to_camera(landmarks)
        rot, scale, t3 = similarity_3d(self.mean, cam)
        canonical = (cam - t3) @ rot / scale  # R^T (p - t) / s, row-wise
        deform = canonical - self.mean
        w = self.expression_weight[:, None]
        shape = ((1 - w) * deform).ravel().astype(np.float32)
        expression = (w * deform).ravel().astype(np.float32)
        translation = np.array([t3[0], -t3[1]])
        landmarks2d = project_weak_perspective(self.model_points(shape, expression), rot, scale,
                                               translation)
        return GeometryFit(self.name, shape, expression, rot, scale, translation, landmarks2d)

    def model_points(self, shape: np.ndarray, expression: np.ndarray) -> np.ndarray:
        return self.mean + (np.asarray(shape, np.float64) + np.asarray(expression, np.float64)
                            ).reshape(-1, 3)

    def landmarks3d(self, shape: np.ndarray, expression: np.ndarray,
                    pose: GeometryFit) -> np.ndarray:
        """Like ``project`` but [K,3] in MediaPipe's convention (pixels; z away from camera,
        relative to the face's origin), so the result can be fitted again."""
        cam = self.model_points(shape, expression) @ np.asarray(pose.rotation).T * pose.scale
        xy = cam[:, :2] * np.array([1.0, -1.0]) + pose.translation
        return np.concatenate([xy, -cam[:, 2:3]], axis=1).astype(np.float32)

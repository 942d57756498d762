"""The 3D morphable-model interface every geometry backend implements.

A backend explains a detected face as ``model(shape, expression)`` seen under a weak-perspective
pose, and can re-project any (shape, expression) under any fitted pose. Swapped geometry, the
3D-aware condition of the SFI stage, is the source's shape with the target's expression and pose.

Conventions (all backends): model space is x right, y up, z towards the camera; a pose maps a
model point X to photo pixels by ``p = scale * (R @ X)[:2] * (1, -1) + translation`` (y flipped
because image rows grow downwards).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace

import numpy as np

from diffswap_igfi.faces.record import FaceRecord, rotation_to_euler


@dataclass
class GeometryFit:
    """One face explained by a backend's model.

    shape: [S] float32 identity parameters; expression: [E] float32 expression parameters;
    rotation: [3,3] float64 orthonormal, model -> camera; scale: model units -> pixels;
    translation: [2] float64 pixels; landmarks: [K,2] float32, the fitted model's landmarks
    projected into the photo (the fit's reconstruction, not the detector's points).
    """

    backend: str
    shape: np.ndarray
    expression: np.ndarray
    rotation: np.ndarray
    scale: float
    translation: np.ndarray
    landmarks: np.ndarray

    @property
    def pose(self) -> tuple[float, float, float]:
        """(yaw, pitch, roll) in degrees (see faces.record.rotation_to_euler)."""
        return rotation_to_euler(self.rotation)

    def with_pose_of(self, other: GeometryFit) -> GeometryFit:
        """This fit's shape and expression under ``other``'s pose (landmarks not recomputed)."""
        return replace(self, rotation=other.rotation, scale=other.scale,
                       translation=other.translation)


def project_weak_perspective(points3d: np.ndarray, rotation: np.ndarray, scale: float,
                             translation: np.ndarray) -> np.ndarray:
    """Model points [K,3] -> photo pixels [K,2] float32 under the conventions above."""
    cam = np.asarray(points3d, np.float64) @ np.asarray(rotation, np.float64).T
    xy = scale * cam[:, :2] * np.array([1.0, -1.0]) + np.asarray(translation, np.float64)
    return xy.astype(np.float32)


class GeometryBackend(abc.ABC):
    """fit(face) -> GeometryFit; project(shape, expression, pose) -> 2D landmarks."""

    name: str = "backend"
    num_landmarks: int = 0

    @abc.abstractmethod
    def fit(self, rgb: np.ndarray, face: FaceRecord) -> GeometryFit:
        """Fit the model to one detected face. rgb: [H,W,3] uint8 photo the face is in."""

    @abc.abstractmethod
    def model_points(self, shape: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """The model's landmarks [K,3] in model space for given parameters."""

    def project(self, shape: np.ndarray, expression: np.ndarray, pose: GeometryFit) -> np.ndarray:
        """Landmarks [K,2] float32 of (shape, expression) under ``pose``'s rotation, scale and
        translation, in the pixels of the photo ``pose`` was fitted in."""
        return project_weak_perspective(self.model_points(shape, expression), pose.rotation,
                                        pose.scale, pose.translation)

    def swap(self, source: GeometryFit, target: GeometryFit) -> GeometryFit:
        """Source shape, target expression and pose, with landmarks projected into the target."""
        landmarks = self.project(source.shape, target.expression, target)
        return GeometryFit(self.name, source.shape.copy(), target.expression.copy(),
                           target.rotation.copy(), float(target.scale),
                           np.asarray(target.translation, np.float64).copy(), landmarks)

"""`FaceRecord`: the one record that carries a face through every stage.

Detection fills the geometry; later stages (identity, geometry fit, conditions) add their results
to it instead of re-detecting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffswap_igfi.faces import topology


@dataclass
class FaceRecord:
    """One detected face in one photo.

    landmarks: [478,3] float32 in pixels of the photo: x, y, and a relative depth z in the same
        units as x (MediaPipe's mesh; 468..477 are the irises).
    image_size: (height, width) of the photo the landmarks live in.
    blendshapes: [52] float32 in [0,1] (MediaPipe's ARKit-style expression coefficients) or None.
    blendshape_names: the 52 names, aligned with ``blendshapes``.
    transform: [4,4] float32 facial transformation matrix (head pose in MediaPipe's canonical
        face space) or None.
    extras: results added by later stages (identity embedding, 3DMM fit, cached conditions).
    """

    landmarks: np.ndarray
    image_size: tuple[int, int]
    blendshapes: np.ndarray | None = None
    blendshape_names: tuple[str, ...] = ()
    transform: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lm = np.asarray(self.landmarks, dtype=np.float32)
        if lm.ndim != 2 or lm.shape[0] != topology.NUM_LANDMARKS or lm.shape[1] not in (2, 3):
            raise ValueError(f"landmarks must be [478,2|3], got {lm.shape}")
        if lm.shape[1] == 2:
            lm = np.concatenate([lm, np.zeros((lm.shape[0], 1), np.float32)], axis=1)
        self.landmarks = lm

    @property
    def points(self) -> np.ndarray:
        """[478,2] float32 pixel coordinates (x, y)."""
        return self.landmarks[:, :2]

    @property
    def box(self) -> np.ndarray:
        """[4] float32 (x0, y0, x1, y1): the bounding box of the mesh (forehead top to chin)."""
        pts = self.points[: topology.NUM_MESH_POINTS]
        return np.concatenate([pts.min(axis=0), pts.max(axis=0)]).astype(np.float32)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))

    @property
    def center(self) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return np.array([(x0 + x1) / 2, (y0 + y1) / 2], np.float32)

    @property
    def kps(self) -> np.ndarray:
        """[5,2] float32 five keypoints in ArcFace order (eyes, nose tip, mouth corners)."""
        return self.points[list(topology.FIVE_POINT_INDICES)].copy()

    @property
    def interocular(self) -> float:
        """Distance in pixels between the iris centres."""
        kps = self.kps
        return float(np.linalg.norm(kps[1] - kps[0]))

    @property
    def pose(self) -> tuple[float, float, float]:
        """(yaw, pitch, roll) in degrees from the transformation matrix (0,0,0 = frontal).

        Falls back to a 2D estimate of roll only when no matrix is present.
        """
        if self.transform is None:
            left, right = self.kps[0], self.kps[1]
            roll = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
            return 0.0, 0.0, roll
        return rotation_to_euler(np.asarray(self.transform)[:3, :3])

    def blendshape(self, name: str) -> float:
        """One expression coefficient by MediaPipe name, e.g. ``"jawOpen"``."""
        if self.blendshapes is None:
            raise KeyError("this face has no blendshapes")
        return float(self.blendshapes[self.blendshape_names.index(name)])

    def transformed(self, affine: np.ndarray, image_size: tuple[int, int]) -> FaceRecord:
        """The same face with landmarks mapped by ``affine`` ([2,3], photo -> new frame).

        z is scaled by the affine's scale so depth stays in the same units as x.
        """
        a = np.asarray(affine, np.float64)
        pts = self.points.astype(np.float64) @ a[:, :2].T + a[:, 2]
        scale = math.sqrt(abs(np.linalg.det(a[:, :2])))
        lm = np.concatenate([pts, self.landmarks[:, 2:3] * scale], axis=1).astype(np.float32)
        return FaceRecord(lm, image_size, self.blendshapes, self.blendshape_names, self.transform,
                          dict(self.extras))


def rotation_to_euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a [3,3] rotation (scale allowed), R = Rz(roll) Ry(yaw) Rx(pitch).

    Pitch is about x (nodding), yaw about y (turning), roll about z (tilting), in MediaPipe's
    canonical face space (x right, y up, z towards the camera).
    """
    r = np.asarray(rotation, np.float64)
    r = r / np.cbrt(abs(np.linalg.det(r)))  # remove uniform scale
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return yaw, pitch, roll

"""Face recognizers used to *score* identity, kept apart from the encoders that condition models.

Evaluation must not measure identity with the network a model was trained against (that
flatters the model), so the offline default here is dlib's ResNet descriptor (128-d, trained
on a different data set and loss than ArcFace), with its CC0 model files from the
``face_recognition_models`` package. On dlib's descriptor, photos of one person lie closer than
0.6 and photos of distinct people farther.
"""

from __future__ import annotations

import abc
import importlib.util
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.record import FaceRecord

SAME_PERSON_DISTANCE = 0.6  # dlib's documented operating point on LFW


class FaceRecognizer(abc.ABC):
    """Maps a face in a photo to an identity descriptor; smaller distance = same person."""

    name: str = "recognizer"
    threshold: float = SAME_PERSON_DISTANCE

    @abc.abstractmethod
    def describe(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        """rgb: [H,W,3] uint8 photo; face: a face in it. Returns a [D] float32 descriptor."""

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between two descriptors."""
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def _models_dir() -> Path:
    # Located by find_spec: importing face_recognition_models pulls pkg_resources, which
    # current setuptools no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "dlib face models not found: install them with pip install face_recognition_models"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibRecognizer(FaceRecognizer):
    """dlib's 128-d ResNet face descriptor (``dlib-bin`` + ``face_recognition_models``).

    The face box comes from the FaceRecord (nothing re-detects); dlib's 5-point shape model
    places its own alignment points inside it, and the descriptor is computed on dlib's
    150x150 aligned chip.
    """

    name = "dlib-resnet-v1"

    def __init__(self, models_dir: str | Path | None = None, *, jitters: int = 0) -> None:
        import dlib

        root = Path(models_dir) if models_dir is not None else _models_dir()
        shape_file = root / "shape_predictor_5_face_landmarks.dat"
        net_file = root / "dlib_face_recognition_resnet_model_v1.dat"
        for f in (shape_file, net_file):
            if not f.is_file():
                raise ModelNotFoundError(
                    f"dlib model file {f} is missing: reinstall face_recognition_models"
                )
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(shape_file))
        self._net = dlib.face_recognition_model_v1(str(net_file))
        self.jitters = jitters

    @staticmethod
    def dlib_box(face: FaceRecord) -> tuple[int, int, int, int]:
        """A box shaped like dlib's HOG detections (brows to chin, cheek to cheek) from the mesh."""
        pts = face.points
        x0, x1 = pts[234, 0], pts[454, 0]  # cheek contour, image-left and image-right
        y_brow = min(pts[105, 1], pts[334, 1])  # upper brow points
        y_chin = pts[152, 1]
        cx, cy = (x0 + x1) / 2, (y_brow + y_chin) / 2
        half = max(x1 - x0, y_chin - y_brow) / 2
        return int(cx - half), int(cy - half), int(cx + half), int(cy + half)

    def describe(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        left, top, right, bottom = self.dlib_box(face)
        image = np.ascontiguousarray(rgb)
        shape = self._shape(image, self._dlib.rectangle(left, top, right, bottom))
        chip = self._dlib.get_face_chip(image, shape, size=150, padding=0.25)
        desc = self._net.compute_face_descriptor(chip, self.jitters)
        return np.asarray(desc, np.float32)

"""A photo region around one face, resampled to a bounded working resolution: where the
geometric engine does all its work, so its cost does not grow with the photo."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from diffswap_igfi.faces.record import FaceRecord


def face_roi(face: FaceRecord, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) around a face's mesh with ``margin`` pixels, inside the photo."""
    x0, y0, x1, y1 = face.box
    h, w = shape
    return (int(max(0, np.floor(x0 - margin))), int(max(0, np.floor(y0 - margin))),
            int(min(w, np.ceil(x1 + margin))), int(min(h, np.ceil(y1 + margin))))


@dataclass
class WorkFrame:
    """A photo region resampled to the engine's working resolution.

    roi: (x0, y0, x1, y1) in the photo; image: [h,w,3] uint8, the region resized (or the region
    itself at scale 1); face: the face's record in this frame; scale: work pixels per photo
    pixel (<= 1).
    """

    roi: tuple[int, int, int, int]
    image: np.ndarray
    face: FaceRecord
    scale: float


def work_frame(photo: np.ndarray, face: FaceRecord, margin: float, max_iod: float) -> WorkFrame:
    """Cut the ROI around ``face`` (``margin`` photo pixels) and scale it down so the face's
    inter-ocular distance is at most ``max_iod`` pixels. photo: [H,W,3] uint8."""
    roi = face_roi(face, photo.shape[:2], margin)
    x0, y0, x1, y1 = roi
    patch = photo[y0:y1, x0:x1]
    scale = min(1.0, max_iod / max(face.interocular, 1e-6))
    w, h = x1 - x0, y1 - y0
    ww, wh = max(1, round(w * scale)), max(1, round(h * scale))
    if (ww, wh) == (w, h):
        image, sx, sy = patch, 1.0, 1.0
    else:
        image = cv2.resize(patch, (ww, wh), interpolation=cv2.INTER_AREA)
        sx, sy = ww / w, wh / h
    # pixel centres: x_work = (x_photo - x0 + 0.5) * sx - 0.5
    affine = np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]])
    return WorkFrame(roi, np.ascontiguousarray(image), face.transformed(affine, (wh, ww)),
                     float(np.sqrt(sx * sy)))

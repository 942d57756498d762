"""Face detection with 478 landmarks, in passes that also find small faces in large photos.

Pass 1 runs the landmarker on the whole photo (downscaled when huge). MediaPipe's detector
works at a low internal resolution, so faces that are small relative to the frame are missed
(six people in insightface's 1280x886 group photo: none found). Pass 2 runs it on overlapping
tiles; every face found in a tile is then re-measured on a crop centred on it, so its landmarks
do not depend on where a tile boundary fell. Duplicates are merged by box overlap.

Pass 3, on photos of 1600 px or more whose faces found so far are all small (a crowd, not a
portrait), repeats the tiling at a finer scale for tiny faces:
MediaPipe finds a face down to about
1/8 of the image it is given, so 160 px tiles find 20 px faces. A tile without a face costs
about a millisecond, and the fine tile grows with the photo so that the pass stays within
``FINE_TILE_BUDGET`` tiles (about one second): in very large photos the smallest faces found are
correspondingly larger (about 40 px in a 25 MP photo).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from diffswap_igfi.errors import AmbiguousFaceError, FaceNotFoundError
from diffswap_igfi.faces.landmarker import Landmarker
from diffswap_igfi.faces.record import FaceRecord

FULL_PASS_MAX_SIDE = 1280  # the whole-photo pass never needs more: its detector sees ~128 px
TILE_PASS_MIN_SIDE = 640  # photos larger than this get the tile pass too
DUPLICATE_IOU = 0.3
FINE_TILE_MIN = 160  # a 20 px face is 1/8 of it
FINE_PASS_MIN_SIDE = 1600  # photos (not video frames or web images) where tiny faces are likely
SMALL_FACE_IOD = 0.05  # the fine pass runs only if no face found has a larger eye distance
                       # (relative to the photo's short side)
FINE_TILE_BUDGET = 1000  # tiles in the fine pass at most


def tile_sizes(height: int, width: int) -> list[int]:
    """Side of the tiles of each tile pass for a photo, coarse first (one or two passes)."""
    coarse = int(np.clip(round(min(height, width) * 0.45), 192, 640))
    # stride is half a tile, so a pass has about 4 h w / tile^2 tiles
    fine = max(FINE_TILE_MIN, int(np.ceil(np.sqrt(4 * height * width / FINE_TILE_BUDGET))))
    if max(height, width) < FINE_PASS_MIN_SIDE or fine >= coarse * 0.75:
        return [coarse]
    return [coarse, fine]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class FaceDetector:
    """Finds every face in a photo and returns `FaceRecord`s, largest first.

    Use as a context manager (or call ``close``) to release the MediaPipe graph.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, max_faces: int = 20,
                 min_confidence: float = 0.5) -> None:
        self.landmarker = Landmarker(model_path, max_faces=max_faces,
                                     min_confidence=min_confidence)

    def detect(self, rgb: np.ndarray, *, tiles: bool | None = None) -> list[FaceRecord]:
        """All faces in a photo.

        rgb: [H,W,3] uint8. tiles: force (True) or skip (False) the tile passes; by default
        they run on photos larger than 640 px, or when the whole-photo pass finds nothing.
        Returns FaceRecords in photo pixels, sorted by box area, largest first.
        """
        h, w = rgb.shape[:2]
        faces = self._full_pass(rgb)
        if tiles is None:
            tiles = max(h, w) > TILE_PASS_MIN_SIDE or not faces
        if tiles:
            for level, tile in enumerate(tile_sizes(h, w)):
                if level > 0 and any(f.interocular > SMALL_FACE_IOD * min(h, w) for f in faces):
                    break  # a photo of someone, not a crowd: no tiny faces to look for
                for face in self._tile_pass(rgb, tile):
                    if any(box_iou(face.box, kept.box) >= DUPLICATE_IOU for kept in faces):
                        continue
                    # the fine pass sees so little context that ears, lamps and patterns pass
                    # for faces: keep a face only if it is not part of a larger one and is
                    # found again on a crop of its own
                    if level > 0 and (any(_inside(face.box, kept.box) > 0.3 for kept in faces)
                                      or not self._confirm(rgb, face)):
                        continue
                    faces.append(face)
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _records(self, rgb: np.ndarray, scale: float = 1.0,
                 offset: tuple[float, float] = (0.0, 0.0)) -> list[FaceRecord]:
        """Landmarker output on ``rgb`` mapped to photo pixels: p_photo = p / scale + offset."""
        records = []
        for raw in self.landmarker.run(rgb):
            lm = raw["landmarks"] / scale
            lm[:, 0] += offset[0]
            lm[:, 1] += offset[1]
            records.append(FaceRecord(lm, (0, 0), raw["blendshapes"], raw["names"],
                                      raw["transform"]))
        return records

    def _full_pass(self, rgb: np.ndarray) -> list[FaceRecord]:
        h, w = rgb.shape[:2]
        scale = min(1.0, FULL_PASS_MAX_SIDE / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(
            rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        return [_with_size(f, (h, w)) for f in self._records(small, scale)]

    def _tile_pass(self, rgb: np.ndarray, tile: int) -> list[FaceRecord]:
        h, w = rgb.shape[:2]
        stride = tile // 2
        found: list[FaceRecord] = []
        for y in _starts(h, tile, stride):
            for x in _starts(w, tile, stride):
                for face in self._records(rgb[y:y + tile, x:x + tile], 1.0, (x, y)):
                    if all(box_iou(face.box, kept.box) < DUPLICATE_IOU for kept in found):
                        found.append(face)
        refined = []
        for face in found:
            better = self._refine(rgb, face)
            if all(box_iou(better.box, kept.box) < DUPLICATE_IOU for kept in refined):
                refined.append(better)
        return refined

    def _refine(self, rgb: np.ndarray, face: FaceRecord) -> FaceRecord:
        """Re-measure one face on a square crop centred on it (2.2x its size, at most 512 px)."""
        crop, scale, left, top = _face_crop(rgb, face, 2.2, 512, upscale=False)
        candidates = self._records(crop, scale, (left, top))
        size = rgb.shape[:2]
        if not candidates:
            return _with_size(face, size)
        best = max(candidates, key=lambda c: box_iou(c.box, face.box))
        return _with_size(best if box_iou(best.box, face.box) > DUPLICATE_IOU else face, size)

    def _confirm(self, rgb: np.ndarray, face: FaceRecord) -> bool:
        """Is the face found again on a crop three times its size, scaled to 192 px?"""
        crop, scale, left, top = _face_crop(rgb, face, 3.0, 192, upscale=True)
        return any(box_iou(c.box, face.box) > 0.5
                   for c in self._records(crop, scale, (left, top)))

    def close(self) -> None:
        self.landmarker.close()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _face_crop(rgb: np.ndarray, face: FaceRecord, factor: float, size: int, *, upscale: bool
               ) -> tuple[np.ndarray, float, int, int]:
    """A square around the face, ``factor`` times its size and cut at the photo's edges,
    resized so its longer side is ``size`` (never enlarged unless ``upscale``).
    Returns (crop, scale, left, top): crop pixel = (photo pixel - (left, top)) * scale."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = face.box
    side = factor * max(x1 - x0, y1 - y0)
    cx, cy = face.center
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = rgb[top:bottom, left:right]
    scale = size / max(crop.shape[0], crop.shape[1], 1)
    if not upscale:
        scale = min(1.0, scale)
    if scale != 1.0:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)),
                                 max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    return crop, scale, left, top


def _inside(a: np.ndarray, b: np.ndarray) -> float:
    """Share of box a's area that lies inside box b."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return float(ix * iy / area) if area > 0 else 0.0


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _with_size(face: FaceRecord, size: tuple[int, int]) -> FaceRecord:
    face.image_size = size
    return face


def select_faces(faces: Sequence[FaceRecord], selector: str = "largest", *, index: int = 0,
                 reference_distances: Sequence[float] | None = None,
                 reference_threshold: float = 0.6, what: str = "the photo",
                 index_option: str = "--face-index") -> list[FaceRecord]:
    """Pick the faces to work on, FaceFusion-style.

    selector: ``largest`` (one face), ``index`` (the ``index``-th face, largest first), ``all``,
    or ``reference`` (every face whose distance to a reference face, given per face in
    ``reference_distances``, is below ``reference_threshold``). ``index_option`` is the option
    that set ``index``, named in the error when it is out of range.
    """
    if not faces:
        raise FaceNotFoundError(
            f"no face found in {what}: use a photo with a clearly visible face"
        )
    if selector == "largest":
        return [faces[0]]
    if selector == "all":
        return list(faces)
    if selector == "index":
        if not 0 <= index < len(faces):
            raise AmbiguousFaceError(
                f"{index_option} {index} is out of range: {what} has {len(faces)} face(s), "
                f"numbered 0..{len(faces) - 1} from the largest"
            )
        return [faces[index]]
    if selector == "reference":
        if reference_distances is None or len(reference_distances) != len(faces):
            raise ValueError("reference selection needs one distance per face")
        chosen = [f for f, d in zip(faces, reference_distances) if d < reference_threshold]
        if not chosen:
            raise FaceNotFoundError(
                f"no face in {what} matches the reference face (closest distance "
                f"{min(reference_distances):.2f}, threshold {reference_threshold}): use another "
                f"reference photo or raise --reference-distance"
            )
        return chosen
    raise ValueError(f"unknown face selector {selector!r}")


def pick_source_face(faces: Sequence[FaceRecord], *, index: int | None = None,
                     what: str = "the source photo") -> FaceRecord:
    """The identity face of a source photo.

    With ``index`` that face; otherwise the largest, provided it is clearly the subject (at least
    twice the area of the next one). Otherwise the choice is ambiguous and we refuse.
    """
    if not faces:
        raise FaceNotFoundError(f"no face found in {what}: use a photo with a clearly visible face")
    if index is not None:
        return select_faces(faces, "index", index=index, what=what,
                            index_option="--source-face-index")[0]
    if len(faces) > 1 and faces[0].area < 2.0 * faces[1].area:
        raise AmbiguousFaceError(
            f"{what} has {len(faces)} faces of similar size: pass --source-face-index N "
            f"(0 = largest) to choose one"
        )
    return faces[0]

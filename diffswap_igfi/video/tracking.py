"""Faces across frames: detection on crops around known faces, and tracks linked by IoU and
identity.

Faces are measured on every ``detect_every``-th frame (kept index a multiple of it; the planner
interpolates the frames between, as it bridges any short gap, which also halves the landmarks'
frame-to-frame noise there). Full-frame detection runs every ``full_every`` measured frames, on
the first frame, and whenever a track is lost; in between, each live track is re-measured on a
square crop around its last box (at most ``crop_side`` pixels), which is both cheaper and, for
small faces, more accurate than the whole frame. Detections join the track whose last box
overlaps them most (IoU); a face that overlaps no live track is compared by identity (dlib
descriptor, computed only then) with tracks lost recently, so a person who leaves and comes
back keeps their track and their source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from diffswap_igfi.faces.detect import FaceDetector, box_iou
from diffswap_igfi.faces.record import FaceRecord

LINK_IOU = 0.3  # a detection continues a track when its box overlaps the last one this much
SAME_FACE_IOU = 0.5  # two detections this close are the same face
IDENTITY_DISTANCE = 0.5  # dlib distance under which a new face re-joins a lost track


@dataclass
class Track:
    """One person across frames. ``last``: the latest observation; ``last_frame``: its frame;
    ``descriptor``: [128] dlib descriptor taken at the track's start (None until needed);
    ``area_sum``: sum of box areas over observed frames (how prominent the person is);
    ``best``: the largest observation (the face used to pick this track's source)."""

    id: int
    last: FaceRecord
    first_frame: int
    last_frame: int
    frames: int = 1
    area_sum: float = 0.0
    best: FaceRecord | None = None
    descriptor: np.ndarray | None = None

    def to_state(self) -> dict:
        return {"id": self.id, "first_frame": self.first_frame, "last_frame": self.last_frame,
                "frames": self.frames, "area_sum": self.area_sum,
                "last": _face_state(self.last), "best": _face_state(self.best),
                "descriptor": None if self.descriptor is None else self.descriptor.tolist()}

    @classmethod
    def from_state(cls, s: dict) -> Track:
        desc = s["descriptor"]
        return cls(s["id"], _face_from_state(s["last"]), s["first_frame"], s["last_frame"],
                   s["frames"], s["area_sum"], _face_from_state(s["best"]),
                   None if desc is None else np.asarray(desc, np.float64))


def _face_state(face: FaceRecord | None) -> dict | None:
    if face is None:
        return None
    return {"landmarks": face.landmarks.tolist(), "size": list(face.image_size),
            "transform": None if face.transform is None else face.transform.tolist()}


def _face_from_state(s: dict | None) -> FaceRecord | None:
    if s is None:
        return None
    transform = None if s["transform"] is None else np.asarray(s["transform"], np.float32)
    return FaceRecord(np.asarray(s["landmarks"], np.float32), tuple(s["size"]),
                      transform=transform)


@dataclass
class TrackerSettings:
    """detect_every: faces are measured on frames whose kept index is a multiple of this (the
    others are interpolated by the planner; 1 = every frame); every_frame_iod: faces narrower
    than this (pixels between the eyes) are measured in every frame all the same (a pixel of
    placement error is a large part of a small face: the face watermark's payload link on a
    30 px face weakened with the stride, measured); full_every: measured frames
    between full-frame detections; tile_every: every how many full
    detections also run the tile pass (small faces in large frames); crop_scale: crop side as
    a multiple of the face box; crop_side: crops are downscaled to at most this many pixels;
    max_lost: frames a track may go unseen and still be linked by IoU (the gap is bridged)."""

    detect_every: int = 2
    every_frame_iod: float = 64.0
    full_every: int = 12
    tile_every: int = 5
    crop_scale: float = 2.0
    crop_side: int = 256
    max_lost: int = 8


@dataclass
class FrameFaces:
    """What the tracker saw in one frame: (track id, face) pairs."""

    index: int
    faces: list[tuple[int, FaceRecord]] = field(default_factory=list)


class Tracker:
    """Detects and links faces frame by frame. ``describe(rgb, face) -> [D]`` is the identity
    function (the swapper's dlib recognizer, ~0.08 s a face); it runs once per face that no
    live track claims, to re-join a lost track or to give a new track its descriptor."""

    def __init__(self, detector: FaceDetector, describe=None, *,
                 settings: TrackerSettings | None = None) -> None:
        self.detector = detector
        self.describe = describe
        self.settings = settings or TrackerSettings()
        self.tracks: dict[int, Track] = {}
        self.next_id = 0
        self._full_count = 0
        self._since_full = 0

    # state for resuming a run at a chunk boundary
    def state(self) -> dict:
        return {"tracks": [t.to_state() for t in self.tracks.values()], "next_id": self.next_id,
                "full_count": self._full_count, "since_full": self._since_full}

    def load_state(self, state: dict) -> None:
        self.tracks = {t["id"]: Track.from_state(t) for t in state["tracks"]}
        self.next_id = state["next_id"]
        self._full_count = state["full_count"]
        self._since_full = state["since_full"]

    def on_stride(self, index: int) -> bool:
        """Whether frame ``index`` is on the measuring stride (see detect_every)."""
        return index % max(1, self.settings.detect_every) == 0

    def wants(self, index: int) -> bool:
        """Whether to measure frame ``index``: on the stride, or whenever no track is being
        followed or one was lost recently (then every frame is searched, so a face that comes
        back is swapped from the first frame it is seen in)."""
        live = self.live(index)
        if self.on_stride(index) or not live:
            return True
        if any(t.last.interocular < self.settings.every_frame_iod for t in live):
            return True
        return any(index - t.last_frame <= self.settings.max_lost for t in self.lost(index))

    def live(self, index: int) -> list[Track]:
        """Tracks seen in the previous measured frame."""
        stride = max(1, self.settings.detect_every)
        return [t for t in self.tracks.values() if index - stride <= t.last_frame < index]

    def lost(self, index: int) -> list[Track]:
        """Tracks not seen in the previous measured frame."""
        stride = max(1, self.settings.detect_every)
        return [t for t in self.tracks.values() if t.last_frame < index - stride]

    def step(self, index: int, rgb: np.ndarray) -> FrameFaces:
        """Detect and link the faces of frame ``index`` (rgb: [H,W,3] uint8 upright): a
        measured frame, or the video's last frame (so its faces need no extrapolation)."""
        s = self.settings
        live = self.live(index)
        recent_lost = [t for t in self.lost(index) if index - t.last_frame <= s.max_lost]
        full = (not live or recent_lost or self._since_full + 1 >= s.full_every)
        found: list[FaceRecord] = []
        for track in live:
            found.extend(self._crop_detect(rgb, track.last))
        if full:
            tiles = None if self._full_count % s.tile_every == 0 else False
            self._full_count += 1
            self._since_full = 0
            found.extend(self.detector.detect(rgb, tiles=tiles))
        else:
            self._since_full += 1
        faces = _dedupe(found)
        return FrameFaces(index, self._link(index, rgb, faces))

    def _crop_detect(self, rgb: np.ndarray, face: FaceRecord) -> list[FaceRecord]:
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = face.box
        side = self.settings.crop_scale * max(x1 - x0, y1 - y0, 16)
        cx, cy = face.center
        left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        right, bottom = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
        if right - left < 16 or bottom - top < 16:
            return []
        crop = rgb[top:bottom, left:right]
        scale = min(1.0, self.settings.crop_side / max(crop.shape[:2]))
        if scale < 1.0:
            crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)),
                                     max(1, round(crop.shape[0] * scale))),
                              interpolation=cv2.INTER_AREA)
        out = []
        for raw in self.detector.landmarker.run(crop):
            lm = raw["landmarks"] / scale
            lm[:, 0] += left
            lm[:, 1] += top
            out.append(FaceRecord(lm, (h, w), raw["blendshapes"], raw["names"],
                                  raw["transform"]))
        return out

    def _link(self, index: int, rgb: np.ndarray,
              faces: list[FaceRecord]) -> list[tuple[int, FaceRecord]]:
        s = self.settings
        candidates = [t for t in self.tracks.values() if index - t.last_frame <= s.max_lost + 1]
        pairs = sorted(((box_iou(f.box, t.last.box), i, t.id) for i, f in enumerate(faces)
                        for t in candidates), reverse=True)
        assigned: dict[int, int] = {}  # face index -> track id
        used: set[int] = set()
        for iou, i, tid in pairs:
            if iou < LINK_IOU:
                break
            if i in assigned or tid in used:
                continue
            assigned[i] = tid
            used.add(tid)
        out = []
        for i, face in enumerate(faces):
            tid = assigned.get(i)
            if tid is None:
                tid = self._start_or_rejoin(index, rgb, face, used)
                used.add(tid)
            track = self.tracks[tid]
            track.last, track.last_frame = face, index
            track.frames += 1
            track.area_sum += face.area
            if track.best is None or face.area > track.best.area:
                track.best = face
            out.append((tid, face))
        return out

    def _start_or_rejoin(self, index: int, rgb: np.ndarray, face: FaceRecord,
                         used: set[int]) -> int:
        """A face no live track claims: the lost track of the same person, else a new track."""
        descriptor = None
        if self.describe is not None:
            descriptor = np.asarray(self.describe(rgb, face), np.float64)
            lost = [t for t in self.tracks.values() if t.id not in used
                    and t.last_frame < index and t.descriptor is not None]
            if lost:
                distance, track = min(((float(np.linalg.norm(t.descriptor - descriptor)), t)
                                       for t in lost), key=lambda x: x[0])
                if distance < IDENTITY_DISTANCE:
                    return track.id
        tid = self.next_id
        self.next_id += 1
        self.tracks[tid] = Track(tid, face, index, index, frames=0, descriptor=descriptor)
        return tid


def _dedupe(faces: list[FaceRecord]) -> list[FaceRecord]:
    """Drop detections of a face already found (the crop pass and the full pass overlap)."""
    kept: list[FaceRecord] = []
    for face in faces:
        if all(box_iou(face.box, k.box) < SAME_FACE_IOU for k in kept):
            kept.append(face)
    return kept

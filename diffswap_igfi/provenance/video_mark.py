"""Video hooks: the face mark in every swapped frame, and a clip-level detector.

The video writer (another module) decodes and encodes frames itself; it calls
:func:`mark_frame` on every swapped frame with that frame's swapped faces, encodes, then signs
the finished MP4 with :func:`diffswap_igfi.provenance.c2pa_sign.sign_file` (passing the same
payload, so the manifest and the mark point at each other)::

    payload = clip_payload(first_frame)
    for frame, faces, region in swapped_frames:
        encoder.write(mark_frame(frame, faces, region, payload=payload, detector=detector))
    sign_file(mp4, digital_source_type=..., engine=..., parent_path=source_video,
              watermark_payload=payload)

Detection (:func:`detect_clip`) reads the face mark on each frame (detecting faces itself
unless they are given) and aggregates: a frame *agrees* when its best face scores at least
``FRAME_Z`` (a per-face false-alarm probability under 3.4e-4 by Hoeffding's bound); the clip is
marked when the number of agreeing frames is one that chance would reach with probability under
``CLIP_FALSE_ALARM`` (a binomial tail over the frames that had a readable face, with the
per-frame probability multiplied by the faces in the frame, a union bound). A single frame that
passes the image threshold marks the clip too. The payload is the majority of the frames'
decoded payloads, or, given ``expect``, the fraction of agreeing frames whose mark matches it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffswap_igfi.provenance import face_mark
from diffswap_igfi.provenance.keys import watermark_key

FRAME_Z = 4.0  # a frame agrees when its best face scores at least this
CLIP_FALSE_ALARM = 1e-6  # per clip, any content


def clip_payload(first_frame: np.ndarray, extra: bytes = b"") -> str:
    """A payload for a clip: 8 hex digits of SHA-256 over its first swapped frame ([H,W,3]
    uint8) and ``extra`` (e.g. the source file's name), the same on every frame."""
    digest = hashlib.sha256(np.ascontiguousarray(first_frame).tobytes() + extra)
    return digest.hexdigest()[:8]


def _kps_list(faces: Sequence | None) -> list[np.ndarray]:
    return [np.asarray(getattr(f, "kps", f), np.float64) for f in faces or ()]


def mark_frame(rgb: np.ndarray, faces: Sequence, region: np.ndarray | None = None, *,
               payload: str, key: int | None = None, detector=None) -> np.ndarray:
    """The face mark on one swapped frame.

    rgb: [H,W,3] uint8 swapped frame; faces: the swapped faces' FaceRecords (or [5,2]
    keypoints) as the swap saw them in the target frame; region: [H,W] bool swapped pixels
    (None = anywhere); detector: a faces.detect.FaceDetector (pass the one the video pipeline
    already holds): with it the mark is anchored where a reader will find each swapped face
    (face_mark.reader_kps), without it at ``faces`` as given, which after a swap is a few
    pixels off and costs much of the mark's strength. Returns a new [H,W,3] uint8 frame,
    identical to ``rgb`` outside ``region``. The block mark is not added: H.264 removes it.
    """
    kps = _kps_list(faces)
    if detector is not None:
        kps = [face_mark.reader_kps(rgb, k, detector) for k in kps]
    return face_mark.embed_face_mark(rgb, kps, region,
                                     key=watermark_key() if key is None else key,
                                     payload=payload)


@dataclass
class ClipMarkResult:
    """What :func:`detect_clip` found. ``scores``: best face z per frame read (None where no
    readable face); ``agreeing``: frames with z >= FRAME_Z; ``needed``: how many agreeing
    frames mark the clip given the frames read; ``payload``: majority decoded payload;
    ``match_fraction``: share of agreeing frames matching ``expect``, if one was given."""

    found: bool
    frames: int
    frames_with_faces: int
    agreeing: int
    needed: int
    scores: list[float | None] = field(default_factory=list)
    payload: str | None = None
    match_fraction: float | None = None

    def summary(self) -> str:
        verdict = "found" if self.found else "not found"
        line = (f"video face watermark: {verdict}: {self.agreeing} of {self.frames_with_faces} "
                f"frames with a readable face agree (needed {self.needed}; {self.frames} "
                "frames read)")
        if self.payload:
            line += f"; payload {self.payload}"
        if self.match_fraction is not None:
            line += f"; {100 * self.match_fraction:.0f}% of agreeing frames match the manifest"
        return line

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def needed_frames(n: int, faces_per_frame: float = 1.0) -> int:
    """Smallest k with P(at least k of n frames agree by chance) <= CLIP_FALSE_ALARM."""
    p = min(1.0, faces_per_frame * math.exp(-FRAME_Z**2 / 2))
    for k in range(1, n + 1):
        if _binomial_tail(n, k, p) <= CLIP_FALSE_ALARM:
            return k
    return n + 1  # too few frames to decide by agreement alone


def detect_clip(frames: Iterable, *, detector=None, key: int | None = None,
                expect: str | None = None) -> ClipMarkResult:
    """Aggregate the face mark over a clip.

    frames: an iterable of [H,W,3] uint8 frames (faces are detected here, with ``detector``
    or a FaceDetector opened for the call), or of (frame, faces) pairs where faces are
    FaceRecords or [5,2] keypoints. Frames are read one at a time (a generator that decodes
    on demand keeps memory flat). ``expect``: the payload from the clip's manifest.
    """
    key = watermark_key() if key is None else key
    own = None
    scores: list[float | None] = []
    payloads: Counter = Counter()
    faces_seen, matches, single_pass = 0, 0, False
    image_threshold = face_mark.threshold()
    try:
        for item in frames:
            if isinstance(item, tuple):
                rgb, faces = item
                kps = _kps_list(faces)
            else:
                rgb = item
                if detector is None:
                    from diffswap_igfi.faces.detect import FaceDetector

                    own = detector = FaceDetector()
                kps = [f.kps for f in detector.detect(rgb)]
            readable = [k for k in kps if face_mark.interocular(k) >= face_mark.MIN_FACE_PX]
            if not readable:
                scores.append(None)
                continue
            faces_seen += len(readable)
            luma = face_mark.luma(rgb)
            z, decoded, match = max((face_mark.score_face(luma, k, key=key, expect=expect)
                                     for k in readable), key=lambda r: r[0])
            scores.append(z)
            single_pass |= z >= image_threshold
            if z >= FRAME_Z:
                if decoded:
                    payloads[decoded] += 1
                if match is not None and match >= face_mark.MATCH_Z:
                    matches += 1
    finally:
        if own is not None:
            own.close()
    read = [s for s in scores if s is not None]
    agreeing = sum(s >= FRAME_Z for s in read)
    needed = needed_frames(len(read), faces_seen / max(len(read), 1))
    found = bool(read) and (agreeing >= needed or single_pass)
    payload = payloads.most_common(1)[0][0] if payloads else None
    fraction = (matches / agreeing) if expect is not None and agreeing else None
    return ClipMarkResult(found, len(scores), len(read), agreeing, min(needed, len(read) + 1),
                          scores, payload, fraction)

"""Video hooks: both marks in every swapped frame, and a clip-level detector.

The video writer (video/job.py) decodes and encodes frames itself; it calls
:func:`mark_frame` on every swapped frame with that frame's swapped faces and the detector the
pipeline already holds, with one payload for the whole clip, encodes, then signs the finished
MP4/MOV with :func:`diffswap_igfi.provenance.c2pa_sign.sign_file` (passing the same payload,
so the manifest and the mark point at each other)::

    for frame, faces, region in swapped_frames:
        encoder.write(mark_frame(frame, faces, region, payload=payload, detector=detector))
    sign_file(unsigned_mp4, dest=mp4, digital_source_type=..., engine=...,
              parent_path=source_video, watermark_payload=payload)

Detection (:func:`detect_clip`) reads the face mark on each frame (detecting faces itself
unless they are given) and aggregates: a frame *agrees* when its best face scores at least
``FRAME_Z`` (a per-face false-alarm probability under 3.4e-4 by Hoeffding's bound); the clip is
marked when the number of agreeing frames is one that chance would reach with probability under
``CLIP_FALSE_ALARM`` (a binomial tail over the frames that had a readable face, with the
per-frame probability multiplied by the faces in the frame, a union bound). A single frame that
passes the image threshold marks the clip too. The payload is the majority of the frames'
decoded payloads. Given ``expect`` (the manifest's payload), the chip responses of the
agreeing frames' best faces are summed and the payload's match z-score is taken over the sum
(face_mark.match_z): for a payload unrelated to the mark it stays sub-Gaussian with variance 1
however correlated the frames are (the payload's signs are independent of the content), so the
image's ``MATCH_Z`` keeps its meaning (a chance match under 1e-3), while the mark, the same in
every frame, adds up (measured on a 30 px face after H.264 CRF 18: frames 3.4-6.9, the sum of
16 frames far above; see tests/test_video.py).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from diffswap_igfi.provenance import face_mark
from diffswap_igfi.provenance.keys import watermark_key
from diffswap_igfi.provenance.watermark import embed_watermark

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
    """The face mark, then the block mark, on one swapped frame (as embed_watermark does for
    photos).

    rgb: [H,W,3] uint8 swapped frame; faces: the swapped faces' FaceRecords (or [5,2]
    keypoints) as the swap saw them in the target frame; region: [H,W] bool swapped pixels
    (None = anywhere); payload: 8 hex digits, the same on every frame of a clip; detector: a
    faces.detect.FaceDetector (pass the one the video pipeline already holds): with it the
    face mark is anchored where a reader will find each swapped face (face_mark.reader_kps),
    without it at ``faces`` as given, which after a swap is a few pixels off and costs much of
    the mark's strength. Returns a new [H,W,3] uint8 frame, identical to ``rgb`` outside
    ``region``. The block mark survives H.264 at the writer's default CRF 18 on faces of
    ~70 px (tests/test_video.py) but not CRF 28; the face mark survives both.
    """
    kps = _kps_list(faces)
    if detector is not None:
        kps = [face_mark.reader_kps(rgb, k, detector) for k in kps]
    key = watermark_key() if key is None else key
    marked = rgb
    for k in kps:  # each face on the crop its aligned frame covers: ~7x faster at 720p
        if face_mark.interocular(k) < face_mark.MIN_FACE_PX:
            continue
        x0, y0, x1, y1 = _footprint(k, rgb.shape)
        if marked is rgb:
            marked = rgb.copy()
        marked[y0:y1, x0:x1] = face_mark.embed_face_mark(
            marked[y0:y1, x0:x1], [k - (x0, y0)],
            None if region is None else region[y0:y1, x0:x1], key=key, payload=payload)
    return embed_watermark(marked, region)  # no faces: the block mark only


def _footprint(kps: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the pixels the aligned face frame of ``kps`` reads or writes, plus a
    2 px margin for bilinear sampling, within an image of ``shape``. The face mark computed
    on that crop equals the whole frame's up to OpenCV's fixed-point rounding (the frame
    reflects at the image's own borders only; measured: 3 pixels of a 720p frame off by 1)."""
    inverse = cv2.invertAffineTransform(face_mark.frame_affine(kps))
    side = face_mark.FRAME
    corners = np.array([[0, 0, 1], [side, 0, 1], [0, side, 1], [side, side, 1]], np.float64)
    xy = corners @ inverse.T
    h, w = shape[:2]
    x0, y0 = np.floor(xy.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(xy.max(axis=0)).astype(int) + 3
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


@dataclass
class ClipMarkResult:
    """What :func:`detect_clip` found. ``scores``: best face z per frame read (None where no
    readable face); ``agreeing``: frames with z >= FRAME_Z; ``needed``: how many agreeing
    frames mark the clip given the frames read; ``payload``: majority decoded payload;
    ``expected``: the payload looked for (``expect``), ``match_fraction``: the share of
    agreeing frames matching it on their own, ``match_z``: the match z-score over the sum of
    their responses (the clip's evidence, see the module docstring)."""

    found: bool
    frames: int
    frames_with_faces: int
    agreeing: int
    needed: int
    scores: list[float | None] = field(default_factory=list)
    payload: str | None = None
    match_fraction: float | None = None
    expected: str | None = None
    match_z: float | None = None

    @property
    def payload_matches(self) -> bool | None:
        """Whether the clip's mark carries ``expected`` (None when nothing was tested)."""
        return None if self.match_z is None else self.match_z >= face_mark.MATCH_Z

    def summary(self) -> str:
        verdict = "found" if self.found else "not found"
        line = (f"video face watermark: {verdict}: {self.agreeing} of {self.frames_with_faces} "
                f"frames with a readable face agree (needed {self.needed}; {self.frames} "
                "frames read)")
        if self.payload:
            line += f"; decoded payload {self.payload}"
        if self.match_z is not None:
            line += (f"; payload {self.expected} "
                     f"{'matches' if self.payload_matches else 'does NOT match'} (z = "
                     f"{self.match_z:.1f}, threshold {face_mark.MATCH_Z:.2f}; "
                     f"{100 * self.match_fraction:.0f}% of agreeing frames match alone)")
        return line

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__},
                "payload_matches": self.payload_matches}


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
    faces_seen, matches, single_pass, total = 0, [], False, 0.0
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
            z, decoded, match, best = max(
                ((*face_mark.score_face(luma, k, key=key, expect=expect), k) for k in readable),
                key=lambda r: r[0])
            scores.append(z)
            single_pass |= z >= image_threshold
            if z >= FRAME_Z:
                if decoded:
                    payloads[decoded] += 1
                if match is not None:
                    matches.append(match)
                    total = total + face_mark.chip_responses(luma, best)
    finally:
        if own is not None:
            own.close()
    read = [s for s in scores if s is not None]
    agreeing = sum(s >= FRAME_Z for s in read)
    needed = needed_frames(len(read), faces_seen / max(len(read), 1))
    found = bool(read) and (agreeing >= needed or single_pass)
    payload = payloads.most_common(1)[0][0] if payloads else None
    fraction = match_z = None
    if expect is not None and matches:
        fraction = sum(m >= face_mark.MATCH_Z for m in matches) / len(matches)
        match_z = face_mark.match_z(total, key=key, expect=expect)
    return ClipMarkResult(found, len(scores), len(read), agreeing, min(needed, len(read) + 1),
                          scores, payload, fraction, expect, match_z)

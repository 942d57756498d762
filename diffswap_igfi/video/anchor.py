"""Where a reader will find each swapped face, without re-detecting it in every frame.

The face watermark is anchored on the keypoints a reader's detector finds on the swapped face
(face_mark.reader_kps), which sit a few pixels from the target's own keypoints (the swapped
face has the source's proportions). That offset, expressed in the face's aligned frame (the
similarity that takes the target's keypoints to the template), barely changes along a track:
the same source shape on the same person. So :class:`MarkAnchors` re-detects the swapped
face on a track's first frame and every ``every`` frames after (kept frame index a multiple
of ``every``), keeps the reader's keypoints in the aligned frame of the planned keypoints, and
in between maps them back through the current frame's own alignment. That removes most of
the per-frame detection (~8 ms of CPU a 720p frame) from the render pass. Its state goes
with each rendered chunk, so a resumed run anchors exactly as an uninterrupted one.

What it costs the mark, measured after H.264 CRF 18 (the clip's payload match z over the
frames, threshold 3.72; frames agreeing of 16) on a 64 px face over six payloads:
re-detected in every frame z 4.9-7.6 (16/16), every 4 frames 4.4-6.9 (16/16), every 12
frames 3.3-6.4 (9-13/16); on a 128 px face at 720p, every frame 5.5-6.1, every 12 frames
4.7-5.3. The reader's detector wobbles by a pixel or so from frame to frame, which
re-detection follows and the offset cannot, and a pixel is a large part of a small face:
faces under ``SMALL_IOD`` pixels between the eyes are re-detected in every frame, larger ones
every ``DEFAULT_EVERY`` (4) frames (~2 ms of CPU a 720p frame instead of ~8).
"""

from __future__ import annotations

import numpy as np

from diffswap_igfi.faces.align import invert_affine, transform_points
from diffswap_igfi.provenance import face_mark

DEFAULT_EVERY = 4
SMALL_IOD = 64.0  # faces narrower than this are re-detected in every frame


class MarkAnchors:
    """Per-track reader keypoints for the face mark. ``detector``: a faces.detect.FaceDetector
    (the pipeline's own)."""

    def __init__(self, detector, every: int = DEFAULT_EVERY) -> None:
        self.detector = detector
        self.every = max(1, every)
        self.aligned: dict[int, np.ndarray] = {}  # track -> [5,2] reader kps, aligned frame

    def __call__(self, index: int, rgb: np.ndarray, track: int, kps: np.ndarray
                 ) -> np.ndarray:
        """[5,2] float64 keypoints to anchor the mark of ``track``'s face in frame ``index``.

        rgb: [H,W,3] uint8 the swapped frame; kps: [5,2] the planned (target) keypoints the
        face was swapped at."""
        kps = np.asarray(kps, np.float64)
        affine = face_mark.frame_affine(kps)
        small = face_mark.interocular(kps) < SMALL_IOD
        if small or track not in self.aligned or index % self.every == 0:
            found = face_mark.reader_kps(rgb, kps, self.detector)
            self.aligned[track] = transform_points(found, affine, np.float64)
            return found
        return transform_points(self.aligned[track], invert_affine(affine), np.float64)

    def state(self) -> dict:
        return {str(k): v.tolist() for k, v in self.aligned.items()}

    def load_state(self, state: dict) -> None:
        self.aligned = {int(k): np.asarray(v, np.float64) for k, v in state.items()}

"""Check one video file for our provenance markers: the signed C2PA manifest on the MP4 and the
face watermark aggregated over its frames (see video_mark.detect_clip)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import InputError
from diffswap_igfi.provenance.c2pa_sign import C2paReport, read_c2pa
from diffswap_igfi.provenance.metadata import is_synthetic_source_type
from diffswap_igfi.provenance.video_mark import ClipMarkResult, detect_clip

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
MAX_FRAMES = 48  # frames read per clip, spread evenly over it


@dataclass(frozen=True)
class VideoVerifyReport:
    """What :func:`verify_video` found in one video file."""

    path: Path
    c2pa: C2paReport
    clip: ClipMarkResult

    @property
    def synthetic(self) -> bool:
        manifest = self.c2pa.present and is_synthetic_source_type(self.c2pa.digital_source_type)
        return self.clip.found or manifest

    def lines(self) -> list[str]:
        if self.synthetic:
            verdict = f"{self.path}: SYNTHETIC (marked as made or altered by a generator)"
        else:
            verdict = (f"{self.path}: no synthetic-media marker found "
                       "(this does not prove the video is authentic)")
        return [verdict, "  " + self.c2pa.summary(), "  " + self.clip.summary()]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "synthetic": self.synthetic,
                "c2pa": self.c2pa.to_dict(), "face_mark_clip": self.clip.to_dict()}


def sampled_frames(path: Path, max_frames: int = MAX_FRAMES) -> Iterator[np.ndarray]:
    """Decode up to ``max_frames`` frames spread evenly over the video: [H,W,3] uint8 each."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"{path}: not a readable video ({exc})") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        total = stream.frames or 0
        step = max(1, math.ceil(total / max_frames)) if total else 1
        taken = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % step:
                    continue
                yield frame.to_ndarray(format="rgb24")
                taken += 1
                if taken >= max_frames:
                    return
        except av.error.FFmpegError as exc:
            raise InputError(f"{path}: cannot decode the video ({exc})") from None


def verify_video(path: str | Path, *, detector=None, max_frames: int = MAX_FRAMES
                 ) -> VideoVerifyReport:
    """Read ``path`` (MP4 and other containers PyAV opens) and report its manifest and the
    face watermark over up to ``max_frames`` frames."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    manifest = read_c2pa(path)
    clip = detect_clip(sampled_frames(path, max_frames), detector=detector,
                       expect=manifest.watermark_payload)
    return VideoVerifyReport(path=path, c2pa=manifest, clip=clip)

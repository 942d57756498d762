"""Check one video file for our provenance markers, all four of them: the signed C2PA manifest
(MP4/MOV), the synthetic-media container tags and XMP, the block watermark on each sampled
frame, and the face watermark aggregated over the sampled frames (video_mark.detect_clip,
expecting the manifest's payload). Any one of them makes the verdict SYNTHETIC.

Frames are decoded in order (the whole stream; only the sampled ones are converted to upright
RGB), so memory does not grow with the video's length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import InputError
from diffswap_igfi.io.video import iter_frames, probe_video
from diffswap_igfi.provenance.c2pa_sign import C2paReport, can_sign, read_c2pa
from diffswap_igfi.provenance.metadata import ProvenanceMetadata
from diffswap_igfi.provenance.verify import (
    face_size_note,
    manifest_says_synthetic,
    metadata_line,
    verdict_line,
)
from diffswap_igfi.provenance.video import read_video_metadata
from diffswap_igfi.provenance.video_mark import ClipMarkResult, detect_clip
from diffswap_igfi.provenance.watermark import WatermarkResult, detect_watermark

MAX_FRAMES = 48  # frames read per clip, spread evenly over it


@dataclass(frozen=True)
class VideoVerifyReport:
    """What :func:`verify_video` found in one video file.

    metadata: the container tags/XMP (None when absent); c2pa: the manifest (None when
    skipped; ``present=False`` with a reason for containers that cannot hold one); frames:
    (frame index, block-mark result) per sampled frame; clip: the face mark over the sampled
    frames (None when skipped); total_frames: frames in the video.
    """

    path: Path
    metadata: ProvenanceMetadata | None
    c2pa: C2paReport | None
    frames: list[tuple[int, WatermarkResult]]
    clip: ClipMarkResult | None
    total_frames: int

    @property
    def marked(self) -> int:
        """Sampled frames where the block mark was found."""
        return sum(r.found for _, r in self.frames)

    @property
    def watermark_found(self) -> bool:
        # Each frame's block detector has a false-alarm rate of 1e-6 for any content; over 48
        # frames one hit is still under 5e-5, so one marked frame is evidence.
        return self.marked > 0

    @property
    def synthetic(self) -> bool:
        """True when any marker says synthetic (see verify.VerifyReport.synthetic)."""
        return (bool(self.metadata and self.metadata.synthetic) or self.watermark_found
                or bool(self.clip and self.clip.found) or manifest_says_synthetic(self.c2pa))

    def lines(self) -> list[str]:
        """Human-readable report, one finding per line, verdict first."""
        out = [verdict_line(self.path, self.synthetic, "video")]
        if self.c2pa is not None:
            out.append("  " + self.c2pa.summary())
        best = max((r.score for _, r in self.frames), default=0.0)
        out += ["  " + metadata_line(self.metadata),
                (f"  block watermark: found in {self.marked} of {len(self.frames)} sampled "
                 f"frames (of {self.total_frames}); best z = {best:.1f}")]
        if self.clip is not None:
            line = self.clip.summary()
            if self.clip.match_z is not None:
                manifest = self.c2pa and self.c2pa.watermark_payload == self.clip.expected
                line += f" (named by the {'C2PA manifest' if manifest else 'container tags'})"
            out.append(f"  {line}; {face_size_note()}")
        return out

    def to_dict(self) -> dict:
        return {"path": str(self.path), "synthetic": self.synthetic,
                "c2pa": self.c2pa.to_dict() if self.c2pa else None,
                "metadata": self.metadata.to_dict() if self.metadata else None,
                "watermark": {"frames_sampled": len(self.frames), "frames_marked": self.marked,
                              "total_frames": self.total_frames,
                              "per_frame": [{"frame": i, **r.to_dict()}
                                            for i, r in self.frames]},
                "face_mark_clip": self.clip.to_dict() if self.clip else None}


def read_video_manifest(path: Path) -> C2paReport:
    """The C2PA manifest of a video; for a container C2PA cannot hold (.mkv, .webm, ...) a
    report that says so, without asking c2pa."""
    if not can_sign(path):
        return C2paReport(present=False, error=f"{path.suffix or 'this'} files cannot hold a "
                          "C2PA manifest: only the container tags and the watermarks mark it")
    return read_c2pa(path)


def verify_video(path: str | Path, *, detector=None, max_frames: int = MAX_FRAMES,
                 faces: bool = True, c2pa: bool = True) -> VideoVerifyReport:
    """Read ``path`` (any container PyAV opens) and report its manifest, container tags, the
    block mark on up to ``max_frames`` evenly spaced frames and the face mark over them.

    detector: a faces.detect.FaceDetector to reuse (one is opened and closed otherwise);
    ``faces=False`` / ``c2pa=False`` skip the face mark / the manifest. Raises InputError /
    ImageReadError for a missing or unreadable video.
    """
    path = Path(path)
    if max_frames < 1:
        raise InputError(f"max_frames must be >= 1, got {max_frames}")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    info = probe_video(path)
    metadata = read_video_metadata(path)
    manifest = read_video_manifest(path) if c2pa else None
    expect = ((manifest.watermark_payload if manifest else None)
              or (metadata.details.get("watermark") if metadata else None))
    n = info.frames
    picks = set(np.linspace(0, max(n - 1, 0), min(max_frames, max(n, 1))).round().astype(int))
    blocks: list[tuple[int, WatermarkResult]] = []

    def sampled() -> Iterator[np.ndarray]:
        for frame in iter_frames(info, rgb=lambda i: i in picks):
            if frame.rgb is not None:
                blocks.append((frame.index, detect_watermark(frame.rgb)))
                yield frame.rgb

    if not faces:
        for _ in sampled():
            pass
        return VideoVerifyReport(path, metadata, manifest, blocks, None, n)
    clip = detect_clip(sampled(), detector=detector, expect=expect)
    return VideoVerifyReport(path, metadata, manifest, blocks, clip, n)

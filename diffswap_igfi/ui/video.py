"""What the web UI's Video tab does, without the web: check an uploaded video against the
server's limits, preview one frame with its faces, find the people (tracks) of the whole video,
swap through ``video.job.swap_video`` and verify the written file.

Nothing here tracks or encodes by itself: tracking is ``video.tracking.Tracker`` (with the
settings the swap uses, so the people shown are numbered as the swap numbers them), the swap,
its provenance (container tags and a watermark in every swapped frame) and its encoding are
``swap_video``'s, and the check of the result is ``provenance.verify_video.verify_video``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.errors import InputError
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.video import VideoInfo, frame_to_rgb, iter_frames, probe_video, to_upright
from diffswap_igfi.provenance.verify_video import VideoVerifyReport, verify_video
from diffswap_igfi.ui.service import (
    Session,
    SwapOptions,
    SwapService,
    take_files,
    thumbnail,
)
from diffswap_igfi.video.job import VideoSwapOptions, VideoSwapResult, swap_video
from diffswap_igfi.video.tracking import Tracker

# the CLI's face selectors for a video target (video/plan.py: assign_sources)
VIDEO_SELECTORS = ("largest", "index", "all", "reference")
PREVIEW_SIDE = 960  # the frame preview is shown at most this large
# (fraction done, text) -> None: how a progress display takes an update
Report = Callable[[float, str], None]


@dataclass
class VideoOptions:
    """One video swap request (the CLI's video options, by name). ``engine`` carries the
    engine and its options as the Image tab's requests do (its face fields are unused)."""

    face_selector: str = "largest"
    face_index: int = 0
    reference_distance: float = 0.6
    source_face_index: int | None = None
    crf: int = 18
    trim_start: float | None = None
    trim_end: float | None = None
    smoothing: bool = True
    engine: SwapOptions = field(default_factory=SwapOptions)

    def __post_init__(self) -> None:  # UI numbers arrive as floats
        self.face_index, self.crf = int(self.face_index), int(self.crf)
        self.reference_distance = float(self.reference_distance)
        self.trim_start = float(self.trim_start) if self.trim_start else None
        self.trim_end = float(self.trim_end) if self.trim_end else None

    def check(self) -> None:
        """Raise InputError naming the bad option."""
        if self.face_selector not in VIDEO_SELECTORS:
            raise InputError(f"unknown face selector {self.face_selector!r} for a video: choose "
                             f"one of {', '.join(VIDEO_SELECTORS)}")
        if self.face_index < 0:
            raise InputError(f"face index must be 0 or more, got {self.face_index}")
        if not 0 <= self.crf <= 51:
            raise InputError(f"quality (crf) must be in 0..51, got {self.crf}")
        if self.trim_start is not None and self.trim_start < 0:
            raise InputError(f"trim start must be 0 or more seconds, got {self.trim_start}")
        if self.trim_start is not None and self.trim_end is not None \
                and self.trim_end <= self.trim_start:
            raise InputError(f"trim end ({self.trim_end}) must be after trim start "
                             f"({self.trim_start})")
        self.engine.check()

    def job(self) -> VideoSwapOptions:
        """The video module's options for this request (the CLI's defaults elsewhere)."""
        job = VideoSwapOptions(selector=self.face_selector, index=self.face_index,
                               reference_distance=self.reference_distance,
                               trim_start=self.trim_start, trim_end=self.trim_end,
                               smooth_landmarks=self.smoothing, smooth_colour=self.smoothing)
        return dataclasses.replace(job, encode=dataclasses.replace(job.encode, crf=self.crf))


def check_video(service: SwapService, path: str | None) -> VideoInfo:
    """Probe an uploaded video and hold it to the server's limits (frame pixels, duration,
    frame count). Raises InputError naming the limit and the server option that sets it."""
    if not path:
        raise InputError("no video given: upload a target video")
    info = probe_video(path)
    name = Path(path).name
    h, w = info.upright_size
    if w * h > service.max_pixels:
        raise InputError(f"{name} has {w}x{h} frames, over this server's {service.max_pixels} "
                         f"pixels (--max-pixels): scale it down first")
    if info.duration > service.max_video_seconds:
        raise InputError(f"{name} lasts {info.duration:.1f} s; this server takes at most "
                         f"{service.max_video_seconds:g} s (--max-video-seconds): cut it first")
    if info.frames > service.max_video_frames:
        raise InputError(f"{name} has {info.frames} frames; this server takes at most "
                         f"{service.max_video_frames} (--max-video-frames): cut it first")
    return info


def describe(info: VideoInfo) -> str:
    """One line about a video: size, frames, duration, rate, audio."""
    h, w = info.upright_size
    audio = ", ".join(info.audio_codecs) or "none"
    return (f"{w}x{h}, {info.frames} frames, {info.duration:.2f} s at {float(info.rate):.3g} "
            f"fps ({info.codec}); audio: {audio}")


@dataclass
class VideoPeople:
    """The people (tracks) of one video, found by the Tracker the swap uses.

    rank: track id -> its number for the ``index`` selector (0 = most prominent: largest summed
    face area, as ``plan.assign_sources`` ranks); seen: frame pts -> [(number, box)] of that
    frame; thumbnails: [side,side,3] uint8 of each person's largest face, by number."""

    video: str
    trim: tuple[float | None, float | None]
    rank: dict[int, int]
    seen: dict[int, list[tuple[int, tuple[float, float, float, float]]]]
    thumbnails: list[np.ndarray]

    def gallery(self) -> list[tuple[np.ndarray, str]]:
        return [(t, f"{i}" + (" (largest)" if i == 0 else "")) for i, t in
                enumerate(self.thumbnails)]


class FrameRate:
    """Turns ``swap_video``'s progress calls (pass, frames done, total) into a fraction and a
    line with the frame rate and the time left of the current pass. Updates go to ``report``
    at most every ``every`` seconds (and always at a pass's last frame)."""

    def __init__(self, report: Report, *, every: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.report, self.every, self.clock = report, every, clock
        self.stage: str | None = None
        self.start = self.first = 0.0
        self.last = -float("inf")

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage:  # a new pass (or a resumed one, which starts at ``done``)
            self.stage, self.start, self.first = stage, now, done
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = now - self.start
        fps = (done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / fps if fps > 0 else None
        left = "?" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        self.report(done / max(total, 1),
                    f"{stage}: frame {done} of {total}, {fps:.1f} fps, {left} left")


def find_people(service: SwapService, path: str, *, trim_start: float | None = None,
                trim_end: float | None = None, report: Report | None = None) -> VideoPeople:
    """Track every face of the video (between the trim times) as the swap will, and number
    the people as the ``index`` selector does."""
    info = check_video(service, path)
    progress = FrameRate(report) if report else None
    # frames between the trim times, estimated from the duration (known exactly only after)
    end = min(trim_end or info.duration, info.duration)
    kept = (end - (trim_start or 0.0)) / info.duration if info.duration > 0 else 1.0
    total = max(1, min(info.frames, round(info.frames * kept)))
    thumbs: dict[int, np.ndarray] = {}
    seen: dict[int, list[tuple[int, FaceRecord]]] = {}
    with service.swapper() as swapper:
        tracker = Tracker(swapper.detector, swapper.recognizer.describe,
                          settings=VideoSwapOptions().tracker)
        for frame in iter_frames(info, start=trim_start, end=trim_end):
            found = tracker.step(frame.index, frame.rgb).faces
            seen[frame.pts] = found
            for tid, face in found:
                if tracker.tracks[tid].best is face:  # this person's largest face so far
                    thumbs[tid] = thumbnail(frame.rgb, face)
            if progress:
                progress("finding people", min(frame.index + 1, total), total)
        tracks = list(tracker.tracks.values())
    # as plan.assign_sources ranks them (a stable sort of the tracker's tracks, by area)
    ranked = sorted(tracks, key=lambda t: t.area_sum, reverse=True)
    rank = {t.id: i for i, t in enumerate(ranked)}
    return VideoPeople(str(path), (trim_start, trim_end), rank,
                       {pts: [(rank[tid], tuple(map(float, face.box))) for tid, face in found]
                        for pts, found in seen.items()},
                       [thumbs[t.id] for t in ranked])


def frame_at(service: SwapService, path: str, seconds: float) -> tuple[int, float, np.ndarray]:
    """The first frame at or after ``seconds`` (the last frame when past the end).
    Returns (pts, time in seconds, [H,W,3] uint8 upright RGB)."""
    info = check_video(service, path)
    last = None
    for frame in iter_frames(info, rgb=False):  # only the frame shown is converted
        last = frame
        if frame.time >= seconds - 1e-6:
            break
    if last is None:
        raise InputError(f"{Path(path).name} has no frame to show: re-export it")
    return last.pts, last.time, to_upright(frame_to_rgb(last.raw), info.rotation)


def preview_frame(service: SwapService, path: str, seconds: float,
                  people: VideoPeople | None = None) -> tuple[np.ndarray, str]:
    """A frame with its faces boxed: numbered as people of the whole video when ``people``
    (of this video) is given, else as the faces detected on this frame alone (largest first).
    Returns ([h,w,3] uint8 at most PREVIEW_SIDE, caption)."""
    pts, t, rgb = frame_at(service, path, seconds)
    if people is not None and people.video == str(path):
        boxes = people.seen.get(pts)
        if boxes is None:
            caption = f"{t:.2f} s: outside the trimmed part; no people tracked here"
            boxes = []
        else:
            caption = (f"{t:.2f} s: {len(boxes)} of the video's {len(people.rank)} people "
                       f"(numbers as the index selector counts them)")
        labels = [(f"#{n}", box) for n, box in boxes]
    else:
        with service.swapper() as swapper:
            faces = swapper.detector.detect(rgb)
        labels = [(f"face {i}", tuple(map(float, f.box))) for i, f in enumerate(faces)]
        caption = (f"{t:.2f} s: {len(faces)} face(s) on this frame; press 'Find people' to "
                   f"number the people of the whole video")
    return draw_boxes(rgb, labels), caption


def draw_boxes(rgb: np.ndarray, labels: Sequence[tuple[str, tuple[float, ...]]]) -> np.ndarray:
    """rgb: [H,W,3] uint8; labels: (text, (x0, y0, x1, y1) in its pixels). Returns a copy at
    most PREVIEW_SIDE on its long side, [h,w,3] uint8, with the boxes drawn."""
    scale = min(1.0, PREVIEW_SIDE / max(rgb.shape[:2]))
    image = rgb if scale == 1.0 else cv2.resize(
        rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
        interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image).copy()
    thick = max(1, round(max(image.shape[:2]) / 320))
    for text, box in labels:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        cv2.rectangle(image, (x0, y0), (x1, y1), (255, 210, 0), thick, cv2.LINE_AA)
        cv2.putText(image, text, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thick, (255, 210, 0), thick, cv2.LINE_AA)
    return image


@dataclass
class VideoSwapDone:
    """path: the written video; report: verify_video of it (under its own name); run: what
    swap_video reported (frames, swapped frames, tracks, seconds per pass)."""

    path: Path
    report: VideoVerifyReport
    run: VideoSwapResult


def swap_video_file(service: SwapService, session: Session, source_paths: Sequence[str],
                    video_path: str, options: VideoOptions, *, reference_path: str | None = None,
                    mix_paths: Sequence[str] = (), report: Report | None = None
                    ) -> VideoSwapDone:
    """Swap the source photo(s) onto the chosen people of the video and write an MP4 (H.264,
    the input's audio copied) into the session's folder, through ``swap_video``."""
    options.check()
    source_paths = take_files(session, source_paths, video_path, options.face_selector,
                              reference_path, mix_paths)
    check_video(service, video_path)
    engine = service.engine(options.engine, mix_paths)
    out = session.next_path(Path(video_path).stem, "mp4")
    progress = FrameRate(report) if report else False
    with service.swapper() as swapper:
        sources = [swapper.source(service.load(p), options.source_face_index)
                   for p in source_paths]
        reference = None
        if options.face_selector == "reference":
            ref = swapper.source(service.load(reference_path))
            reference = swapper.recognizer.describe(ref.image.rgb, ref.face)
        with service.engine_lock(options.engine):
            swapper.engine = engine
            run = swap_video(swapper, sources, Path(video_path), out, options=options.job(),
                             reference=reference, progress=progress, log=lambda _: None)
    if report:
        report(1.0, "checking the written file's provenance")
    found = verify_video(out)
    return VideoSwapDone(out, dataclasses.replace(found, path=Path(out.name)), run)

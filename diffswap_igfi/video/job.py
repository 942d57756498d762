"""Swap faces in a video: track, plan, render in chunks, mux; resumable, bounded memory.

Two passes over the video, each in chunks of ``chunk_frames`` frames kept on disk in a hidden
work folder beside the output (``.NAME.parts``):

1. **track**: decode, detect (crops around known faces, full frames now and then), link faces
   into tracks; each chunk's observations and the tracker's state go to ``track/NNNNN.npz``.
2. **render**: choose the tracks to swap and one source each (face selection over the whole
   video), then decode again and, frame by frame, swap the planned faces (landmarks bridged
   and smoothed, colour offset smoothed per track), mark the swapped pixels (face mark anchored
   with the swapper's own detector, then the block mark; one payload per clip) and encode;
   each chunk goes to ``video/NNNNN.nut``. Frames without a planned face are passed through
   without an RGB round trip.

Finally the chunks and the input's audio are muxed with the synthetic-media container tags and,
for MP4/MOV, signed with a C2PA manifest (the input as parent ingredient, the frames' payload)
into the output, atomically (provenance.video.write_synthetic_video), and the work folder is
removed. Every file in the work folder appears by an atomic rename once complete, so a killed
run (even SIGKILL) loses at most the chunk in progress: ``resume=True`` skips every chunk
already on disk; signing happens once, at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.errors import DiffSwapError, InputError
from diffswap_igfi.io.video import (
    CHUNK_SUFFIX,
    OUTPUT_FORMATS,
    ChunkWriter,
    EncodeSettings,
    VideoInfo,
    frame_to_rgb,
    iter_frames,
    mux_chunks,
    probe_video,
    to_upright,
)
from diffswap_igfi.provenance.c2pa_sign import can_sign, check_signing_keys
from diffswap_igfi.provenance.video import write_synthetic_video
from diffswap_igfi.provenance.video_mark import mark_frame
from diffswap_igfi.swapper import Source, Swapper
from diffswap_igfi.video.anchor import MarkAnchors
from diffswap_igfi.video.bounded import (
    DEFAULT_MAX_IOD,
    MIN_WORK_IOD,
    WarmState,
    swap_face_bounded,
)
from diffswap_igfi.video.pipeline import Worker, prefetch
from diffswap_igfi.video.plan import AnalysisChunk, Assignment, Planner, assign_sources
from diffswap_igfi.video.smoothing import ColourSmoother, OneEuroSettings
from diffswap_igfi.video.tracking import Track, Tracker, TrackerSettings

WORK_VERSION = 4
ProgressCallback = Callable[[str, int, int], None]  # (pass name, frames done, frames in all)


@dataclass
class VideoSwapOptions:
    """Everything that shapes the result (the work folder is only resumed when these match).

    selector/index/reference_distance: face selection over tracks (see plan.assign_sources);
    trim_start/trim_end: seconds of the input to keep (end excluded); chunk_frames: frames per
    resumable chunk (at least max_gap + 1); smooth_landmarks / smooth_colour: stability filters;
    smooth_window / expression_window: landmarks are a centred local fit in time (the video is
    known in advance, so the fit looks both ways and follows a moving face without lag),
    split into the head's motion in the image (an affine, fitted over ``smooth_window`` frames
    either side, as are the points expressions barely move) and the face's own motion (the
    lips, eyes, brows, irises and jaw: over ``expression_window``), see
    smoothing.rigid_local_fit; ``smooth_window`` 0 uses the causal one-euro filter
    (``smoothing``) instead;
    max_iod: faces are swapped at most this many pixels between the eyes (video/bounded.py),
    and no finer than the source face (down to MIN_WORK_IOD).
    """

    selector: str = "largest"
    index: int = 0
    reference_distance: float = 0.6
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    trim_start: float | None = None
    trim_end: float | None = None
    chunk_frames: int = 48
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    smoothing: OneEuroSettings = field(default_factory=OneEuroSettings)
    smooth_window: int = 8
    expression_window: int = 4
    smooth_landmarks: bool = True
    smooth_colour: bool = True
    colour_rate: float = 0.3
    max_iod: float = DEFAULT_MAX_IOD


@dataclass
class VideoSwapResult:
    output: Path
    frames: int
    swapped_frames: int
    tracks: int
    swapped_tracks: list[int]
    seconds: dict[str, float]


def work_folder(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def check_video_output(output: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that is an input, a folder, of an unsupported extension, or exists
    (without ``force``)."""
    from diffswap_igfi.io.images import check_output_path

    check_output_path(output, inputs, force=force, extensions=OUTPUT_FORMATS.keys())


class _Progress:
    """A tqdm bar on stderr (``enabled`` True), nothing (False), or calls of ``enabled(desc,
    frames done, total)`` after each update (a caller's own display, e.g. the web UI's)."""

    def __init__(self, total: int, desc: str, enabled: bool | ProgressCallback) -> None:
        from tqdm import tqdm

        self.report = enabled if callable(enabled) else None
        self.desc, self.total, self.done = desc, total, 0
        self.bar = tqdm(total=total, desc=desc, unit="frame",
                        disable=not enabled or self.report is not None,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        if self.report is not None:
            self.done += n
            self.report(self.desc, self.done, self.total)

    def close(self) -> None:
        self.bar.close()


def swap_video(swapper: Swapper, sources: Sequence[Source], target: Path, output: Path, *,
               options: VideoSwapOptions | None = None, reference: np.ndarray | None = None,
               face_map: Sequence[tuple[np.ndarray, Sequence[Source]]] = (),
               resume: bool = False, progress: bool | ProgressCallback = True,
               log: Callable[[str], None] = print, c2pa_cert: str | Path | None = None,
               c2pa_key: str | Path | None = None) -> VideoSwapResult:
    """Swap ``sources`` onto the selected people of the video ``target``, writing ``output``.

    reference: [D] dlib descriptor of the person to replace (selector ``reference``);
    face_map: (descriptor, sources) pairs for several people. The output's container and codec
    follow its extension and ``options.encode``. progress: tqdm bars on stderr (True), none
    (False), or a function called as ``progress("tracking" | "swapping", done, total)`` after
    each frame. c2pa_cert/c2pa_key: an organisation's PEM chain and key for the C2PA manifest
    (MP4/MOV; default: the local keys), checked before any work. Raises InputError (unreadable
    video, no face), OutputError (cannot write), ConfigError (unusable signing keys). A
    DiffSwapError removes the work folder; an interruption keeps it for ``resume``.
    """
    options = options or VideoSwapOptions()
    if options.chunk_frames <= options.tracker.max_lost:
        raise InputError(f"--chunk-frames must be more than {options.tracker.max_lost} (the "
                         f"longest bridged gap), got {options.chunk_frames}")
    engine = swapper.engine
    output = Path(output)
    info = probe_video(target)
    if can_sign(output):
        check_signing_keys(c2pa_cert, c2pa_key)
    work = work_folder(output)
    stamp = _fingerprint(info, sources, options, reference, face_map, engine)
    try:
        if resume and _manifest_matches(work, stamp):
            log(f"resuming from {work}")
        else:
            if work.exists():
                if resume:
                    log(f"{work} belongs to another input or other options: starting over")
                shutil.rmtree(work)
            (work / "track").mkdir(parents=True)
            (work / "video").mkdir()
            _write_json(work / "manifest.json", stamp)
        # one watermark payload per clip (the C2PA manifest names it too), the same after a
        # resume
        payload = _clip_payload(info.path, stamp)
        seconds: dict[str, float] = {}
        start, cpu = time.perf_counter(), time.process_time()
        with _one_blas_thread(), _one_opencv_thread():
            frames, tracks = _track_pass(swapper, info, work, options, progress)
        seconds["track"] = time.perf_counter() - start
        seconds["cpu_track_pass"] = time.process_time() - cpu  # all threads
        if frames == 0:
            raise InputError(f"{target} has no frame between --trim-start and --trim-end")
        assignment = assign_sources(tracks, sources, selector=options.selector,
                                    index=options.index, reference=reference,
                                    reference_distance=options.reference_distance,
                                    face_map=face_map, what=target.name)
        start = time.perf_counter()
        with _one_blas_thread(), _one_opencv_thread():
            swapped = _render_pass(swapper, info, work, options, assignment, frames, progress,
                                   payload, seconds)
        seconds["render"] = time.perf_counter() - start
        start = time.perf_counter()
        chunks = sorted((work / "video").glob(f"*{CHUNK_SUFFIX}"))
        trimmed = bool(options.trim_start or options.trim_end)
        trim = (float(_first_kept_pts(work) * info.time_base), options.trim_end) if trimmed \
            else None
        write_synthetic_video(
            output, lambda path, tags: mux_chunks(chunks, info, path, metadata=tags, trim=trim,
                                                  log=log),
            digital_source_type=engine.digital_source_type, engine=engine.name,
            parent_path=info.path, watermark_payload=payload, c2pa_cert=c2pa_cert,
            c2pa_key=c2pa_key, scratch=work)
        seconds["mux"] = time.perf_counter() - start
    except DiffSwapError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return VideoSwapResult(output, frames, swapped, len(tracks), sorted(assignment.sources),
                           seconds)


def _one_blas_thread():
    """BLAS on one thread while the passes run: their stages are threads of their own, and
    OpenBLAS's threads on the watermark's small matrix products (8x8 DCT blocks) cost ~3x the
    CPU time and more wall time on two busy cores (measured: the marks 28 -> 9 ms a 720p
    frame). One thread also fixes the products' summation order, whatever the machine's core
    count."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def _one_opencv_thread():
    """OpenCV's own parallel loops off while the passes run: the passes' stages already keep
    both cores busy, and OpenCV splitting each small resize/remap/blur of a face crop over
    its worker threads only adds their hand-over to the swap stage's critical path."""
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _fingerprint(info: VideoInfo, sources, options, reference, face_map, engine) -> dict:
    stat = info.path.stat()
    h = hashlib.sha256()
    for src in list(sources) + [s for _, group in face_map for s in group]:
        h.update(np.ascontiguousarray(src.image.rgb).tobytes())
        h.update(src.face.landmarks.tobytes())
    for arr in ([reference] if reference is not None else []) + [r for r, _ in face_map]:
        h.update(np.asarray(arr, np.float64).tobytes())
    return {"version": WORK_VERSION, "input": str(info.path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "options": json.loads(json.dumps(asdict(options))),
            "sources": h.hexdigest(), "engine": repr(engine)}


def _clip_payload(path: Path, stamp: dict) -> str:
    """The watermark payload of a run (8 hex digits): from the input's first MiB, its size,
    the sources, options and engine, not from where the file lies or when it was written, so
    the same swap gives the same payload (and the same output) on any machine, in any folder.
    (The payload's pattern changes how strongly the face mark reads on a small face after
    H.264 by a factor of ~3, so a payload drawn anew per folder made that strength vary from
    run to run.)"""
    fixed = {k: v for k, v in stamp.items() if k not in ("input", "mtime_ns")}
    h = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:8]


def _manifest_matches(work: Path, stamp: dict) -> bool:
    try:
        return json.loads((work / "manifest.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _chunk_name(k: int, suffix: str) -> str:
    return f"{k:05d}{suffix}"


def _track_pass(swapper: Swapper, info: VideoInfo, work: Path, options: VideoSwapOptions,
                progress: bool | ProgressCallback) -> tuple[int, list[Track]]:
    """Run (or finish) the tracking pass. Returns (kept frame count, every track)."""
    folder = work / "track"
    done_marker = folder / "done.json"
    tracker = Tracker(swapper.detector, swapper.recognizer.describe, settings=options.tracker)
    if done_marker.exists():
        summary = json.loads(done_marker.read_text())
        tracker.load_state(summary["state"])
        return summary["frames"], list(tracker.tracks.values())
    done = sorted(folder.glob("*.npz"))
    # chunks are complete files (atomic rename), so the last one on disk is whole; every chunk
    # but the video's last holds exactly chunk_frames frames
    frames = 0
    if done:
        last = AnalysisChunk.load(done[-1])
        tracker.load_state(last.tracker_state)
        frames = last.first + len(last.pts)
    c = options.chunk_frames
    bar = _Progress(info.frames, "tracking", progress)
    bar.update(min(frames, info.frames))
    pts: list[int] = []
    observations: list = []
    start = frames

    def save(state: dict) -> None:
        AnalysisChunk.build(frames - len(pts), pts, observations, state).save(
            folder / _chunk_name((frames - 1) // c, ".npz"))
        pts.clear()
        observations.clear()

    # decoding (and the RGB conversion of measured frames) runs a frame or so ahead, on its
    # own thread; a chunk is saved when the next one's first frame arrives, so the video's
    # last frame, measured or not, is always measured before its chunk is written
    decoded = prefetch(lambda: iter_frames(info, start=options.trim_start,
                                           end=options.trim_end, first_index=start,
                                           rgb=tracker.on_stride), name="track-decode")
    last = None
    try:
        for frame in decoded:
            if pts and frame.index % c == 0:
                save(tracker.state())
            measured = frame.rgb is not None or tracker.wants(frame.index)
            if measured:
                rgb = frame.rgb if frame.rgb is not None else upright_rgb(frame, info)
                seen = tracker.step(frame.index, rgb)
                observations.extend((frame.index, tid, face) for tid, face in seen.faces)
            pts.append(frame.pts)
            frames = frame.index + 1
            last = (frame, measured)
            bar.update()
    finally:
        decoded.close()
    if last is not None and not last[1]:
        seen = tracker.step(last[0].index, upright_rgb(last[0], info))
        observations.extend((last[0].index, tid, face) for tid, face in seen.faces)
    if pts:
        save(tracker.state())
    bar.close()
    _write_json(done_marker, {"frames": frames, "state": tracker.state()})
    return frames, list(tracker.tracks.values())


def upright_rgb(frame, info: VideoInfo) -> np.ndarray:
    """[H,W,3] uint8 upright RGB of a DecodedFrame decoded without it."""
    return to_upright(frame_to_rgb(frame.raw), info.rotation)


def _first_kept_pts(work: Path) -> int:
    first = min((work / "track").glob("*.npz"))
    with np.load(first) as z:
        return int(z["pts"][0]) if len(z["pts"]) else 0


def _render_pass(swapper: Swapper, info: VideoInfo, work: Path, options: VideoSwapOptions,
                 assignment: Assignment, frames: int, progress: bool | ProgressCallback,
                 payload: str, cpu: dict[str, float] | None = None) -> int:
    """Render every chunk not on disk yet, in one decoding pass, marking swapped frames with
    ``payload`` (8 hex digits). Returns the number of frames with a swapped face. ``cpu``
    receives each stage's CPU seconds (``cpu_decode``, ``cpu_swap``, ``cpu_mark``,
    ``cpu_encode``: time.thread_time of its thread, for profiling).

    Three stages on their own threads (video/pipeline.py): decoding (with the plan of each
    frame and, for frames with a face to swap, the RGB conversion), swapping (engine and
    colour smoothing, in the caller's thread), and marking + encoding. Each keeps its state
    in frame order, so the output does not depend on the threads' timing."""
    track_files = sorted((work / "track").glob("*.npz"))
    video = work / "video"
    smoothing = options.smoothing if options.smooth_landmarks else OneEuroSettings(
        min_cutoff=1e6, beta=0.0)
    planner = Planner(list(assignment.sources), info.upright_size, info.time_base,
                      max_gap=options.tracker.max_lost, smoothing=smoothing,
                      window=min(options.smooth_window, options.chunk_frames)
                      if options.smooth_landmarks else 0,
                      expression_window=options.expression_window)
    colour = ColourSmoother(rate=options.colour_rate if options.smooth_colour else 1.0)
    anchors = MarkAnchors(swapper.detector)
    # engines with per-track state (the diffusion engine: a seed per track, and each frame
    # warm-started from the track's previous one); warm: track -> its last WarmState
    per_track = getattr(swapper.engine, "for_track", None)
    engines = {t: per_track(t) for t in assignment.sources} if per_track else {}
    warm: dict[int, WarmState] = {}
    trimmed = bool(options.trim_start or options.trim_end)
    shift = _first_kept_pts(work) if trimmed else 0

    def chunk_files(k: int) -> tuple[Path, Path, Path]:
        return (video / _chunk_name(k, CHUNK_SUFFIX), video / _chunk_name(k, ".state.json"),
                video / _chunk_name(k, ".warm.npz"))

    # The planner carries filter state from chunk to chunk, so it runs over the chunks already
    # rendered too (cheap: no decoding). Plans are made one chunk ahead of use and dropped
    # after, so memory does not grow with the video's length.
    loaded = {0: AnalysisChunk.load(track_files[0])}
    swapped = 0

    def plan(k: int) -> dict:
        nonlocal swapped
        if k + 1 < len(track_files):
            loaded[k + 1] = AnalysisChunk.load(track_files[k + 1])
        result = planner.plan(loaded.pop(k), loaded.get(k + 1))
        swapped += len(result)
        return result

    first = 0
    while first < len(track_files) and all(f.exists() for f in chunk_files(first)):
        plan(first)
        first += 1
    if first == len(track_files):
        return swapped
    if first:
        state = json.loads(chunk_files(first - 1)[1].read_text())
        colour.load_state(state["colour"])
        anchors.load_state(state["anchors"])
        warm = _load_warm(chunk_files(first - 1)[2])
    c = options.chunk_frames
    bar = _Progress(frames, "swapping", progress)
    bar.update(first * c)

    cpu = {} if cpu is None else cpu
    for name in ("cpu_decode", "cpu_swap", "cpu_mark", "cpu_encode"):
        cpu[name] = 0.0

    def planned_frames():
        """(frame, its planned faces) in order; the plan is made as each chunk begins."""
        wanted: dict = {}
        k = first - 1
        started = time.thread_time()

        def needs_rgb(index: int) -> bool:  # runs in this same (decoding) thread
            nonlocal wanted, k
            if index >= (k + 1) * c:
                k = index // c
                wanted = plan(k)
            return index in wanted

        for frame in iter_frames(info, start=options.trim_start, end=options.trim_end,
                                 first_index=first * c, rgb=needs_rgb):
            cpu["cpu_decode"] = time.thread_time() - started
            yield frame, wanted.get(frame.index)

    writer: ChunkWriter | None = None

    def encode(item) -> None:
        """Mark (swapped frames) and encode one frame; close a chunk as the next begins."""
        nonlocal writer
        kind, k, frame, image, faces, region, colour_state = item
        started = time.thread_time()
        if kind == "end":
            writer.close()
            _save_warm(chunk_files(k)[2], colour_state["warm"])
            _write_json(chunk_files(k)[1], {"colour": colour_state["colour"],
                                            "anchors": anchors.state()})
            writer = None
            return
        if writer is None:
            writer = ChunkWriter(chunk_files(k)[0], info, options.encode)
        if image is None:
            writer.write_raw(frame.raw, frame.pts - shift)
            cpu["cpu_encode"] += time.thread_time() - started
            return
        kps = [anchors(frame.index, image, track, face.kps) for track, face in faces]
        marked = mark_frame(image, kps, region, payload=payload)
        marking = time.thread_time()
        cpu["cpu_mark"] += marking - started
        writer.write_rgb(marked, frame.pts - shift, frame.raw.duration)
        cpu["cpu_encode"] += time.thread_time() - marking

    encoder = Worker(encode, depth=3, name="mark-encode")
    decoded = prefetch(planned_frames, depth=3, name="render-decode")
    k = first
    try:
        for frame, faces in decoded:
            if frame.index >= (k + 1) * c:
                encoder.put(("end", k, None, None, None, None,
                             {"colour": colour.state(), "warm": dict(warm)}))
                k += 1
            if faces:
                started = time.thread_time()
                image, region = _swap_frame(swapper, frame.rgb, faces, assignment, colour,
                                            options.max_iod, engines, warm)
                cpu["cpu_swap"] += time.thread_time() - started
                encoder.put(("frame", k, frame, image, faces, region, None))
            else:
                warm.clear()  # a warm start only carries over from the frame just before
                encoder.put(("frame", k, frame, None, None, None, None))
            bar.update()
        encoder.put(("end", k, None, None, None, None,
                     {"colour": colour.state(), "warm": dict(warm)}))
        encoder.finish()
        if k + 1 < len(track_files):
            raise InputError(f"{info.path} decoded to fewer frames the second time (chunk {k} "
                             f"of {len(track_files)}): re-export it")
    except BaseException:
        encoder.abort()
        if writer is not None:
            writer.abort()
        raise
    finally:
        decoded.close()
        bar.close()
    return swapped


def _swap_frame(swapper: Swapper, rgb: np.ndarray, faces, assignment: Assignment,
                colour: ColourSmoother, max_iod: float, engines: dict | None = None,
                warm: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Swap each planned face with its track's source (on a crop, at a bounded resolution)
    and smooth its colour. rgb: [H,W,3] uint8, the decoded frame (changed in place);
    engines: track -> its own engine (DiffusionEngine.for_track), when the engine has one;
    warm: track -> WarmState, read and updated for those tracks (their previous swap starts
    this one's sampling; tracks not in this frame are dropped from it). Returns (the swapped
    frame, [H,W] bool the pixels any swap touched)."""
    region = np.zeros(rgb.shape[:2], bool)
    engines = engines or {}
    for track, face in faces:
        source = assignment.sources[track]
        # no finer than the source face itself: its texture holds no more detail than that
        work_iod = min(max_iod, max(MIN_WORK_IOD, source.face.interocular))
        engine = engines.get(track)
        crop, alpha, (x0, y0, x1, y1), state = swap_face_bounded(
            swapper, rgb, face, source, max_iod=work_iod, engine=engine,
            warm=None if engine is None or warm is None else warm.get(track))
        if engine is not None and warm is not None:
            warm[track] = state
        crop = colour(track, crop, rgb[y0:y1, x0:x1], alpha)
        rgb[y0:y1, x0:x1] = crop
        region[y0:y1, x0:x1] |= alpha > 0
    if warm is not None:  # a track missing from this frame starts cold when it comes back
        for track in set(warm) - {t for t, _ in faces}:
            del warm[track]
    return rgb, region


def _save_warm(path: Path, warm: dict) -> None:
    """Each track's WarmState at a chunk's end (empty for engines without one), atomically."""
    arrays = {}
    for track, state in warm.items():
        arrays[f"image_{track}"] = state.image
        arrays[f"kps_{track}"] = state.kps
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_warm(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        tracks = sorted(int(name[6:]) for name in z.files if name.startswith("image_"))
        return {t: WarmState(z[f"image_{t}"], z[f"kps_{t}"]) for t in tracks}

"""What the web UI does, without the web: detect target faces, swap, write the marked file,
verify it. Gradio-free, so it is tested and reused (API, future video tab) as plain Python.

Every result is written through ``provenance.write.write_synthetic_image``: no option here turns
provenance off. Limits match the CLI (``io.images.DEFAULT_MAX_PIXELS``).
"""

from __future__ import annotations

import dataclasses
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.errors import InputError
from diffswap_igfi.faces.detect import select_faces
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image
from diffswap_igfi.io.video import is_video_path
from diffswap_igfi.provenance.verify import VerifyReport, verify_image
from diffswap_igfi.provenance.verify_video import VideoVerifyReport, verify_video
from diffswap_igfi.provenance.write import write_synthetic_image
from diffswap_igfi.swapper import FaceSelection, Source, Swapper, choose_source
from diffswap_igfi.ui.server import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_SECONDS

ENGINES = ("geometric", "diffusion")
# "picked" = the faces clicked in the UI (API: face_indices); the others as in the CLI
UI_SELECTORS = ("largest", "all", "picked", "reference")
OUTPUT_FORMATS = ("png", "jpg", "webp")
MAX_SOURCES = 8
THUMBNAIL_SIDE = 160


@dataclass
class SwapOptions:
    """One swap request, as the UI and the API pass it (the CLI's swap options, by name)."""

    engine: str = "geometric"
    face_selector: str = "largest"
    face_indices: tuple[int, ...] = ()
    reference_distance: float = 0.6
    source_face_index: int | None = None
    # geometric engine
    blend: str = "laplacian"
    keep_mouth_interior: str = "auto"
    # diffusion engine
    checkpoint: str = ""
    steps: int = 30
    guidance: float = 3.0
    seed: int = 0
    device: str = "cpu"
    warm_start: float | None = None
    refine: bool = True
    mix_mode: str = "blocks"
    mix_weight: float = 0.5
    output_format: str = "png"

    def __post_init__(self) -> None:
        # UI sliders and numbers arrive as floats
        self.steps, self.seed = int(self.steps), int(self.seed)
        self.guidance, self.mix_weight = float(self.guidance), float(self.mix_weight)
        self.reference_distance = float(self.reference_distance)
        self.warm_start = float(self.warm_start) if self.warm_start else None

    def check(self) -> None:
        """Raise InputError naming the bad option (the UI shows it as one line)."""
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.face_selector not in UI_SELECTORS:
            raise InputError(f"unknown face selector {self.face_selector!r}: choose one of "
                             f"{', '.join(UI_SELECTORS)}")
        if self.face_selector == "picked" and not self.face_indices:
            raise InputError("no face picked: click one or more face thumbnails, or choose "
                             "another face selector")
        if self.output_format not in OUTPUT_FORMATS:
            raise InputError(f"unknown output format {self.output_format!r}: choose one of "
                             f"{', '.join(OUTPUT_FORMATS)}")
        if self.engine == "diffusion":
            if self.steps < 1:
                raise InputError(f"steps must be positive, got {self.steps}")
            if self.warm_start is not None and not 0.0 < self.warm_start <= 1.0:
                raise InputError(f"warm start must be in (0, 1], got {self.warm_start}")
            if not 0.0 <= self.mix_weight <= 1.0:
                raise InputError(f"mix weight must be in [0, 1], got {self.mix_weight}")


def take_files(session: Session, source_paths: Sequence[str] | None, target_path: str | None,
               face_selector: str, reference_path: str | None = None,
               mix_paths: Sequence[str] = ()) -> list[str]:
    """Check a swap request's files (sources given and not too many; a reference photo for
    the reference selector) and record them as the session's uploads. Returns the source
    paths given."""
    sources = [p for p in source_paths or [] if p]
    if not sources:
        raise InputError("no source photo: upload at least one photo of the new face")
    if len(sources) > MAX_SOURCES:
        raise InputError(f"{len(sources)} source photos: use at most {MAX_SOURCES}")
    if face_selector == "reference" and not reference_path:
        raise InputError("the reference selector needs a reference photo of the person to "
                         "replace: upload one")
    session.uploads.update(str(p) for p in [*sources, target_path, reference_path, *mix_paths]
                           if p)
    return sources


def parse_indices(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """'0, 2' or [0, 2] -> (0, 2); '' or None -> ()."""
    if text is None:
        return ()
    if not isinstance(text, str):
        return tuple(int(i) for i in text)
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"face indices must be numbers like '0, 2', got {text!r}") from None


@dataclass
class Session:
    """One browser tab or API client: a private folder for its results, removed at its end.

    ``uploads`` are the paths this session handed in; those inside ``upload_root`` (the
    server's upload folder) are removed with it. Nothing outside ``upload_root`` is ever
    deleted: an in-process caller may hand in the user's own photos.
    """

    folder: Path
    upload_root: Path | None = None
    key: str | None = None
    uploads: set[str] = field(default_factory=set)
    count: int = 0

    def next_path(self, stem: str, suffix: str) -> Path:
        self.count += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "image"
        return self.folder / f"{safe}_swapped_{self.count}.{suffix}"

    def close(self, keep: set[str] = frozenset()) -> None:
        """Remove the folder and the uploads, except those in ``keep`` (uploads other live
        sessions use: Gradio stores identical uploads once, under their content hash)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        root = self.upload_root.resolve() if self.upload_root is not None else None
        for upload in self.uploads - set(keep):
            path = Path(upload).resolve()
            if root is None or root == path or root not in path.parents:
                continue
            path.unlink(missing_ok=True)
            try:  # Gradio keeps each upload alone in a folder named by its hash
                path.parent.rmdir()
            except OSError:
                pass
        self.uploads.clear()


@dataclass
class DetectedFaces:
    """The faces found in one target upload (largest first), kept so a swap of faces the user
    picked uses exactly those records instead of detecting again."""

    target: str
    faces: list[FaceRecord]


@dataclass
class SwapResult:
    """path: the written, marked file; report: verify_image of it; faces: how many target faces
    were swapped."""

    path: Path
    report: VerifyReport
    faces: int


class SwapService:
    """Shared by all sessions: a pool of Swappers (one per concurrent request, since a MediaPipe
    graph serves one caller at a time), loaded diffusion pipelines, and the limits."""

    def __init__(self, root: Path, *, upload_root: Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, concurrency: int = 2,
                 max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS,
                 max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> None:
        """root: where session folders go; upload_root: the server's upload folder, whose
        files a closing session may delete (None: delete no upload); max_pixels: of a photo
        or a video frame; max_video_seconds / max_video_frames: longest video taken."""
        self.root = Path(root)
        self.upload_root = upload_root
        self.max_pixels = max_pixels
        self.max_video_seconds = max_video_seconds
        self.max_video_frames = max_video_frames
        self.concurrency = concurrency
        self._idle: queue.LifoQueue[Swapper] = queue.LifoQueue()
        self._all: list[Swapper] = []
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._diffusion: dict[tuple[str, str], object] = {}
        self._diffusion_lock = threading.Lock()

    # sessions ---------------------------------------------------------------------------------
    def new_session(self, key: str | None = None) -> Session:
        """A session with a fresh folder; with ``key`` (Gradio's session hash) it can be ended
        by key when its browser tab closes."""
        folder = Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
        session = Session(folder, self.upload_root, key)
        if key is not None:
            with self._sessions_lock:
                self._sessions[key] = session
        return session

    def end_session(self, key: str | None) -> None:
        """Remove a session's folder and uploads (a no-op for an unknown or ended one)."""
        with self._sessions_lock:
            session = self._sessions.pop(key, None) if key is not None else None
            in_use = set().union(*(s.uploads for s in self._sessions.values()))
        if session is not None:
            session.close(keep=in_use)

    # the pool -----------------------------------------------------------------------------------
    @contextmanager
    def swapper(self) -> Iterator[Swapper]:
        """A Swapper for this thread alone; at most ``concurrency`` at a time."""
        with self._slots:
            try:
                swapper = self._idle.get_nowait()
            except queue.Empty:
                swapper = Swapper()
                with self._pool_lock:
                    self._all.append(swapper)
            try:
                yield swapper
            finally:
                self._idle.put(swapper)

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()
        with self._pool_lock:
            for swapper in self._all:
                swapper.close()
            self._all.clear()

    # steps ------------------------------------------------------------------------------------
    def load(self, path: str | Path) -> LoadedImage:
        if not path:
            raise InputError("no image given: upload a photo")
        return load_image(path, max_pixels=self.max_pixels)

    def detect(self, target_path: str) -> tuple[DetectedFaces, list[tuple[np.ndarray, str]]]:
        """Faces of a target photo and their thumbnails ([h,w,3] uint8, caption), largest
        first."""
        target = self.load(target_path)
        with self.swapper() as swapper:
            faces = swapper.faces(target)
        return DetectedFaces(str(target_path), faces), [
            (thumbnail(target.rgb, face), f"{i}" + (" (largest)" if i == 0 else ""))
            for i, face in enumerate(faces)]

    def swap(self, session: Session, source_paths: Sequence[str], target_path: str,
             options: SwapOptions, *, reference_path: str | None = None,
             mix_paths: Sequence[str] = (), detected: DetectedFaces | None = None) -> SwapResult:
        """Swap the identity of the source photos onto the chosen faces of the target and write
        the marked result into the session's folder."""
        options.check()
        source_paths = take_files(session, source_paths, target_path, options.face_selector,
                                  reference_path, mix_paths)
        target = self.load(target_path)
        engine = self.engine(options, mix_paths)
        with self.swapper() as swapper:
            sources = [swapper.source(self.load(p), options.source_face_index)
                       for p in source_paths]
            if detected is not None and detected.target == str(target_path):
                faces = detected.faces
            else:
                faces = swapper.faces(target)
            chosen = self._select(swapper, target, faces, options, reference_path)
            pairs = [(face, choose_source(face, sources)) for face in chosen]
            with self.engine_lock(options):
                swapper.engine = engine
                result = swapper.swap_pairs(target.rgb, pairs)
            out = session.next_path(Path(target_path).stem, options.output_format)
            # as the CLI writes: the face mark anchored on the swapped faces (found again by
            # this swapper's detector), the target as the C2PA parent ingredient
            write_synthetic_image(out, result.image, result.alpha > 0,
                                  digital_source_type=engine.digital_source_type,
                                  engine=engine.name, alpha=target.alpha,
                                  icc_profile=target.icc_profile, faces=result.faces,
                                  parent_path=Path(target_path), detector=swapper.detector)
        return SwapResult(out, verify(out), len(chosen))

    def _select(self, swapper: Swapper, target: LoadedImage, faces: list[FaceRecord],
                options: SwapOptions, reference_path: str | None) -> list[FaceRecord]:
        what = target.path.name
        if options.face_selector == "picked":
            # select_faces("index") words the out-of-range error; keep the order the user gave
            return [select_faces(faces, "index", index=i, what=what)[0]
                    for i in dict.fromkeys(options.face_indices)]
        reference = None
        if options.face_selector == "reference":
            reference = swapper.source(self.load(reference_path))
        return swapper.select(target, faces, FaceSelection(
            options.face_selector, 0, reference, options.reference_distance))

    def engine_lock(self, options: SwapOptions):
        """Held while a request's engine runs: a diffusion pipeline serves one request at a
        time (a no-op context for the geometric engine)."""
        return self._diffusion_lock if options.engine == "diffusion" else nullcontext()

    def engine(self, options: SwapOptions, mix_paths: Sequence[str] = ()):
        """The engine a request asks for (a diffusion checkpoint is loaded once and shared);
        the --mix-source photos are detected here and enter as Sources."""
        from diffswap_igfi.engines.geometric import GeometricSwapper

        # a diffusion warm start keeps the target's outline (as engines.factory does)
        geometric = GeometricSwapper(blend=options.blend,
                                     keep_mouth_interior=options.keep_mouth_interior,
                                     shape_transfer=GeometricSwapper.shape_transfer
                                     if options.engine == "geometric" else 0.0)
        if options.engine == "geometric":
            return geometric
        mix: list[Source] = []
        if any(mix_paths):
            with self.swapper() as swapper:
                mix = [swapper.source(self.load(p), options.source_face_index)
                       for p in mix_paths if p]
        return self._diffusion_engine(options, mix, geometric)

    def _diffusion_engine(self, options: SwapOptions, mix: list[Source], geometric):
        """The diffusion engine of a checkpoint, loaded once per (folder, device); the request's
        options are set on it while ``_diffusion_lock`` is held by the caller's swap."""
        from diffswap_igfi.engines.factory import EngineOptions, build_engine

        key = (str(Path(options.checkpoint).expanduser().resolve()) if options.checkpoint
               else "", options.device)
        with self._diffusion_lock:
            engine = self._diffusion.get(key)
            if engine is None:
                engine = build_engine(EngineOptions(engine="diffusion",
                                                    checkpoint=options.checkpoint or None,
                                                    device=options.device, progress=False))
                self._diffusion = {key: engine}  # keep one pipeline in memory, not one per folder
        from diffswap_igfi.sfi.pipeline import IdMix

        id_mix = IdMix(mix, options.mix_mode, options.mix_weight) if mix else None
        return _EngineView(engine, options.steps, options.guidance, options.seed,
                           options.warm_start, options.refine, id_mix, geometric)


@dataclass
class _EngineView:
    """A DiffusionEngine's loaded pipeline with one request's options: the engine's own
    ``swap_pairs`` runs on it, so requests never change each other's settings."""

    engine: object
    steps: int = 30
    guidance: float = 3.0
    seed: int = 0
    warm_start_strength: float | None = None
    refine: bool = True
    id_mix: object = None
    warm_engine: object = None

    def __post_init__(self) -> None:
        self.pipe = self.engine.pipe
        self.name = self.engine.name
        self.digital_source_type = self.engine.digital_source_type

    def __getattr__(self, name: str):
        # every setting this view does not override is the engine's (e.g. its region)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def swap_pairs(self, target, pairs):
        return type(self.engine).swap_pairs(self, target, pairs)


def verify(path: str | Path, name: str | None = None) -> VerifyReport | VideoVerifyReport:
    """verify_image (verify_video for a video file), reported under the file's own name rather
    than its temporary path."""
    report = verify_video(Path(path)) if is_video_path(path) else verify_image(Path(path))
    return dataclasses.replace(report, path=Path(name or Path(path).name))


def thumbnail(rgb: np.ndarray, face: FaceRecord, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """A square crop around a face (its box plus 30%), resized to side x side. rgb: [H,W,3]
    uint8. Returns [side,side,3] uint8."""
    x0, y0, x1, y1 = face.box
    half = 0.65 * max(x1 - x0, y1 - y0)
    cx, cy = face.center
    h, w = rgb.shape[:2]
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = int(min(w, cx + half)), int(min(h, cy + half))
    crop = rgb[top:bottom, left:right]
    if crop.size == 0:
        crop = rgb
    return cv2.resize(np.ascontiguousarray(crop), (side, side), interpolation=cv2.INTER_AREA)

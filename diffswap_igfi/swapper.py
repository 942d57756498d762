"""The face-swap front end: photos in, swapped photo out, with face selection.

It owns detection (once per photo) and face selection, and hands FaceRecords to an engine: the
geometric one (``engines.geometric``) or the diffusion one (``engines.diffusion``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.errors import FaceNotFoundError
from diffswap_igfi.faces.detect import FaceDetector, pick_source_face, select_faces
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import LoadedImage

SELECTORS = ("largest", "index", "all", "reference")


@dataclass
class Source:
    """One source photo and the identity face chosen in it."""

    image: LoadedImage
    face: FaceRecord


@dataclass
class SwapOutput:
    """image: [H,W,3] uint8 swapped photo; alpha: [H,W] float32 in [0,1], the feathered mask
    (image == target exactly where alpha == 0); faces: the target faces that were swapped."""

    image: np.ndarray
    alpha: np.ndarray
    faces: list[FaceRecord] = field(default_factory=list)


@dataclass
class FaceSelection:
    """Which target faces to swap (FaceFusion's conventions)."""

    selector: str = "largest"
    index: int = 0
    reference: Source | None = None
    reference_distance: float = 0.6

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose from {SELECTORS}")
        if self.selector == "reference" and self.reference is None:
            raise ValueError("the reference selector needs a reference face")


class Swapper:
    """Detects faces and runs the swap engine. Use as a context manager, or call ``close``."""

    def __init__(self, engine=None, *,
                 landmarker_path: str | os.PathLike | None = None) -> None:
        self.engine = engine or GeometricSwapper()
        self.detector = FaceDetector(landmarker_path)
        self._recognizer = None

    @property
    def recognizer(self):
        """dlib recognizer, loaded on first use (only reference selection needs it)."""
        if self._recognizer is None:
            from diffswap_igfi.eval.recognizer import DlibRecognizer

            self._recognizer = DlibRecognizer()
        return self._recognizer

    def faces(self, image: LoadedImage) -> list[FaceRecord]:
        """Every face in a photo, largest first."""
        return self.detector.detect(image.rgb)

    def source(self, image: LoadedImage, face_index: int | None = None) -> Source:
        """The identity face of a source photo (see faces.detect.pick_source_face)."""
        return Source(image, pick_source_face(self.faces(image), index=face_index,
                                              what=image.path.name))

    def select(self, target: LoadedImage, faces: list[FaceRecord],
               selection: FaceSelection) -> list[FaceRecord]:
        distances = None
        if selection.selector == "reference" and faces:
            ref = selection.reference
            ref_desc = self.recognizer.describe(ref.image.rgb, ref.face)
            distances = [self.recognizer.distance(ref_desc, self.recognizer.describe(target.rgb, f))
                         for f in faces]
        return select_faces(faces, selection.selector, index=selection.index,
                            reference_distances=distances,
                            reference_threshold=selection.reference_distance,
                            what=target.path.name)

    def swap(self, sources: Sequence[Source], target: LoadedImage,
             selection: FaceSelection | None = None) -> SwapOutput:
        """Swap the identity of ``sources`` onto the selected faces of ``target``.

        With several source photos, each target face takes the source whose head pose is
        closest to its own (``choose_source``), which keeps the warp small.
        """
        if not sources:
            raise ValueError("at least one source is needed")
        selection = selection or FaceSelection()
        chosen = self.select(target, self.faces(target), selection)
        if not chosen:  # select_faces raises before this; kept for engines that filter faces
            raise FaceNotFoundError(f"no face to swap in {target.path.name}")
        return self.swap_pairs(target.rgb, [(face, choose_source(face, sources))
                                            for face in chosen])

    def swap_pairs(self, target_rgb: np.ndarray,
                   pairs: Sequence[tuple[FaceRecord, Source]]) -> SwapOutput:
        """Swap already-detected target faces, each with the source given beside it.

        target_rgb: [H,W,3] uint8; pairs: (target face, its source). Nothing is detected here:
        front ends that track faces (video) or let the user pick them (UI) call this directly.
        """
        faces = [face for face, _ in pairs]
        if hasattr(self.engine, "swap_faces"):  # engines that swap all faces in one batch
            sources = list({id(s): s for _, s in pairs}.values())
            image, alpha = self.engine.swap_faces(sources, target_rgb, faces)
            return SwapOutput(image, alpha, faces)
        image = target_rgb
        alpha = np.zeros(image.shape[:2], np.float32)
        for face, src in pairs:
            image, a = self.engine.swap_one(image, face, src.image.rgb, src.face)
            alpha = np.maximum(alpha, a)
        return SwapOutput(image, alpha, faces)

    def close(self) -> None:
        self.detector.close()

    def __enter__(self) -> Swapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_source(face: FaceRecord, sources: Sequence[Source]) -> Source:
    """The one rule that picks a source for a target face: the closest head pose."""
    return min(sources, key=lambda s: _pose_gap(s.face, face))


def _pose_gap(a: FaceRecord, b: FaceRecord) -> float:
    ya, pa, _ = a.pose
    yb, pb, _ = b.pose
    return abs(ya - yb) + abs(pa - pb)

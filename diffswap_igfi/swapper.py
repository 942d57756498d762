"""The face-swap front end: photos in, swapped photo out, with face selection.

It owns detection (once per photo), face selection and the one rule that gives each target face
its source (``choose_source``), and hands (FaceRecord, Source) pairs to an engine through the
engine contract (``engines.base.SwapEngine``): the geometric one or the diffusion one, built by
``engines.factory.build_engine``. ``swap_file`` swaps one photo file and writes the result with
provenance, for every front end that writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.engines.base import SwapEngine
from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.errors import FaceNotFoundError
from diffswap_igfi.faces.detect import FaceDetector, pick_source_face, select_faces
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image

SELECTORS = ("largest", "index", "all", "reference")


__all__ = ["FaceSelection", "Source", "SwapOutput", "Swapper", "choose_source", "swap_file"]


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

    def __init__(self, engine: SwapEngine | None = None, *,
                 landmarker_path: str | os.PathLike | None = None) -> None:
        self.engine = engine or GeometricSwapper()
        self.detector = FaceDetector(landmarker_path)
        self._recognizer = None

    @property
    def recognizer(self):
        """dlib recognizer, loaded on first use (only reference selection needs it)."""
        if self._recognizer is None:
            from diffswap_igfi.faces.recognizer import DlibRecognizer

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
        image, alpha = self.engine.swap_pairs(target_rgb, pairs)
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


def swap_file(swapper: Swapper, sources: Sequence[Source], target_path: str | os.PathLike,
              output_path: str | os.PathLike, *, selection: FaceSelection | None = None,
              jpeg_quality: int = 95, max_pixels: int = DEFAULT_MAX_PIXELS,
              c2pa_cert: str | os.PathLike | None = None,
              c2pa_key: str | os.PathLike | None = None) -> SwapOutput:
    """Swap one photo file and write the result with provenance (metadata, watermarks anchored
    on the swapped faces, a C2PA manifest with the target as parent), keeping the target's alpha
    channel and ICC profile; JPEG/WebP outputs at ``jpeg_quality``. c2pa_cert/c2pa_key: an
    organisation's signing chain instead of the local one. The returned ``image`` is the swap
    as the engine made it, before the marks (evaluation scores it, since the face mark moves
    recognizers); only the marked image reaches the disk. The caller checks the output path
    (``io.images.check_output_path``)."""
    from diffswap_igfi.provenance.write import write_synthetic_image

    target = load_image(Path(target_path), max_pixels=max_pixels)
    result = swapper.swap(sources, target, selection)
    write_synthetic_image(Path(output_path), result.image, result.alpha > 0,
                          digital_source_type=swapper.engine.digital_source_type,
                          engine=swapper.engine.name, alpha=target.alpha,
                          icc_profile=target.icc_profile, jpeg_quality=jpeg_quality,
                          faces=result.faces,
                          parent_path=Path(target_path),
                          c2pa_cert=c2pa_cert, c2pa_key=c2pa_key, detector=swapper.detector)
    return result

"""Check one image file for our provenance markers: the signed C2PA manifest, synthetic-media
metadata, the block watermark and the face-anchored watermark.

Pixels are read exactly as stored (no EXIF orientation applied): the block mark lives on the
stored 8x8 grid, and rotating first would move it off that grid (the face mark does not care).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffswap_igfi.errors import ImageReadError, InputError
from diffswap_igfi.io.video import is_video_path
from diffswap_igfi.provenance import face_mark
from diffswap_igfi.provenance.c2pa_sign import C2paReport, read_c2pa
from diffswap_igfi.provenance.face_mark import FaceMarkResult, detect_face_mark
from diffswap_igfi.provenance.keys import watermark_key
from diffswap_igfi.provenance.metadata import (
    ProvenanceMetadata,
    is_synthetic_source_type,
    read_metadata,
)
from diffswap_igfi.provenance.watermark import WatermarkResult, detect_watermark


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_image` found in one file. ``face_mark`` and ``c2pa`` are None only
    when the caller skipped them."""

    path: Path
    metadata: ProvenanceMetadata | None
    watermark: WatermarkResult
    face_mark: FaceMarkResult | None = None
    c2pa: C2paReport | None = None

    @property
    def synthetic(self) -> bool:
        """True when any marker says synthetic; any one suffices (metadata and manifests are
        easy to strip, the block mark does not survive resizing, the face mark needs a face)."""
        return (bool(self.metadata and self.metadata.synthetic) or self.watermark.found
                or bool(self.face_mark and self.face_mark.found)
                or manifest_says_synthetic(self.c2pa))

    def lines(self) -> list[str]:
        """Human-readable report, one finding per line, verdict first."""
        wm, fm = self.watermark, self.face_mark
        if wm.window is None:
            wm_line = "block watermark: image smaller than one 8x8 block, cannot hold one"
        else:
            top, left, bottom, right = wm.window
            wm_line = (f"block watermark: {'found' if wm.found else 'not found'}, "
                       f"z = {wm.score:.1f} (threshold {wm.threshold:.1f}), best window "
                       f"x {left}-{right}, y {top}-{bottom} ({wm.blocks} blocks)")
        out = [verdict_line(self.path, self.synthetic, "image")]
        if self.c2pa is not None:
            out.append("  " + self.c2pa.summary())
        out += ["  " + metadata_line(self.metadata), "  " + wm_line]
        if fm is not None:
            out.append("  " + _face_line(fm))
        return out

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "synthetic": self.synthetic,
            "c2pa": self.c2pa.to_dict() if self.c2pa else None,
            "metadata": self.metadata.to_dict() if self.metadata else None,
            "watermark": self.watermark.to_dict(),
            "face_mark": self.face_mark.to_dict() if self.face_mark else None,
        }


def manifest_says_synthetic(c2pa: C2paReport | None) -> bool:
    return bool(c2pa and c2pa.present and is_synthetic_source_type(c2pa.digital_source_type))


def verdict_line(path: Path, synthetic: bool, what: str) -> str:
    """The first line of a report on ``path`` (``what``: "image" or "video")."""
    if synthetic:
        return f"{path}: SYNTHETIC (marked as made or altered by a generator)"
    return (f"{path}: no synthetic-media marker found "
            f"(this does not prove the {what} is authentic)")


def metadata_line(md: ProvenanceMetadata | None) -> str:
    """One line on the synthetic-media metadata (image XMP/EXIF/IPTC or video container tags)."""
    if md is None:
        return "metadata: none"
    kind = (md.digital_source_type or "unknown source type").rsplit("/", 1)[-1]
    return (f"metadata: {'synthetic' if md.synthetic else 'not synthetic'}, {kind}, "
            f"generator {md.generator or 'unknown'} (in {', '.join(md.where)})"
            + "".join(f"; {k}={v}" for k, v in md.details.items()))


def face_size_note() -> str:
    """The face sizes the face mark is read from (for report lines)."""
    return (f"reads faces with >= {face_mark.MIN_FACE_PX} px between the eyes, reliably from "
            f"{face_mark.RELIABLE_FACE_PX} px after JPEG q75")


def _face_line(fm: FaceMarkResult) -> str:
    need = face_size_note()
    if not fm.faces:
        small = f"{fm.faces_too_small} face(s) too small; " if fm.faces_too_small else ""
        return f"face watermark: no face to read ({small}{need})"
    line = (f"face watermark: {'found' if fm.found else 'not found'}, z = {fm.score:.1f} "
            f"(threshold {fm.threshold:.1f}) over {len(fm.faces)} face(s) ({need})")
    if fm.found:
        if fm.payload_matches is not None:
            line += (f"; payload {'matches' if fm.payload_matches else 'does NOT match'} the "
                     f"manifest (z = {fm.match:.1f})")
        if fm.payload:
            line += f"; payload {fm.payload}"
    return line


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> [H,W,3] uint8 RGB, rescaling 16-bit and float data instead of clipping."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0  # float images are usually in [0,1]
        elif im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 16-bit: 65535 -> 255, and x*257 -> x exactly
        gray = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        # Alpha is dropped, not composited: the mark was embedded in the stored colour values.
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def load_rgb_as_stored(path: Path) -> np.ndarray:
    """Pixels of the image at ``path`` as [H,W,3] uint8, in stored order (first frame).

    Raises InputError if the file is missing, ImageReadError if it is not a readable image.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return _to_rgb8(im)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"{path}: image too large to check ({_first_line(exc)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def verify_image(path: str | Path, *, detector=None, faces: bool = True,
                 c2pa: bool = True) -> VerifyReport:
    """Read ``path`` and report its C2PA manifest, metadata and both watermarks (a video file
    gets verify_video.verify_video's report, which has the same ``synthetic``/``lines``/
    ``to_dict``).

    detector: a faces.detect.FaceDetector to reuse (one is opened and closed otherwise);
    ``faces=False`` / ``c2pa=False`` skip the face mark / the manifest.
    """
    path = Path(path)
    if is_video_path(path):
        from diffswap_igfi.provenance.verify_video import verify_video

        return verify_video(path, detector=detector, faces=faces, c2pa=c2pa)
    rgb = load_rgb_as_stored(path)
    metadata = read_metadata(path)
    manifest = read_c2pa(path) if c2pa else None
    expect = (manifest.watermark_payload if manifest and manifest.watermark_payload
              else (metadata.details.get("watermark") if metadata else None))
    found_faces = None
    if faces:
        found_faces = detect_faces_for_mark(rgb, expect=expect, detector=detector)
    return VerifyReport(path=path, metadata=metadata, watermark=detect_watermark(rgb),
                        face_mark=found_faces, c2pa=manifest)


def detect_faces_for_mark(rgb: np.ndarray, *, expect: str | None = None, detector=None
                          ) -> FaceMarkResult:
    """Detect the faces in ``rgb`` ([H,W,3] uint8) and read the face mark on each."""
    from diffswap_igfi.faces.detect import FaceDetector

    if detector is None:
        with FaceDetector() as own:
            records = own.detect(rgb)
    else:
        records = detector.detect(rgb)
    return detect_face_mark(rgb, [f.kps for f in records], key=watermark_key(), expect=expect)


def verify_files(paths: list[str | Path]) -> list:
    """Verify images and videos (by extension) with one face detector for all of them.
    Returns a VerifyReport or verify_video.VideoVerifyReport per path, in order."""
    from diffswap_igfi.faces.detect import FaceDetector

    with FaceDetector() as detector:
        return [verify_image(p, detector=detector) for p in map(Path, paths)]

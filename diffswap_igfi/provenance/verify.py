"""Check one image file for our provenance markers: synthetic-media metadata and the watermark.

Pixels are read exactly as stored (no EXIF orientation applied): the watermark lives on the
stored 8x8 grid, and rotating first would move it off that grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffswap_igfi.errors import ImageReadError, InputError
from diffswap_igfi.io.video import is_video_path
from diffswap_igfi.provenance.metadata import ProvenanceMetadata, read_metadata
from diffswap_igfi.provenance.watermark import WatermarkResult, detect_watermark


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_image` found in one file."""

    path: Path
    metadata: ProvenanceMetadata | None
    watermark: WatermarkResult

    @property
    def synthetic(self) -> bool:
        """True when either marker says synthetic; either alone suffices (metadata is easy to
        strip, the watermark does not survive resizing)."""
        return bool(self.metadata and self.metadata.synthetic) or self.watermark.found

    def lines(self) -> list[str]:
        """Human-readable report, one finding per line, verdict first."""
        md, wm = self.metadata, self.watermark
        if self.synthetic:
            verdict = f"{self.path}: SYNTHETIC (marked as made or altered by a generator)"
        else:
            verdict = (f"{self.path}: no synthetic-media marker found "
                       "(this does not prove the image is authentic)")
        if md is None:
            md_line = "metadata: none"
        else:
            kind = (md.digital_source_type or "unknown source type").rsplit("/", 1)[-1]
            md_line = (f"metadata: {'synthetic' if md.synthetic else 'not synthetic'}, {kind}, "
                       f"generator {md.generator or 'unknown'} (in {', '.join(md.where)})")
            md_line += "".join(f"; {k}={v}" for k, v in md.details.items())
        if wm.window is None:
            wm_line = "watermark: image smaller than one 8x8 block, cannot hold one"
        else:
            top, left, bottom, right = wm.window
            wm_line = (f"watermark: {'found' if wm.found else 'not found'}, z = {wm.score:.1f} "
                       f"(threshold {wm.threshold:.1f}), best window x {left}-{right}, "
                       f"y {top}-{bottom} ({wm.blocks} blocks)")
        return [verdict, "  " + md_line, "  " + wm_line]

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "synthetic": self.synthetic,
            "metadata": self.metadata.to_dict() if self.metadata else None,
            "watermark": self.watermark.to_dict(),
        }


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


def verify_image(path: str | Path) -> VerifyReport:
    """Read ``path`` and report its provenance metadata and watermark detection (a video file
    gets provenance.video's report, which has the same ``synthetic``/``lines``/``to_dict``)."""
    path = Path(path)
    if is_video_path(path):
        from diffswap_igfi.provenance.video import verify_video

        return verify_video(path)
    rgb = load_rgb_as_stored(path)
    return VerifyReport(path=path, metadata=read_metadata(path), watermark=detect_watermark(rgb))

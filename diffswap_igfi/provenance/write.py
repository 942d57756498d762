"""The only way the tool writes an image: watermark the synthetic region, add metadata, save
atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffswap_igfi import __version__
from diffswap_igfi.io.images import save_image
from diffswap_igfi.provenance.metadata import metadata_save_kwargs
from diffswap_igfi.provenance.watermark import embed_watermark

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
            ".tiff": "TIFF", ".bmp": "BMP"}


def write_synthetic_image(path: Path, rgb: np.ndarray, region: np.ndarray | None, *,
                          digital_source_type: str, engine: str,
                          alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                          jpeg_quality: int = 95) -> Path:
    """Write a generated or edited photo with its provenance.

    rgb: [H,W,3] uint8; region: [H,W] bool, the synthetic pixels that carry the watermark (None =
    the whole image). Pixels outside ``region`` are written unchanged (bit for bit in lossless
    formats). alpha: [H,W] uint8 transparency to keep, if the target had one.
    """
    marked = embed_watermark(rgb, region)
    fmt = _FORMATS.get(Path(path).suffix.lower(), "PNG")
    kwargs = metadata_save_kwargs(
        fmt, digital_source_type=digital_source_type,
        generator=f"diffswap-igfi {__version__}",
        details={"engine": engine, "synthetic": "face swap"})
    return save_image(Path(path), marked, alpha=alpha, icc_profile=icc_profile,
                      save_kwargs=kwargs, jpeg_quality=jpeg_quality)

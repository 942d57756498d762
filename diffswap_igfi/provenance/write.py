"""The only way the tool writes an image: watermark the synthetic region, add metadata, save
atomically, sign a C2PA manifest into the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffswap_igfi import __version__
from diffswap_igfi.io.atomic import remove_stale_temporaries, temporary_path
from diffswap_igfi.io.images import save_image
from diffswap_igfi.provenance.c2pa_sign import can_sign, sign_file
from diffswap_igfi.provenance.metadata import metadata_save_kwargs
from diffswap_igfi.provenance.watermark import embed_watermark

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
            ".tiff": "TIFF", ".bmp": "BMP"}


def write_synthetic_image(path: Path, rgb: np.ndarray, region: np.ndarray | None, *,
                          digital_source_type: str, engine: str,
                          alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                          jpeg_quality: int = 95, faces: Sequence | None = None,
                          parent_path: str | Path | None = None,
                          c2pa_cert: str | Path | None = None,
                          c2pa_key: str | Path | None = None, detector=None) -> Path:
    """Write a generated or edited photo with its provenance.

    rgb: [H,W,3] uint8; region: [H,W] bool, the synthetic pixels that carry the watermark (None =
    the whole image). Pixels outside ``region`` are written unchanged (bit for bit in lossless
    formats). alpha: [H,W] uint8 transparency to keep, if the target had one. faces: the
    FaceRecords of the swapped faces (their 5-point kps anchor the face watermark; without
    them only the block watermark is embedded). parent_path: the target photo the edit started
    from (the C2PA parent ingredient, by hash). c2pa_cert/c2pa_key: an organisation's PEM chain
    and key instead of the local ones. detector: a faces.detect.FaceDetector to reuse for
    anchoring the face mark (one is opened for the call otherwise). Every format but BMP gets
    a signed C2PA manifest.
    """
    path = Path(path)
    marked, payload = embed_watermark(rgb, region, faces=faces, return_payload=True,
                                      detector=detector)
    fmt = _FORMATS.get(path.suffix.lower(), "PNG")
    details = {"engine": engine, "synthetic": "face swap"}
    if payload is not None:
        details["watermark"] = payload
    kwargs = metadata_save_kwargs(
        fmt, digital_source_type=digital_source_type,
        generator=f"diffswap-igfi {__version__}", details=details)
    if not can_sign(path):  # BMP: no place for a manifest; the watermark is the marker
        return save_image(path, marked, alpha=alpha, icc_profile=icc_profile,
                          save_kwargs=kwargs, jpeg_quality=jpeg_quality)
    # Unsigned copy beside the output, then signed into place atomically: no unsigned file
    # ever sits at ``path``.
    remove_stale_temporaries(path)
    unsigned = temporary_path(path, keep_suffix=True)
    try:
        save_image(unsigned, marked, alpha=alpha, icc_profile=icc_profile, save_kwargs=kwargs,
                   jpeg_quality=jpeg_quality)
        sign_file(unsigned, dest=path, digital_source_type=digital_source_type, engine=engine,
                  parent_path=parent_path, watermark_payload=payload, cert=c2pa_cert,
                  key=c2pa_key)
    finally:
        unsigned.unlink(missing_ok=True)
    return path

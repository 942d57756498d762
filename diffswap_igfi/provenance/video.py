"""Provenance for the videos we write: container tags that say synthetic, both watermarks in
every swapped frame (video_mark.mark_frame), and a signed C2PA manifest on MP4/MOV files.

Container tags (MP4/MOV through ``use_metadata_tags``, Matroska/WebM natively): ``synthetic``,
``digital_source_type`` (the IPTC URI), ``generator``, ``details`` (engine, and the clip's
watermark payload) and a human-readable ``comment``; the XMP packet of the image files is
stored too (``xmp``). :func:`write_synthetic_video` is the video equivalent of
``write.write_synthetic_image``: the container is written with those tags to a scratch file and
signed into place (the input video as the parent ingredient, by hash; the manifest carries the
frames' watermark payload), so no unsigned file ever sits at the output path. Containers C2PA
cannot hold (``c2pa_sign.can_sign``: .mkv, .webm) keep the tags and the marks, no manifest.
Reading all of it back: ``verify_video.verify_video``.
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from diffswap_igfi import __version__
from diffswap_igfi.provenance.c2pa_sign import can_sign, sign_file
from diffswap_igfi.provenance.metadata import (
    ProvenanceMetadata,
    build_xmp,
    is_synthetic_source_type,
    parse_xmp,
)


def container_metadata(*, digital_source_type: str, generator: str, engine: str,
                       watermark_payload: str | None = None) -> dict[str, str]:
    """Global container tags for a swapped video (``watermark_payload``: the frames' face
    mark payload, 8 hex digits, so a file without a manifest still names it)."""
    details = {"engine": engine, "synthetic": "face swap"}
    if watermark_payload is not None:
        details["watermark"] = watermark_payload
    kind = digital_source_type.rstrip("/").rsplit("/", 1)[-1]
    return {
        "synthetic": str(is_synthetic_source_type(digital_source_type)).lower(),
        "digital_source_type": digital_source_type,
        "generator": generator,
        "details": "; ".join(f"{k}={v}" for k, v in details.items()),
        "comment": f"Synthetic video ({kind}) made by {generator}: faces swapped",
        "xmp": build_xmp(digital_source_type, generator, details).decode("utf-8"),
    }


def write_synthetic_video(output: Path, mux: Callable[[Path, dict[str, str]], Path], *,
                          digital_source_type: str, engine: str,
                          parent_path: str | Path | None = None,
                          watermark_payload: str | None = None,
                          c2pa_cert: str | Path | None = None,
                          c2pa_key: str | Path | None = None,
                          scratch: Path | None = None) -> Path:
    """Write a swapped video's container with its provenance, atomically.

    mux(path, tags): writes the finished container (its frames already marked) to ``path``
    (same extension as ``output``) with the global ``tags``, atomically, and returns it.
    For MP4/MOV the container goes to an unsigned file in ``scratch`` (a folder on the
    output's file system; default: beside the output) and is then signed into ``output``
    with ``parent_path`` (the input video) as the parent ingredient, hash only, and
    ``watermark_payload`` in the manifest; other containers are muxed straight to ``output``.
    Raises OutputError (cannot write or sign), ConfigError (unusable keys).
    """
    output = Path(output)
    tags = container_metadata(digital_source_type=digital_source_type,
                              generator=f"diffswap-igfi {__version__}", engine=engine,
                              watermark_payload=watermark_payload)
    if not can_sign(output):
        return mux(output, tags)
    unsigned = (Path(scratch) / f"unsigned{output.suffix}" if scratch is not None else
                output.with_name(f".{output.name}.{secrets.token_hex(8)}.unsigned{output.suffix}"))
    try:
        mux(unsigned, tags)
        sign_file(unsigned, dest=output, digital_source_type=digital_source_type,
                  engine=engine, parent_path=parent_path, watermark_payload=watermark_payload,
                  cert=c2pa_cert, key=c2pa_key)
    finally:
        unsigned.unlink(missing_ok=True)
    return output


def read_video_metadata(path: Path) -> ProvenanceMetadata | None:
    """Our container tags, or None when the file carries none."""
    import av

    try:
        with av.open(str(path)) as container:
            tags = {k.lower(): v for k, v in container.metadata.items()}
    except (av.FFmpegError, OSError):
        return None
    fields = {}
    if tags.get("xmp"):
        try:
            fields = parse_xmp(tags["xmp"])
        except (ET.ParseError, ValueError):  # malformed XMP: use the plain tags instead
            fields = {}
    dst = tags.get("digital_source_type") or fields.get("digital_source_type")
    if not dst and "synthetic" not in tags and not fields:
        return None
    where = ["container-tags"] + (["xmp"] if fields else [])
    details = dict(fields.get("details", {}))
    for item in (tags.get("details") or "").split("; "):
        if "=" in item:
            k, v = item.split("=", 1)
            details.setdefault(k, v)
    return ProvenanceMetadata(
        digital_source_type=dst,
        generator=tags.get("generator") or fields.get("generator"),
        synthetic=tags.get("synthetic") == "true" or bool(fields.get("synthetic"))
        or is_synthetic_source_type(dst),
        details=details, where=where)

"""Synthetic-media metadata: what we write into every image file, and how we read it back.

Written (see :func:`metadata_save_kwargs`):

- an XMP packet with the IPTC ``Iptc4xmpExt:DigitalSourceType`` (the standard way to say
  "made with generative AI"), ``xmp:CreatorTool``, and our own ``diffswap:Synthetic``,
  ``diffswap:Generator`` and ``diffswap:Details`` (key/value pairs);
- fields any plain tool shows: PNG text chunks ``Synthetic``, ``DigitalSourceType``,
  ``Software``, ``Description`` (the XMP goes in the standard iTXt key ``XML:com.adobe.xmp``);
  JPEG/WebP/TIFF EXIF ``ImageDescription`` (0x010E) and ``Software`` (0x0131).

Pillow 13 writes ``xmp=`` for JPEG and WebP; for TIFF it ignores ``xmp=``, so the packet goes
in tag 700 through ``tiffinfo``. BMP holds no metadata at all: there the invisible watermark
is the only marker. Metadata is easy to strip; the watermark is the marker that survives that.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from PIL import Image, PngImagePlugin

from diffswap_igfi.errors import InputError

IPTC_DST_PREFIX = "http://cv.iptc.org/newscodes/digitalsourcetype/"
COMPOSITE_SYNTHETIC = IPTC_DST_PREFIX + "compositeSynthetic"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = IPTC_DST_PREFIX + "compositeWithTrainedAlgorithmicMedia"
TRAINED_ALGORITHMIC_MEDIA = IPTC_DST_PREFIX + "trainedAlgorithmicMedia"
# IPTC source types that mean "not (only) a capture of reality"; matched on the last path part.
SYNTHETIC_SOURCE_TYPES = frozenset(
    {"compositeSynthetic", "compositeWithTrainedAlgorithmicMedia", "trainedAlgorithmicMedia",
     "algorithmicMedia"}
)

NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
NS_XMP = "http://ns.adobe.com/xap/1.0/"
NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
NS_DIFFSWAP = "urn:diffswap-igfi:xmp:provenance:1.0/"  # an identifier, not a web address
PNG_XMP_KEY = "XML:com.adobe.xmp"
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
_JPEG_XMP_LIMIT = 65504  # one APP1 segment, minus the XMP signature
_DESCRIPTION_RE = re.compile(r"^Synthetic image \((\w+)\)")
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class ProvenanceMetadata:
    """Provenance read from a file. ``where`` lists the places it was found, in reading order:
    ``"xmp"``, ``"png-text"``, ``"exif"``."""

    digital_source_type: str | None
    generator: str | None
    synthetic: bool
    details: dict[str, str] = field(default_factory=dict)
    where: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "digital_source_type": self.digital_source_type,
            "generator": self.generator,
            "synthetic": self.synthetic,
            "details": dict(self.details),
            "where": list(self.where),
        }


def is_synthetic_source_type(uri: str | None) -> bool:
    return bool(uri) and uri.rstrip("/").rsplit("/", 1)[-1] in SYNTHETIC_SOURCE_TYPES


def _xml_text(value: str) -> str:
    # Control characters are illegal in XML 1.0 even when escaped; drop them.
    return _XML_INVALID.sub("", str(value))


def build_xmp(digital_source_type: str, generator: str, details: dict[str, str] | None) -> bytes:
    """The XMP packet (UTF-8 bytes) that :func:`metadata_save_kwargs` embeds."""
    items = "".join(
        f'<rdf:li rdf:parseType="Resource"><diffswap:Key>{escape(_xml_text(k))}</diffswap:Key>'
        f"<diffswap:Value>{escape(_xml_text(v))}</diffswap:Value></rdf:li>"
        for k, v in (details or {}).items()
    )
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        f'<rdf:RDF xmlns:rdf="{NS_RDF}">'
        f'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{NS_IPTC_EXT}" xmlns:xmp="{NS_XMP}"'
        f' xmlns:diffswap="{NS_DIFFSWAP}"'
        f" Iptc4xmpExt:DigitalSourceType={quoteattr(_xml_text(digital_source_type))}"
        f" xmp:CreatorTool={quoteattr(_xml_text(generator))}"
        f' diffswap:Synthetic="{is_synthetic_source_type(digital_source_type)}"'
        f" diffswap:Generator={quoteattr(_xml_text(generator))}>"
        + (f"<diffswap:Details><rdf:Bag>{items}</rdf:Bag></diffswap:Details>" if items else "")
        + '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return packet.encode("utf-8")


def _description(digital_source_type: str, generator: str) -> str:
    kind = digital_source_type.rstrip("/").rsplit("/", 1)[-1]
    prefix = "Synthetic image" if is_synthetic_source_type(digital_source_type) else "Image"
    return f"{prefix} ({kind}) made by {generator}"


def _ascii(text: str) -> str:
    # EXIF ASCII fields: Pillow turns anything else into "?", so do it visibly ourselves.
    return text.encode("ascii", "replace").decode("ascii")


def metadata_save_kwargs(
    fmt: str, *, digital_source_type: str, generator: str, details: dict[str, str] | None = None
) -> dict:
    """Keyword arguments for ``PIL.Image.save(path, format=fmt, **kwargs)`` that embed provenance.

    fmt: "PNG", "JPEG" (or "JPG"), "WEBP", "TIFF" or "BMP" (any case). BMP cannot hold
    metadata and gets ``{}``. Raises InputError for other formats or an oversized packet.
    """
    kind = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt.upper(), fmt.upper())
    if kind == "BMP":
        return {}
    if kind not in {"PNG", "JPEG", "WEBP", "TIFF"}:
        raise InputError(f"cannot write provenance metadata for format {fmt!r}: "
                         "use PNG, JPEG, WEBP, TIFF or BMP")
    xmp = build_xmp(digital_source_type, generator, details)
    if len(xmp) > _JPEG_XMP_LIMIT:
        raise InputError(f"provenance details too long: XMP packet is {len(xmp)} bytes, "
                         f"the limit is {_JPEG_XMP_LIMIT}")
    description = _description(digital_source_type, generator)
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Synthetic", str(is_synthetic_source_type(digital_source_type)))
        info.add_text("DigitalSourceType", digital_source_type)
        info.add_text("Software", generator)  # add_text falls back to iTXt beyond latin-1
        info.add_text("Description", description)
        info.add_itxt(PNG_XMP_KEY, xmp.decode("utf-8"))
        return {"pnginfo": info}
    if kind == "TIFF":
        return {"tiffinfo": {700: xmp, EXIF_IMAGE_DESCRIPTION: _ascii(description),
                             EXIF_SOFTWARE: _ascii(generator)}}
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = _ascii(description)
    exif[EXIF_SOFTWARE] = _ascii(generator)
    return {"xmp": xmp, "exif": exif.tobytes()}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_xmp(packet: bytes | str) -> dict:
    """Provenance fields of an XMP packet: keys among ``digital_source_type``, ``generator``,
    ``creator_tool``, ``synthetic`` (bool), ``details`` (dict). Raises ET.ParseError if bad."""
    if isinstance(packet, str):
        packet = packet.encode("utf-8")
    root = ET.fromstring(packet.strip(b"\x00 \t\r\n"))
    out: dict = {}
    for desc in root.iter(f"{{{NS_RDF}}}Description"):
        # Properties may be attributes or child elements (other tools write either form).
        props = {_local(k): (k, v) for k, v in desc.attrib.items()}
        for child in desc:
            value = child.text or child.get(f"{{{NS_RDF}}}resource") or ""
            props.setdefault(_local(child.tag), (child.tag, value.strip()))
        if "DigitalSourceType" in props:
            out["digital_source_type"] = props["DigitalSourceType"][1]
        if "CreatorTool" in props:
            out["creator_tool"] = props["CreatorTool"][1]
        for name, (qname, value) in props.items():
            if not qname.startswith(f"{{{NS_DIFFSWAP}}}"):
                continue
            if name == "Synthetic":
                out["synthetic"] = value.strip().lower() == "true"
            elif name == "Generator":
                out["generator"] = value
        for li in desc.iterfind(f"{{{NS_DIFFSWAP}}}Details/{{{NS_RDF}}}Bag/{{{NS_RDF}}}li"):
            key = li.findtext(f"{{{NS_DIFFSWAP}}}Key")
            if key is not None:
                out.setdefault("details", {})[key] = li.findtext(f"{{{NS_DIFFSWAP}}}Value") or ""
    return out


def read_metadata(path: str | Path) -> ProvenanceMetadata | None:
    """Provenance metadata of the image file at ``path``, or None when it carries none.

    Files that are not images, are truncated, or hold malformed metadata give None (a part that
    parses still counts). A missing file raises InputError.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    found: dict = {}
    where: list[str] = []
    # The file is untrusted: any decoder error just means there is nothing readable there.
    try:
        with Image.open(path) as im:
            info, exif = dict(im.info), im.getexif()
            text = dict(getattr(im, "text", {}) or {}) if im.format == "PNG" else {}
    except Exception:
        return None
    packet = info.get("xmp") or info.get(PNG_XMP_KEY)
    if packet:
        try:
            fields = parse_xmp(packet)
        except (ET.ParseError, ValueError):
            fields = {}
        if "digital_source_type" in fields or "synthetic" in fields or "generator" in fields:
            found.update(fields)
            where.append("xmp")
    if "Synthetic" in text or "DigitalSourceType" in text:
        found.setdefault("digital_source_type", text.get("DigitalSourceType"))
        found.setdefault("synthetic", str(text.get("Synthetic", "")).lower() == "true")
        found.setdefault("generator", text.get("Software"))
        where.append("png-text")
    description = exif.get(EXIF_IMAGE_DESCRIPTION)
    match = _DESCRIPTION_RE.match(description) if isinstance(description, str) else None
    if match:
        found.setdefault("digital_source_type", IPTC_DST_PREFIX + match.group(1))
        software = exif.get(EXIF_SOFTWARE)
        found.setdefault("generator", software if isinstance(software, str) else None)
        where.append("exif")
    if not where:
        return None
    dst = found.get("digital_source_type") or None
    return ProvenanceMetadata(
        digital_source_type=dst,
        generator=found.get("generator") or found.get("creator_tool"),
        synthetic=bool(found.get("synthetic")) or is_synthetic_source_type(dst),
        details=found.get("details", {}),
        where=where,
    )

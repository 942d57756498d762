"""Provenance: the watermark survives JPEG q75 and never fires on clean photos, pixels outside
the region are untouched to the last bit, metadata round-trips, verify reports both."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from diffswap_igfi.errors import ImageReadError, InputError
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.metadata import (
    COMPOSITE_SYNTHETIC,
    COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
    TRAINED_ALGORITHMIC_MEDIA,
    metadata_save_kwargs,
    read_metadata,
)
from diffswap_igfi.provenance.verify import verify_image
from diffswap_igfi.provenance.watermark import (
    WatermarkResult,
    detect_watermark,
    embed_watermark,
    threshold_for,
)

# Face boxes (top, bottom, left, right) in the shipped photos.
FACES = {"astronaut": (70, 180, 180, 270), "grace_hopper": (130, 335, 170, 355),
         "group": (300, 520, 500, 680)}
GENERATOR = "diffswap-igfi 0.1.0"


def load(name: str) -> np.ndarray:
    return np.asarray(Image.open(sample_path(name)).convert("RGB"))


def ellipse(shape: tuple[int, ...], top: int, bottom: int, left: int, right: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx, ry, rx = (top + bottom) / 2, (left + right) / 2, (bottom - top) / 2, (right - left) / 2
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def reencode(rgb: np.ndarray, fmt: str, **kwargs) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **kwargs)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    mse = np.mean((a[region].astype(np.float64) - b[region].astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def marked() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """name -> (original, face-ellipse region, watermarked)."""
    out = {}
    for name, box in FACES.items():
        rgb = load(name)
        region = ellipse(rgb.shape, *box)
        out[name] = (rgb, region, embed_watermark(rgb, region))
    return out


@pytest.mark.parametrize("name", list(FACES))
def test_only_whole_blocks_inside_the_region_change(marked, name):
    rgb, region, out = marked[name]
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.array_equal(out[~region], rgb[~region])
    # Stronger: every changed pixel lies in an 8x8 grid block entirely inside the region.
    changed = np.any(out != rgb, axis=2)
    hb, wb = rgb.shape[0] // 8, rgb.shape[1] // 8
    inside = region[: hb * 8, : wb * 8].reshape(hb, 8, wb, 8).all(axis=(1, 3))
    allowed = np.zeros_like(region)
    allowed[: hb * 8, : wb * 8] = np.repeat(np.repeat(inside, 8, axis=0), 8, axis=1)
    assert changed.any() and not (changed & ~allowed).any()


@pytest.mark.parametrize("name", list(FACES))
def test_region_psnr_is_at_least_40_db(marked, name):
    rgb, region, out = marked[name]
    assert psnr(rgb, out, region) >= 40.0
    whole = embed_watermark(rgb)
    assert psnr(rgb, whole, np.ones(rgb.shape[:2], bool)) >= 40.0


@pytest.mark.parametrize("name", list(FACES))
@pytest.mark.parametrize("codec", ["png", "jpeg95", "jpeg75", "webp90"])
def test_watermark_survives_reencoding(marked, name, codec):
    rgb, region, out = marked[name]
    fmt, quality = {"png": ("PNG", None), "jpeg95": ("JPEG", 95), "jpeg75": ("JPEG", 75),
                    "webp90": ("WEBP", 90)}[codec]
    result = detect_watermark(reencode(out, fmt, **({"quality": quality} if quality else {})))
    assert result.found and result.score >= result.threshold
    # The best window sits on the face.
    top, left, bottom, right = result.window
    assert region[top:bottom, left:right].mean() > 0.5


def test_small_face_survives_jpeg75():
    rgb = load("astronaut")
    region = ellipse(rgb.shape, 90, 160, 195, 255)  # 60x70 px
    assert detect_watermark(reencode(embed_watermark(rgb, region), "JPEG", quality=75)).found


@pytest.mark.parametrize("name", list(FACES))
def test_clean_photos_are_not_flagged(name):
    rgb = load(name)
    for image in (rgb, reencode(rgb, "JPEG", quality=75)):
        result = detect_watermark(image)
        assert not result.found
        assert result.score < result.threshold - 1.0  # a wide margin, not a near miss


def test_noise_and_flat_images_are_not_flagged():
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    grey = np.full((512, 512, 3), 128, np.uint8)
    assert not detect_watermark(noise).found
    flat = detect_watermark(grey)
    assert not flat.found and flat.score == 0.0


def test_threshold_is_the_union_bound_for_one_in_a_million():
    assert threshold_for(1) == pytest.approx(math.sqrt(2 * math.log(1e6)))
    assert 1e5 * math.exp(-threshold_for(100_000) ** 2 / 2) == pytest.approx(1e-6)
    result = detect_watermark(load("astronaut"))
    assert 6.5 < result.threshold < 7.5


def test_grid_aligned_crop_keeps_the_mark_but_resizing_and_shifting_lose_it(marked):
    rgb, region, out = marked["grace_hopper"]
    assert detect_watermark(np.ascontiguousarray(out[:400, :400])).found
    assert not detect_watermark(np.ascontiguousarray(out[3:, 5:])).found
    half = np.asarray(Image.fromarray(out).resize((out.shape[1] // 2, out.shape[0] // 2)))
    assert not detect_watermark(half).found


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 7, 3), (7, 500, 3)])
def test_images_smaller_than_a_block(shape):
    rgb = np.full(shape, 77, np.uint8)
    out = embed_watermark(rgb)
    assert np.array_equal(out, rgb) and out is not rgb
    assert detect_watermark(rgb) == WatermarkResult(False, 0.0, math.inf, 0, None)


def test_region_without_a_whole_block_changes_nothing():
    rgb = load("astronaut")
    region = np.zeros(rgb.shape[:2], bool)
    region[100:300, 100:107] = True  # 7 px wide: no 8x8 block fits
    assert np.array_equal(embed_watermark(rgb, region), rgb)


def test_bad_arguments_raise_input_error():
    rgb = load("astronaut")
    with pytest.raises(InputError):
        embed_watermark(rgb.astype(np.float32))
    with pytest.raises(InputError):
        embed_watermark(rgb, np.ones((10, 10), bool))
    with pytest.raises(InputError):
        embed_watermark(rgb, strength=0.0)
    with pytest.raises(InputError):
        detect_watermark(rgb[..., 0])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_metadata_round_trips(tmp_path, fmt):
    details = {"engine": "sfi", "note": "ünïcode & <xml> \"quotes\""}
    kwargs = metadata_save_kwargs(fmt, digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA,
                                  generator=GENERATOR, details=details)
    path = tmp_path / f"out.{fmt.lower()}"
    Image.fromarray(load("astronaut")).save(path, format=fmt, **kwargs)
    meta = read_metadata(path)
    assert meta is not None
    assert meta.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert meta.generator == GENERATOR
    assert meta.synthetic is True
    assert meta.details == details
    assert meta.where == (["xmp", "png-text"] if fmt == "PNG" else ["xmp", "exif"])


def test_plain_fields_readable_without_xmp(tmp_path):
    kwargs = metadata_save_kwargs("PNG", digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
                                  generator=GENERATOR)
    path = tmp_path / "a.png"
    Image.fromarray(load("astronaut")).save(path, **kwargs)
    text = Image.open(path).text
    assert text["Synthetic"] == "True"
    assert text["DigitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert text["Software"] == GENERATOR
    jpeg = tmp_path / "a.jpg"
    Image.fromarray(load("astronaut")).save(
        jpeg, **metadata_save_kwargs("jpg", digital_source_type=COMPOSITE_SYNTHETIC,
                                     generator=GENERATOR))
    exif = Image.open(jpeg).getexif()
    assert exif[0x010E] == f"Synthetic image (compositeSynthetic) made by {GENERATOR}"
    assert exif[0x0131] == GENERATOR


def test_bmp_gets_no_metadata_and_unknown_formats_are_refused():
    assert metadata_save_kwargs("BMP", digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
                                generator=GENERATOR) == {}
    with pytest.raises(InputError):
        metadata_save_kwargs("GIF", digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
                             generator=GENERATOR)


def test_read_metadata_without_ours_or_on_garbage(tmp_path):
    for name in FACES:
        assert read_metadata(sample_path(name)) is None
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert read_metadata(garbage) is None
    text = tmp_path / "notes.jpg"
    text.write_text("just text\n")
    assert read_metadata(text) is None
    with pytest.raises(InputError):
        read_metadata(tmp_path / "missing.png")


def test_reads_standard_xmp_written_by_another_tool(tmp_path):
    # Element form with rdf:resource, as some editors write it, and no diffswap fields.
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/"><xmp:CreatorTool>OtherTool 2</xmp:CreatorTool>'
        f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{TRAINED_ALGORITHMIC_MEDIA}"/>'
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    path = tmp_path / "other.jpg"
    Image.fromarray(load("astronaut")).save(path, xmp=xmp)
    meta = read_metadata(path)
    assert (meta.digital_source_type, meta.generator, meta.synthetic, meta.details, meta.where) == (
        TRAINED_ALGORITHMIC_MEDIA, "OtherTool 2", True, {}, ["xmp"])


def test_verify_reports_both_markers_after_jpeg75(tmp_path, marked):
    _, _, out = marked["grace_hopper"]
    path = tmp_path / "swap.jpg"
    Image.fromarray(out).save(path, quality=75, **metadata_save_kwargs(
        "JPEG", digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA, generator=GENERATOR))
    report = verify_image(path)
    assert report.synthetic and report.watermark.found and report.metadata.synthetic
    lines = report.lines()
    assert "SYNTHETIC" in lines[0]
    assert "  C2PA manifest: none" in lines  # written by PIL here, not by the tool
    assert any(ln.startswith("  metadata: synthetic, compositeWithTrainedAlgorithmicMedia")
               for ln in lines)
    assert any(ln.startswith("  block watermark: found") for ln in lines)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["synthetic"] is True and data["watermark"]["found"] is True

    # Metadata stripped by a re-save: the watermark alone still marks it.
    stripped = tmp_path / "stripped.png"
    Image.open(path).save(stripped)
    report = verify_image(stripped)
    assert report.metadata is None and report.watermark.found and report.synthetic


def test_verify_reads_stored_pixels_of_other_modes(tmp_path, marked):
    _, _, out = marked["astronaut"]
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([out, np.full(out.shape[:2], 200, np.uint8)])).save(rgba)
    assert verify_image(rgba).watermark.found
    clean = verify_image(sample_path("astronaut"))
    assert not clean.synthetic and clean.metadata is None
    assert "no synthetic-media marker found" in clean.lines()[0]


def test_verify_refuses_non_images(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a jpeg\n")
    with pytest.raises(ImageReadError) as info:
        verify_image(fake)
    assert str(fake) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError) as missing:
        verify_image(tmp_path / "missing.png")
    assert not isinstance(missing.value, ImageReadError)

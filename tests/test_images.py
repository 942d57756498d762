"""Loading every pixel mode and broken file users send us, and saving without ever losing data.

Every odd input is made in tmp_path from a real photo (the astronaut shipped with skimage).
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from diffswap_igfi.errors import ImageReadError, InputError, OutputError
from diffswap_igfi.io import images
from diffswap_igfi.io.images import (
    SUPPORTED_OUTPUT_EXTENSIONS,
    check_output_path,
    list_images,
    load_image,
    save_image,
)
from diffswap_igfi.io.samples import sample_path


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """[96,128,3] uint8: a non-square crop around the astronaut's face, so rotations show."""
    rgb = np.asarray(Image.open(sample_path("astronaut")).convert("RGB"))
    return np.ascontiguousarray(rgb[20:116, 150:278])


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _assert_refused(path: Path, error_type: type, **kwargs) -> str:
    """Loading must raise exactly ``error_type``, one line naming the file, and not touch it."""
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(error_type) as caught:
        load_image(path, **kwargs)
    assert type(caught.value) is error_type
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    if before is not None:
        assert path.read_bytes() == before
    return message


# --- loading: real samples and every pixel mode ---------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper", "group", "tom_hanks"])
def test_samples_load_as_contiguous_rgb(name):
    loaded = load_image(sample_path(name))
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.ndim == 3 and loaded.rgb.shape[2] == 3
    assert loaded.rgb.flags.c_contiguous
    assert (loaded.height, loaded.width) == loaded.rgb.shape[:2]
    assert loaded.alpha is None
    assert loaded.path == sample_path(name)


def test_rgb_png_is_exact_and_keeps_its_rgb_icc_profile():
    path = sample_path("astronaut")
    loaded = load_image(path)
    with Image.open(path) as im:
        assert np.array_equal(loaded.rgb, np.asarray(im.convert("RGB")))
        assert loaded.icc_profile == im.info["icc_profile"]
    assert (loaded.format, loaded.mode) == ("PNG", "RGB")


def test_icc_profile_of_another_colour_space_is_dropped(tmp_path, photo):
    lab_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    path = tmp_path / "grey_with_lab_profile.png"
    Image.fromarray(_grey(photo)).save(path, icc_profile=lab_profile)
    assert load_image(path).icc_profile is None


def test_grey_and_bilevel(tmp_path, photo):
    grey = _grey(photo)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    loaded = load_image(tmp_path / "grey.png")
    assert loaded.mode == "L" and loaded.alpha is None
    assert all(np.array_equal(loaded.rgb[:, :, c], grey) for c in range(3))

    Image.fromarray(grey).convert("1").save(tmp_path / "bilevel.png")
    loaded = load_image(tmp_path / "bilevel.png")
    assert loaded.mode == "1"
    assert set(np.unique(loaded.rgb)) <= {0, 255}


def _alpha_ramp(shape: tuple[int, int]) -> np.ndarray:
    """[H,W] uint8 with fully transparent columns, so premultiplication would show as zeros."""
    ramp = np.tile(np.linspace(0, 255, shape[1]).astype(np.uint8), (shape[0], 1))
    ramp[:, :10] = 0
    return ramp


def test_la_keeps_alpha_separately_and_unpremultiplied(tmp_path, photo):
    grey, alpha = _grey(photo), _alpha_ramp(photo.shape[:2])
    Image.fromarray(np.dstack([grey, alpha])).save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert loaded.mode == "LA"
    assert np.array_equal(loaded.alpha, alpha)
    assert all(np.array_equal(loaded.rgb[:, :, c], grey) for c in range(3))


def test_rgba_keeps_alpha_separately_and_unpremultiplied(tmp_path, photo):
    alpha = _alpha_ramp(photo.shape[:2])
    Image.fromarray(np.dstack([photo, alpha])).save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.mode == "RGBA"
    assert np.array_equal(loaded.rgb, photo)
    assert np.array_equal(loaded.alpha, alpha)
    assert loaded.rgb.flags.c_contiguous and loaded.alpha.flags.c_contiguous


def test_palette_with_and_without_transparency(tmp_path, photo):
    palette_image = Image.fromarray(photo).quantize(64)
    indices = np.asarray(palette_image)
    colours = np.array(palette_image.getpalette()[: 64 * 3], dtype=np.uint8).reshape(64, 3)
    transparent = int(indices[0, 0])

    palette_image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "P" and loaded.alpha is None
    assert np.array_equal(loaded.rgb, colours[indices])

    palette_image.save(tmp_path / "p_transparent.png", transparency=transparent)
    loaded = load_image(tmp_path / "p_transparent.png")
    assert loaded.mode == "P"
    assert np.array_equal(loaded.alpha, np.where(indices == transparent, 0, 255).astype(np.uint8))
    assert np.array_equal(loaded.rgb, colours[indices])  # transparent pixels keep their colour


def _grey16(photo: np.ndarray) -> np.ndarray:
    """[H,W] uint16 over the full range, with both ends and values just around rounding edges."""
    values = _grey(photo).astype(np.uint32) * 257 + (np.arange(photo.shape[1]) % 257)
    values = np.minimum(values, 65535).astype(np.uint16)
    values[0, :6] = [0, 128, 129, 385, 65406, 65535]
    return values


def _expected_8bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16bit_grey_png_scales_exactly(tmp_path, photo):
    values = _grey16(photo)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    loaded = load_image(tmp_path / "grey16.png")
    assert loaded.mode.startswith("I;16")
    expected = _expected_8bit(values)
    assert list(expected[0, :6]) == [0, 0, 1, 1, 254, 255]
    assert all(np.array_equal(loaded.rgb[:, :, c], expected) for c in range(3))


def test_16bit_big_endian_and_32bit_int_tiff_scale_exactly(tmp_path, photo):
    values = _grey16(photo)
    big = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    big.save(tmp_path / "grey16b.tif")
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "grey32.tif")
    for name, mode in [("grey16b.tif", "I;16B"), ("grey32.tif", "I")]:
        loaded = load_image(tmp_path / name)
        assert loaded.mode == mode
        assert np.array_equal(loaded.rgb[:, :, 0], _expected_8bit(values))


def test_float_tiff_in_unit_range(tmp_path, photo):
    grey = _grey(photo)
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "float.tif")
    loaded = load_image(tmp_path / "float.tif")
    assert loaded.mode == "F"
    assert np.array_equal(loaded.rgb[:, :, 0], grey)


def test_48bit_rgb_png(tmp_path, photo):
    cv2.imwrite(str(tmp_path / "rgb48.png"), photo[:, :, ::-1].astype(np.uint16) * 257)
    assert np.array_equal(load_image(tmp_path / "rgb48.png").rgb, photo)


def test_cmyk_jpeg_with_adobe_inverted_storage(tmp_path, photo):
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK" and "adobe" in im.info  # libjpeg stores Adobe CMYK inverted
    loaded = load_image(tmp_path / "cmyk.jpg")
    assert loaded.mode == "CMYK" and loaded.format == "JPEG"
    error = np.abs(loaded.rgb.astype(int) - photo.astype(int))
    assert error.mean() < 3 and np.percentile(error, 99) < 20  # an inversion would be ~128


@pytest.mark.parametrize("mode, tolerance", [("YCbCr", 3), ("LAB", 8)])
def test_other_colour_spaces(tmp_path, photo, mode, tolerance):
    import PIL

    if mode == "YCbCr" and int(PIL.__version__.split(".")[0]) < 13:
        pytest.skip("Pillow 12 cannot read back its own uncompressed YCbCr TIFF (fixed in 13); "
                    "gradio pins pillow<13")
    Image.fromarray(photo).convert(mode).save(tmp_path / "other.tif")
    loaded = load_image(tmp_path / "other.tif")
    assert loaded.mode == mode
    assert np.abs(loaded.rgb.astype(int) - photo.astype(int)).max() <= tolerance


def test_multi_frame_gif_and_tiff_give_the_first_frame(tmp_path, photo):
    first = Image.fromarray(photo).quantize(64)
    second = Image.fromarray(photo[::-1].copy()).quantize(64)
    first.save(tmp_path / "two.gif", save_all=True, append_images=[second])
    rgb_frames = [first.convert("RGB"), second.convert("RGB")]
    rgb_frames[0].save(tmp_path / "two.tif", save_all=True, append_images=rgb_frames[1:])
    assert np.array_equal(load_image(tmp_path / "two.gif").rgb, np.asarray(first.convert("RGB")))
    assert np.array_equal(load_image(tmp_path / "two.tif").rgb, np.asarray(first.convert("RGB")))


# What the camera stored for an upright picture D, per the EXIF orientation tag (written from
# the EXIF spec in numpy, independently of Pillow's table).
_STORED_FOR_UPRIGHT = {
    1: lambda d: d,
    2: lambda d: d[:, ::-1],
    3: lambda d: d[::-1, ::-1],
    4: lambda d: d[::-1],
    5: lambda d: d.swapaxes(0, 1),
    6: lambda d: np.rot90(d, 1),  # the viewer turns it 90 degrees clockwise
    7: lambda d: d[::-1, ::-1].swapaxes(0, 1),
    8: lambda d: np.rot90(d, -1),  # the viewer turns it 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(tmp_path, photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(_STORED_FOR_UPRIGHT[orientation](photo))
    Image.fromarray(stored).save(tmp_path / "oriented.png", exif=exif)
    loaded = load_image(tmp_path / "oriented.png")
    assert np.array_equal(loaded.rgb, photo)
    assert loaded.rgb.flags.c_contiguous


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_jpeg(tmp_path, photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(_STORED_FOR_UPRIGHT[orientation](photo))
    Image.fromarray(stored).save(tmp_path / "oriented.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "oriented.jpg")
    assert loaded.rgb.shape == photo.shape
    assert np.abs(loaded.rgb.astype(int) - photo.astype(int)).mean() < 3


# --- loading: refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path, photo, suffix):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(photo).save(whole)
    path = tmp_path / f"photo{suffix}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _assert_refused(path, ImageReadError)
    assert "truncated or corrupt" in message and "re-download" in message


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\nsecond line\n")
    assert "not an image" in _assert_refused(path, ImageReadError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _assert_refused(path, ImageReadError)


def test_one_pixel_png(tmp_path, photo):
    path = tmp_path / "dot.png"
    Image.fromarray(photo[:1, :1]).save(path)
    message = _assert_refused(path, ImageReadError)
    assert "is 1x1 pixels, too small to contain a face: use a photo at least 32x32" in message


def test_over_the_pixel_limit(tmp_path, photo):
    path = tmp_path / "big.png"
    Image.fromarray(photo).save(path)
    message = _assert_refused(path, ImageReadError, max_pixels=1000)
    assert "128x96" in message and "1000" in message and "--max-pixels" in message
    assert load_image(path, max_pixels=128 * 96).width == 128


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims a huge size but holds no pixels: what a decompression bomb looks like."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])  # past Pillow's warning, past its error
def test_decompression_bomb_is_refused_without_pillow_noise(tmp_path, side):
    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = _assert_refused(path, ImageReadError)
    assert str(side * side) in message or f"{side}x{side}" in message
    assert "--max-pixels" in message
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_a_raised_limit_lifts_pillows_own_guard_for_this_call_only(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 15_000, 13_000)  # 195 MP: Pillow alone refuses anything over ~179 MP
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Judged by our rules (here the absurd min_side, so nothing is decoded), not Pillow's.
        message = _assert_refused(path, ImageReadError, max_pixels=200_000_000, min_side=20_000)
    assert "15000x13000 pixels, too small" in message
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere.jpg"
    assert "no such file" in _assert_refused(path, InputError)


def test_directory(tmp_path):
    path = tmp_path / "folder.png"
    path.mkdir()
    _assert_refused(path, InputError)


def test_unreadable_file(tmp_path, photo, monkeypatch):
    path = tmp_path / "locked.png"
    Image.fromarray(photo).save(path)
    if os.geteuid() == 0:  # root reads anything: make open() answer as it would for a user

        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(images, "open", denied, raising=False)
    path.chmod(0)
    try:
        assert "permissions" in _assert_refused(path, InputError)
    finally:
        path.chmod(0o644)


# --- saving ---------------------------------------------------------------------------------


def _only_entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".bmp"])
def test_lossless_formats_round_trip_bit_exact(tmp_path, photo, suffix):
    path = save_image(tmp_path / f"out{suffix}", photo)
    assert np.array_equal(load_image(path).rgb, photo)
    assert _only_entries(tmp_path) == {f"out{suffix}"}


def test_alpha_round_trips_where_the_format_has_it(tmp_path, photo):
    alpha = _alpha_ramp(photo.shape[:2])
    lossless_webp = {"lossless": True, "exact": True}  # save_kwargs reach Image.save
    for name, kwargs in [("a.png", {}), ("a.tif", {}), ("a.webp", lossless_webp)]:
        loaded = load_image(save_image(tmp_path / name, photo, alpha=alpha, save_kwargs=kwargs))
        assert np.array_equal(loaded.rgb, photo), name
        assert np.array_equal(loaded.alpha, alpha), name
    for name in ["a.jpg", "a.bmp"]:
        assert load_image(save_image(tmp_path / name, photo, alpha=alpha)).alpha is None


def test_jpeg_quality_icc_and_metadata_pass_through(tmp_path, photo):
    icc = load_image(sample_path("astronaut")).icc_profile
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "diffswap-igfi test")
    png = save_image(tmp_path / "meta.png", photo, icc_profile=icc, save_kwargs={"pnginfo": info})
    with Image.open(png) as im:
        assert im.info["Software"] == "diffswap-igfi test"
    assert load_image(png).icc_profile == icc

    high = save_image(tmp_path / "high.jpg", photo, jpeg_quality=95).stat().st_size
    low = save_image(tmp_path / "low.jpg", photo, jpeg_quality=20).stat().st_size
    assert low < high


def test_creates_parents_and_uses_normal_permissions(tmp_path, photo):
    path = save_image(tmp_path / "a" / "b" / "out.png", photo)
    assert path.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_save_leaves_no_temporary_and_the_old_file_untouched(tmp_path, photo, monkeypatch):
    path = tmp_path / "result.png"
    path.write_bytes(b"the previous result")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half an image")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OutputError) as caught:
        save_image(path, photo)
    assert "\n" not in str(caught.value) and "result.png" in str(caught.value)
    assert "No space left on device" in str(caught.value)
    assert path.read_bytes() == b"the previous result"
    assert _only_entries(tmp_path) == {"result.png"}


def test_interrupted_save_cleans_up_and_stays_an_interrupt(tmp_path, photo, monkeypatch):
    def interrupted(self, fp, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(tmp_path / "out.png", photo)
    assert _only_entries(tmp_path) == set()


def test_temporary_is_hidden_beside_the_target(tmp_path, photo, monkeypatch):
    seen = []

    def spy(self, fp, *args, **kwargs):
        seen.extend(_only_entries(tmp_path))
        raise OSError("stop here")

    monkeypatch.setattr(Image.Image, "save", spy)
    with pytest.raises(OutputError):
        save_image(tmp_path / "out.png", photo)
    (temporary,) = seen
    assert temporary.startswith(".out.png.") and temporary.endswith(".tmp")
    assert _only_entries(tmp_path) == set()


def test_bad_options_become_output_errors(tmp_path, photo):
    with pytest.raises(OutputError):
        save_image(tmp_path / "out.png", photo, save_kwargs={"compress_level": "high"})
    assert _only_entries(tmp_path) == set()
    with pytest.raises(OutputError, match="unsupported extension"):
        save_image(tmp_path / "out.gif", photo)


def test_unusable_destinations_become_one_line_output_errors(tmp_path, photo):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "taken.png").mkdir()
    for target in [tmp_path / "file" / "out.png", tmp_path / "taken.png"]:
        with pytest.raises(OutputError) as caught:
            save_image(target, photo)
        assert "\n" not in str(caught.value) and target.name in str(caught.value)
    assert _only_entries(tmp_path) == {"file", "taken.png"}
    assert (tmp_path / "file").read_bytes() == b"x"


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        [[[0, 0, 0]]],
    ],
)
def test_wrong_arrays_are_programming_errors(tmp_path, rgb):
    with pytest.raises(ValueError):
        save_image(tmp_path / "out.png", rgb)


def test_wrong_alpha_is_a_programming_error(tmp_path, photo):
    with pytest.raises(ValueError):
        save_image(tmp_path / "out.png", photo, alpha=np.zeros((3, 3), np.uint8))


# --- check_output_path ----------------------------------------------------------------------


@pytest.fixture
def source(tmp_path, photo) -> Path:
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "source.png"
    Image.fromarray(photo).save(path)
    return path


def _spellings(tmp_path: Path, source: Path) -> dict[str, Path]:
    (tmp_path / "link.png").symlink_to(source)
    os.link(source, tmp_path / "hard.png")
    return {
        "plain": source,
        "symlink": tmp_path / "link.png",
        "hard link": tmp_path / "hard.png",
        "dot-dot": tmp_path / "a" / ".." / "a" / "source.png",
        "relative": Path(os.path.relpath(source)),
    }


@pytest.mark.parametrize("force", [False, True])
def test_output_that_is_an_input_is_always_refused(tmp_path, source, force):
    for how, output in _spellings(tmp_path, source).items():
        with pytest.raises(OutputError) as caught:
            check_output_path(output, [tmp_path / "other.png", source], force=force)
        assert "\n" not in str(caught.value), how
        assert "destroy the input" in str(caught.value), how
    with pytest.raises(OutputError):  # the same holds with the input spelled the odd way
        check_output_path(source, [tmp_path / "hard.png"], force=force)


def test_existing_output_needs_force(tmp_path, source):
    existing = tmp_path / "previous.png"
    existing.write_bytes(b"old")
    with pytest.raises(OutputError, match="--force"):
        check_output_path(existing, [source], force=False)
    check_output_path(existing, [source], force=True)
    check_output_path(tmp_path / "new.png", [source], force=False)
    assert existing.read_bytes() == b"old"


def test_folder_and_unsupported_extension_are_refused(tmp_path, source):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path / "out.png", [source], force=True)
    with pytest.raises(OutputError) as caught:
        check_output_path(tmp_path / "out.gif", [source], force=True)
    assert all(ext in str(caught.value) for ext in SUPPORTED_OUTPUT_EXTENSIONS)
    check_output_path(tmp_path / "OUT.JPG", [source], force=False)


# --- list_images ----------------------------------------------------------------------------


def test_list_images(tmp_path, photo):
    for name in ["b.png", "a.JPG", "c.webp", ".hidden.png", "notes.txt", "d.jpeg.bak"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


def test_list_images_refuses_empty_and_missing_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for folder in [tmp_path, tmp_path / "missing"]:
        with pytest.raises(InputError) as caught:
            list_images(folder)
        assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_input_and_output_extensions_agree():
    assert SUPPORTED_OUTPUT_EXTENSIONS <= images.INPUT_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in images.INPUT_EXTENSIONS)

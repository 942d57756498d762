"""Read user photos into one RGB(+alpha) form, and write results without ever losing data.

Loading turns every pixel mode Pillow opens (grey, palette, 16-bit, float, CMYK, ...) into
``rgb: [H,W,3] uint8`` plus an optional separate ``alpha: [H,W] uint8``, upright (EXIF applied).
Saving is atomic: a result is either fully written or the destination is left as it was.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diffswap_igfi.errors import ImageReadError, InputError, OutputError
from diffswap_igfi.io.atomic import remove_stale_temporaries, temporary_path

DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 32

# Only photo formats: Pillow would otherwise also try EPS (which runs Ghostscript) and dozens
# of formats no camera writes.
_INPUT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF")
INPUT_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
)
_OUTPUT_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
}  # fmt: skip
SUPPORTED_OUTPUT_EXTENSIONS = frozenset(_OUTPUT_FORMATS)
_SUPPORTED_TEXT = " ".join(sorted(SUPPORTED_OUTPUT_EXTENSIONS))
_FORMATS_WITH_ALPHA = frozenset({"PNG", "WEBP", "TIFF"})


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded photo. ``rgb``: [H,W,3] uint8, C-contiguous, upright, never premultiplied.
    ``alpha``: [H,W] uint8 or None. ``mode`` is the file's original Pillow mode; ``icc_profile``
    is kept only when it describes RGB data (a grey or CMYK profile would mislabel ``rgb``)."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: Path
    format: str
    mode: str
    icc_profile: bytes | None

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _too_large(path: Path, pixels: str, max_pixels: int) -> ImageReadError:
    return ImageReadError(
        f"{path} is {pixels}, over the limit of {max_pixels} pixels: "
        f"resize it or raise --max-pixels"
    )


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> LoadedImage:
    """Decode the first frame of a photo fully, or raise an ``InputError`` naming the fix."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image file: pass an image file")
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"no such file: {path}: check the path") from None
    except OSError as e:
        raise InputError(f"cannot open {path} ({_one_line(e)}): check its permissions") from None
    with handle, _pillow_limit_at_least(max_pixels), warnings.catch_warnings():
        # Our own size check below is the guard; Pillow's warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(handle, formats=[f for f in _INPUT_FORMATS if _has_format(f)])
        except Image.DecompressionBombError as e:
            raise _refused_by_pillow(path, e, max_pixels) from None
        except Image.UnidentifiedImageError:
            raise ImageReadError(
                f"{path} is not an image this tool can read: "
                f"use a JPEG, PNG, WebP, TIFF, BMP or GIF file"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise _corrupt(path, e) from None
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise _too_large(path, f"{width}x{height} pixels", max_pixels)
            if min(width, height) < min_side:
                raise ImageReadError(
                    f"{path} is {width}x{height} pixels, too small to contain a face: "
                    f"use a photo at least {min_side}x{min_side}"
                )
            mode, file_format = im.mode, im.format or "unknown"
            icc = im.info.get("icc_profile") or None
            try:
                im.load()  # decode everything now: a truncated file fails here, not later
                upright = ImageOps.exif_transpose(im)
                rgb, alpha = _to_rgb_alpha(upright)
            except Image.DecompressionBombError as e:  # a GIF frame or TIFF tile over the limit
                raise _refused_by_pillow(path, e, max_pixels) from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise _corrupt(path, e) from None
    # ICC bytes 16..20 name the data colour space of the profile.
    if icc is not None and icc[16:20] != b"RGB ":
        icc = None
    return LoadedImage(rgb, alpha, path, file_format, mode, icc)


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_limit_at_least(max_pixels: int) -> Iterator[None]:
    """Pillow errors at 2 * ``Image.MAX_IMAGE_PIXELS`` (~179 MP by default), so it would refuse
    photos a raised ``--max-pixels`` allows. Only then lift its limit, for this call, and put it
    back; the lock keeps concurrent calls from restoring each other's value."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None or max_pixels <= current:
        yield  # Pillow's guard then fires only above our own limit
        return
    with _PILLOW_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _refused_by_pillow(path: Path, error: Exception, max_pixels: int) -> ImageReadError:
    # Pillow's guard is at or above ours here, so the image is over our limit too.
    found = re.search(r"\((\d+) pixels\)", str(error))
    return _too_large(path, f"{found[1] if found else 'over'} pixels", max_pixels)


def _has_format(name: str) -> bool:
    Image.init()  # registers every plugin once; a no-op afterwards
    return name in Image.OPEN


def _corrupt(path: Path, error: BaseException) -> ImageReadError:
    return ImageReadError(
        f"{path} is truncated or corrupt ({_one_line(error)}): re-export or re-download it"
    )


def _to_rgb_alpha(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Pillow image of any mode -> (rgb [H,W,3] uint8, alpha [H,W] uint8 or None)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _to_8bit(np.asarray(im), mode)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), None
    if mode == "P":
        palette_alpha = im.palette is not None and im.palette.mode == "RGBA"
        im = im.convert("RGBA" if "transparency" in im.info or palette_alpha else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("LA" if mode == "La" else "RGBA")  # un-premultiplies La/RGBa
    elif mode != "RGBA":
        # 1, L, RGB, RGBX, CMYK (Pillow undoes the Adobe inversion), YCbCr, LAB, HSV
        im = im.convert("RGB")
    pixels = np.array(im, dtype=np.uint8)
    if im.mode == "LA":
        grey, alpha = pixels[:, :, 0], pixels[:, :, 1]
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), alpha.copy()
    if im.mode == "RGBA":
        return np.ascontiguousarray(pixels[:, :, :3]), np.ascontiguousarray(pixels[:, :, 3])
    return np.ascontiguousarray(pixels), None


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (I;16*, and I, which is how 16-bit TIFF/PNG grey arrives) -> round(v / 257);
    float F is taken as [0,1] when it fits there, else as [0,255] like Pillow's own convert."""
    if mode == "F":
        values = values.astype(np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    clipped = np.clip(values.astype(np.int64), 0, 65535)
    return ((clipped + 128) // 257).astype(np.uint8)  # exact round(v * 255 / 65535)


def check_output_path(output: Path, inputs: Sequence[Path], *, force: bool,
                      extensions: Collection[str] = SUPPORTED_OUTPUT_EXTENSIONS) -> None:
    """Refuse an output that would overwrite an input (always, even with ``force``), a folder,
    an extension outside ``extensions`` (image formats by default), or an existing file without
    ``force``."""
    output = Path(output)
    for source in inputs:
        if _same_file(output, Path(source)):
            raise OutputError(
                f"{output} is the input {source}: writing it would destroy the input, "
                f"choose another output path"
            )
    if output.is_dir():
        raise OutputError(f"{output} is a folder: give a file name such as {output / 'out.png'}")
    if output.suffix.lower() not in extensions:
        raise OutputError(
            f"{output} has an unsupported extension {output.suffix or '(none)'!r}: "
            f"use one of {' '.join(sorted(extensions))}"
        )
    if not force and (output.exists() or output.is_symlink()):
        raise OutputError(f"{output} exists: pass --force to overwrite it, or choose another path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # catches hard links and case-folding file systems
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def save_image(
    path: Path,
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    icc_profile: bytes | None = None,
    save_kwargs: dict | None = None,
    jpeg_quality: int = 95,
) -> Path:
    """Write ``rgb: [H,W,3] uint8`` (and ``alpha: [H,W] uint8`` where the format has one) to
    ``path`` atomically; the format follows the extension. ``jpeg_quality`` applies to JPEG and
    lossy WebP; ``save_kwargs`` (pnginfo, exif, xmp, ...) go to ``Image.save`` and win."""
    path = Path(path)
    if not _is_uint8(rgb, ndim=3) or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be an [H,W,3] uint8 array, got {_describe(rgb)}")
    if alpha is not None and (not _is_uint8(alpha, ndim=2) or alpha.shape != rgb.shape[:2]):
        raise ValueError(f"alpha must be [H,W] uint8 to match rgb {rgb.shape}: {_describe(alpha)}")
    file_format = _OUTPUT_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise OutputError(f"cannot write {path}: unsupported extension, use {_SUPPORTED_TEXT}")

    if alpha is not None and file_format in _FORMATS_WITH_ALPHA:
        image = Image.fromarray(np.ascontiguousarray(np.dstack([rgb, alpha])))
    else:
        image = Image.fromarray(np.ascontiguousarray(rgb))
    options: dict = {}
    if file_format in ("JPEG", "WEBP"):
        options["quality"] = jpeg_quality
    if icc_profile is not None:
        options["icc_profile"] = icc_profile
    options.update(save_kwargs or {})

    # Hidden, beside the target (os.replace is atomic only within one file system); os.open with
    # 0o666 lets the umask set the permissions, as for any new file (mkstemp would force 0o600).
    temporary = temporary_path(path)
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=file_format, **options)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        if created:
            temporary.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt and friends stay what they are, after the clean-up
        raise OutputError(
            f"cannot write {path} ({_one_line(e)}): check free space, permissions and options"
        ) from None
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort (not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _is_uint8(value: object, *, ndim: int) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == ndim


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape} dtype {value.dtype}"
    return type(value).__name__


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension, any case), sorted by name, not hidden."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"no such folder: {folder}: check the path")
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise InputError(f"cannot list {folder} ({_one_line(e)}): check its permissions") from None
    images = sorted((p for p in entries if _is_visible_image(p)), key=lambda p: p.name)
    if not images:
        extensions = " ".join(sorted(INPUT_EXTENSIONS))
        raise InputError(f"no images in {folder} (looked for {extensions}): check the folder")
    return images


def _is_visible_image(path: Path) -> bool:
    hidden = path.name.startswith(".")
    return not hidden and path.suffix.lower() in INPUT_EXTENSIONS and path.is_file()

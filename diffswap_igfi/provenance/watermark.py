"""Keyed spread-spectrum watermark in the 8x8 block-DCT domain of luminance (the "block mark"),
and :func:`embed_watermark`, which adds the face-anchored mark (face_mark.py) first when the
swapped faces are known.

Every 8x8 block on the image's absolute grid (rows and columns that are multiples of 8) owns a
pseudo-random sign pattern ``s[b,k] = ±1`` over ``K = 13`` mid-frequency DCT coefficients,
derived from a fixed key and the block's (row, column) index alone, never from the image size.

Embedding is *informed*: coefficient ``k`` of a block is pushed until ``s*c >= t_k``, where
``t_k = strength * q_k`` and ``q_k`` is JPEG quality 75's quantiser step for that coefficient
(so with ``strength > 0.5`` the sign survives a q75 re-encode). A coefficient that already
agrees is left alone, one that strongly disagrees moves at most ``1.25 * t_k``, and each block's
change energy is capped (cheapest moves first) so the region's PSNR stays above ~40 dB. Only
blocks lying entirely inside the caller's region are touched: every other pixel keeps its value.

Detection needs neither the region nor the original. Each coefficient is clipped to
``w = clip(c, -t_k, t_k)`` (texture cannot outvote the mark) and every window of blocks scores
``Z = sum(s*w) / sqrt(sum(w^2))``; windows are rectangles with sides from 4 blocks (32 px) up
to the whole image in ~sqrt(2) steps, slid by a quarter of their size, read from integral
images (no loop over blocks). For an
unmarked image the key's signs are independent of the content, so ``Z`` is a normalised
Rademacher sum and Hoeffding's inequality gives ``P(Z >= t) <= exp(-t^2/2)`` whatever the
picture. The threshold is the smallest ``t`` for which the union bound over all windows searched
stays below ``FALSE_ALARM_RATE`` (1e-6 per image): about 7.0 for 512x512, 7.6 for 4000x3000.

Known limits: the pattern lives on the 8-pixel grid at absolute block positions, so resizing,
rotating, or cropping anything off the top or left edge destroys it (only crops that keep the
top-left corner keep the mark); this is true of every block-DCT scheme here. JPEG quality 50
removes it from small faces (a ~180x220 face still scores just above the threshold). Pixels
clipped at 0 or 255 carry less of the mark, and the key is public: the mark shows origin, it
does not resist forgery or deliberate removal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffswap_igfi.errors import InputError
from diffswap_igfi.provenance import face_mark
from diffswap_igfi.provenance.keys import watermark_key

BLOCK = 8
DEFAULT_STRENGTH = 0.6  # target |coefficient| as a fraction of JPEG q75's quantiser step
FALSE_ALARM_RATE = 1e-6  # per image, for any content (Hoeffding + union bound)
WATERMARK_KEY = 0x5D1F_F5A9_1F1A_2024  # public: the mark proves origin, not secrecy

# (vertical, horizontal) frequencies: mid-band, where face texture is weaker than at the lowest
# frequencies yet JPEG q75 still quantises with steps of 7-12 (measured best of several sets).
_COEFFS = ((0, 3), (1, 2), (2, 1), (3, 0), (4, 0), (3, 1), (2, 2), (1, 3), (0, 4), (2, 3),
           (3, 2), (4, 1), (5, 0))
# JPEG Annex K luminance table (quality 50), rows 0-5; libjpeg scales it by 0.5 for quality 75.
_JPEG_LUMA_Q50 = np.array([
    [16, 11, 10, 16, 24, 40], [12, 12, 14, 19, 26, 58], [14, 13, 16, 24, 40, 57],
    [14, 17, 22, 29, 51, 87], [18, 22, 37, 56, 68, 109], [24, 35, 55, 64, 81, 104],
])
_Q75 = np.array([(_JPEG_LUMA_Q50[u, v] * 50 + 50) // 100 for u, v in _COEFFS], np.float32)
_MAX_MOVE = 1.25  # largest move of one coefficient, in units of its target
_BUDGET = 0.91  # block change energy cap, as a fraction of sum(t_k^2); ~40.5 dB at default
_MIN_SIDE = 4  # smallest window side in blocks (32 px, about the smallest face we mark)


@dataclass(frozen=True)
class WatermarkResult:
    """Outcome of :func:`detect_watermark`.

    ``score``: the best window's z-score; ``threshold``: what it was compared with (depends on
    how many windows the image allows); ``blocks``: 8x8 blocks in that window; ``window``: its
    pixel box ``(top, left, bottom, right)``, None when the image holds no block.
    """

    found: bool
    score: float
    threshold: float
    blocks: int
    window: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict:
        return {
            "found": self.found,
            "score": round(self.score, 3),
            "threshold": round(self.threshold, 3) if math.isfinite(self.threshold) else None,
            "blocks": self.blocks,
            "window": list(self.window) if self.window else None,
        }


def _basis() -> np.ndarray:
    """[K,64] float32: row k is coefficient k's orthonormal 8x8 DCT basis image, flattened.

    Orthonormal (JPEG's own scale), so ``blocks @ basis.T`` gives coefficients and
    ``coeffs @ basis`` gives pixels back.
    """
    n = np.arange(BLOCK)
    d = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * BLOCK)) * math.sqrt(2 / BLOCK)
    d[0] /= math.sqrt(2)
    return np.stack([np.outer(d[u], d[v]).ravel() for u, v in _COEFFS]).astype(np.float32)


_BASIS = _basis()


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array: a cheap, well-spread integer hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _signs(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Key signs for blocks at absolute indices ``rows``, ``cols`` ([N] int) -> [N,K] ±1."""
    cell = (rows.astype(np.uint64) << np.uint64(32)) | cols.astype(np.uint64)
    k = np.arange(len(_COEFFS), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h = _mix(_mix(cell ^ np.uint64(WATERMARK_KEY))[:, None] + k[None, :])
    return np.where(h >> np.uint64(63) == 1, 1.0, -1.0).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W] float32 BT.601 luma in [0,255], the Y that JPEG encodes."""
    # Channel by channel: no float copy of the whole image (a 4000x3000 photo is 36M values).
    r, g, b = (np.float32(c) for c in (0.299, 0.587, 0.114))
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def _to_blocks(plane: np.ndarray, hb: int, wb: int) -> np.ndarray:
    """[H,W] -> [hb*wb, 64] copy of the top-left hb x wb blocks, in row-major block order."""
    p = plane[: hb * BLOCK, : wb * BLOCK].reshape(hb, BLOCK, wb, BLOCK)
    return p.swapaxes(1, 2).reshape(hb * wb, BLOCK * BLOCK)


def _check_rgb(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        got = f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}"
        raise InputError(f"watermarking needs an [H,W,3] uint8 RGB image, got {got}")


def embed_watermark(
    rgb: np.ndarray, region: np.ndarray | None = None, *, strength: float = DEFAULT_STRENGTH,
    faces: Sequence | None = None, payload: str | None = None, return_payload: bool = False,
    detector=None,
) -> np.ndarray | tuple[np.ndarray, str | None]:
    """Mark the synthetic region: the face-anchored mark on ``faces``, then the block mark.

    rgb: [H,W,3] uint8. region: [H,W] bool, None for the whole image. strength: the block
    mark's target |coefficient| as a fraction of JPEG q75's step (> 0.5 to survive q75).
    faces: FaceRecords (or anything with a ``kps`` [5,2] attribute, or [5,2] arrays) of the
    swapped faces; each face with an interocular distance >= face_mark.MIN_FACE_PX also gets
    the face-anchored mark (see face_mark.py), keyed by keys.watermark_key() and carrying
    ``payload`` (8 hex digits; default face_mark.payload_for(rgb)). The mark is anchored
    where a reader will find the face in ``rgb`` (face_mark.reader_kps, with ``detector``, a
    faces.detect.FaceDetector; one is opened for the call when None), not where the target's
    face was before the swap.
    Returns a new [H,W,3] uint8 array (with ``return_payload``: the array and the payload, None
    when no face mark was embedded); pixels where ``region`` is False are bit-identical to
    ``rgb``. The same luma change goes to R, G and B, so chroma is untouched.
    """
    _check_rgb(rgb)
    if not strength > 0:
        raise InputError(f"watermark strength must be > 0, got {strength}")
    if region is not None and np.shape(region) != rgb.shape[:2]:
        raise InputError(f"watermark region is {np.shape(region)}, image is {rgb.shape[:2]}")
    payload_used = None
    kps = [_kps(f) for f in faces or ()]
    kps = [k for k in kps if face_mark.interocular(k) >= face_mark.MIN_FACE_PX]
    if kps:
        payload_used = payload or face_mark.payload_for(rgb)
        if detector is None:
            from diffswap_igfi.faces.detect import FaceDetector

            with FaceDetector() as own:
                kps = [face_mark.reader_kps(rgb, k, own) for k in kps]
        else:
            kps = [face_mark.reader_kps(rgb, k, detector) for k in kps]
        rgb = face_mark.embed_face_mark(rgb, kps, region, key=watermark_key(),
                                        payload=payload_used)
    out = _embed_blocks(rgb, region, strength)
    return (out, payload_used) if return_payload else out


def _kps(face) -> np.ndarray:
    kps = np.asarray(getattr(face, "kps", face), np.float64)
    if kps.shape != (5, 2):
        raise InputError(f"a face for the watermark needs [5,2] keypoints, got {kps.shape}")
    return kps


def _embed_blocks(rgb: np.ndarray, region: np.ndarray | None, strength: float) -> np.ndarray:
    """The block-DCT mark on every 8x8 grid block entirely inside ``region`` (see above)."""
    h, w = rgb.shape[:2]
    out = rgb.copy()
    hb, wb = h // BLOCK, w // BLOCK
    if hb == 0 or wb == 0:
        return out
    if region is None:
        inside = np.ones((hb, wb), dtype=bool)
    else:
        inside = _blocks_inside(np.asarray(region, dtype=bool)[: hb * BLOCK, : wb * BLOCK])
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return out
    # Work on the bounding box of the marked blocks; its other blocks get a zero change, and
    # rint(x + 0.0) == x exactly, so they (like everything outside the box) stay bit-identical.
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = (slice(r0 * BLOCK, r1 * BLOCK), slice(c0 * BLOCK, c1 * BLOCK))
    bh, bw = r1 - r0, c1 - c0
    target = strength * _Q75
    coeffs = _to_blocks(_luma(rgb[box]), bh, bw) @ _BASIS.T  # [bh*bw, K]
    br, bc = np.divmod(np.arange(bh * bw), bw)
    s = _signs(br + r0, bc + c0)
    need = np.clip(target - s * coeffs, 0.0, _MAX_MOVE * target)
    # Keep each block under its energy budget by dropping its costliest moves: the cheap ones
    # buy the most correlation per unit of distortion.
    cost = need * need
    order = np.argsort(cost, axis=1)
    fits = np.take_along_axis(cost, order, axis=1).cumsum(axis=1) <= _BUDGET * (target**2).sum()
    keep = np.empty_like(fits)
    np.put_along_axis(keep, order, fits, axis=1)
    keep &= inside[r0:r1, c0:c1].reshape(-1, 1)
    delta = (s * np.where(keep, need, 0.0)) @ _BASIS  # [bh*bw, 64] luma change
    delta = delta.reshape(bh, bw, BLOCK, BLOCK).swapaxes(1, 2).reshape(bh * BLOCK, bw * BLOCK)
    pixels = rgb[box].astype(np.float32)
    pixels += delta[:, :, None]  # the same change in R, G and B: luma moves, chroma does not
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    out[box] = pixels
    return out


def _blocks_inside(cells: np.ndarray) -> np.ndarray:
    """[hb,wb] bool: the BLOCK x BLOCK blocks of ``cells`` ([hb*BLOCK, wb*BLOCK] bool) that are
    True throughout. Only the blocks within the bounding box of the True pixels are tested (a
    swapped face is a small part of a video frame: ~10x faster at 720p)."""
    hb, wb = cells.shape[0] // BLOCK, cells.shape[1] // BLOCK
    inside = np.zeros((hb, wb), dtype=bool)
    rows = np.flatnonzero(cells.any(axis=1))
    if rows.size == 0:
        return inside
    cols = np.flatnonzero(cells[rows[0]:rows[-1] + 1].any(axis=0))
    r0, r1 = rows[0] // BLOCK, rows[-1] // BLOCK + 1
    c0, c1 = cols[0] // BLOCK, cols[-1] // BLOCK + 1
    part = cells[r0 * BLOCK:r1 * BLOCK, c0 * BLOCK:c1 * BLOCK]
    inside[r0:r1, c0:c1] = part.reshape(r1 - r0, BLOCK, c1 - c0, BLOCK).all(axis=(1, 3))
    return inside


def _window_sides(n: int) -> list[int]:
    """Window sides in blocks for a grid side of ``n`` blocks: 4 up by ~sqrt(2), then n."""
    sides, s = [], float(_MIN_SIDE)
    while round(s) < n:
        if not sides or round(s) != sides[-1]:
            sides.append(round(s))
        s *= math.sqrt(2)
    return sides + [n]


def threshold_for(windows: int, false_alarm_rate: float = FALSE_ALARM_RATE) -> float:
    """Smallest t with ``windows * exp(-t^2/2) <= false_alarm_rate`` (Hoeffding + union bound)."""
    return math.sqrt(2.0 * math.log(max(windows, 1) / false_alarm_rate))


def _integral(a: np.ndarray) -> np.ndarray:
    """[hb,wb] -> [hb+1,wb+1] float64 summed-area table with a zero first row and column."""
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    out[1:, 1:] = a.astype(np.float64).cumsum(axis=0).cumsum(axis=1)
    return out


def _box_sums(table: np.ndarray, wh: int, ww: int, sy: int, sx: int) -> np.ndarray:
    """Sums of every wh x ww window whose top-left is a multiple of (sy, sx)."""
    h, w = table.shape[0] - wh, table.shape[1] - ww
    return (table[wh::sy, ww::sx] - table[wh::sy, :w:sx]
            - table[:h:sy, ww::sx] + table[:h:sy, :w:sx])


def detect_watermark(rgb: np.ndarray) -> WatermarkResult:
    """Look for the watermark anywhere in ``rgb`` ([H,W,3] uint8); the region is not needed."""
    _check_rgb(rgb)
    hb, wb = rgb.shape[0] // BLOCK, rgb.shape[1] // BLOCK
    if hb == 0 or wb == 0:
        return WatermarkResult(found=False, score=0.0, threshold=math.inf, blocks=0)
    idx = np.arange(hb * wb)
    limit = DEFAULT_STRENGTH * _Q75
    w = np.clip(_to_blocks(_luma(rgb), hb, wb) @ _BASIS.T, -limit, limit)  # [N,K]
    # float32 rounding leaves ~1e-5 in a flat block's coefficients: below 0.01 is that noise,
    # not content, and zeroing it lets flat areas carry no evidence either way.
    w[np.abs(w) < 0.01] = 0.0
    num = _integral(((_signs(idx // wb, idx % wb) * w).sum(axis=1)).reshape(hb, wb))
    den = _integral((w * w).sum(axis=1).reshape(hb, wb))
    best, box, windows = -math.inf, (0, 0, 0, 0), 0
    for wh in _window_sides(hb):
        sy = max(1, wh // 4)  # a quarter-window step loses little of any region's sum
        for ww in _window_sides(wb):
            sx = max(1, ww // 4)
            energy = _box_sums(den, wh, ww, sy, sx)
            # A window whose coefficients are all zero (flat) scores 0.
            z = _box_sums(num, wh, ww, sy, sx) / np.sqrt(np.maximum(energy, 1e-3))
            windows += z.size
            i = int(z.argmax())
            if z.flat[i] > best:
                r, c = divmod(i, z.shape[1])
                best, box = float(z.flat[i]), (r * sy, c * sx, r * sy + wh, c * sx + ww)
    threshold = threshold_for(windows)
    top, left, bottom, right = box
    return WatermarkResult(
        found=best >= threshold,
        score=best,
        threshold=threshold,
        blocks=(bottom - top) * (right - left),
        window=(top * BLOCK, left * BLOCK, bottom * BLOCK, right * BLOCK),
    )

"""Face-anchored watermark: a keyed pattern drawn in the canonical aligned-face frame.

The mark lives in the same 5-point aligned frame the swap uses (the ArcFace template scaled to
``FRAME`` = 256 px), not on the pixel grid. Embedding computes, over an ellipse on the inner
face, DCT coefficients of square cells of the aligned luma (three layers: 32-, 16- and 8-px
cells, a few low/mid frequencies each, orthogonal to flat and linearly shaded skin), moves each
to a keyed sign (informed embedding: just enough, within bounds; the coarse layers of faces
under 72 px between the eyes get up to 1.6x more, since only they survive such a face being
shrunk), blurs and fades the change so it shows no tiles, caps every pixel's change (8 luma
levels, 13 on boosted small faces), warps the change back into the
photo with the inverse of the face's alignment, and adds it to the swapped pixels only
(``region``): everything else keeps its value to the last bit. Reading detects the faces,
aligns each the same way and correlates. Because the frame follows the face, the mark
survives what keeps the face: resizing, cropping, small rotations, re-encoding.

Chips: every (cell, coefficient) has a key-derived sign ``c_j = ±1``. Three quarters of them
(the pilot) carry ``c_j``; the rest carry ``c_j * (2 b - 1)`` for a code bit ``b``: a 32-bit
payload (a hash prefix that the C2PA manifest also records) plus an 8-bit CRC, each bit repeated
over ~18 chips spread over the face and the layers (a soft-decision repetition code: losing
part of the face costs votes, not bits). Blind decoding needs a clean copy; testing a known
payload (from a manifest) uses all code chips at once and is far stronger.

Detection: each chip's coefficient, in units of its layer's target and clipped to [-1, 1]
(content cannot outvote the mark), gives ``w_j``; ``Z = sum(c_j w_j) / sqrt(sum w_j^2)`` over
pilot chips. For content that does not depend on the key, ``Z`` is a normalised Rademacher sum
and Hoeffding's bound gives ``P(Z >= t) <= exp(-t^2/2)`` whatever the picture: the threshold
(5.26) keeps the false-alarm rate below ``FALSE_ALARM_RATE`` = 1e-6 per face examined.

Limits (measured in bench/bench_watermark.py): faces must be found by the detector and have an
interocular distance of at least ``MIN_FACE_PX`` (20 px) in the file being checked; reading is
reliable from 28 px lossless, 36 px after JPEG q75 (``RELIABLE_FACE_PX``). So a 0.5x resize
keeps the mark readable on faces that had 72 px or more between the eyes; a profile face, heavy blur, a crop through the face, a rotation beyond what the
detector aligns or a re-synthesis of the face removes it. The key is public by default: the
mark shows origin; it does not resist forgery or a deliberate removal attack.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from diffswap_igfi.faces.align import similarity_transform, template_points

FRAME = 256  # aligned frame side (px): the ArcFace 5-point template scaled from 112
PAYLOAD_BITS = 32
CRC_BITS = 8
FALSE_ALARM_RATE = 1e-6  # per face, any content
STRENGTH = 1.5  # scales every layer's target and moves (measured: face PSNR ~37 dB)
PEAK = 5.5  # largest change of one pixel's luma, times the strength
BOOST_FROM, BOOST_MAX = 72.0, 1.6  # coarse layers of faces under 72 px eye distance: stronger
MIN_FACE_PX = 20  # smallest interocular distance (px) the mark is embedded on and read from
# Measured (bench/bench_watermark.py, face-size sweep): read reliably from 28 px between the
# eyes in a lossless file, 32 px after JPEG q90, 36 px after JPEG q75.
RELIABLE_FACE_PX = 36
_ELLIPSE = ((128.0, 144.0), (88.0, 112.0))  # centre (x, y), radii (x, y) in the frame
# An expected payload "matches" at this z over the code chips: an unrelated payload (whose
# signs are independent of the mark) gets there with probability under exp(-z^2/2) = 1e-3.
MATCH_Z = 3.72
_JITTER = ((0.0, 0.0),)  # (dx, dy) frame shifts searched at detection (measured: no gain)


@dataclass(frozen=True)
class _Layer:
    """One scale of the mark: ``cell`` x ``cell`` cells of the frame, each carrying a chip on
    every DCT coefficient in ``coeffs`` ((vertical, horizontal) frequencies: orthogonal to flat
    and linearly shaded skin). ``target``: the |coefficient| embedding aims at (orthonormal DCT
    units, luma levels) and the clip used when reading; ``moves``: (min, max) move of one
    coefficient."""

    cell: int
    coeffs: tuple[tuple[int, int], ...]
    target: float
    moves: tuple[float, float]


# Three scales of cells: fine 8-px cells carry many chips where the face is large; 16- and
# 32-px cells carry what is left of a small or downscaled face after JPEG. Reading weights each
# layer by how many image pixels its cells span (see _layer_weights).
LAYERS = (_Layer(32, ((1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2)), 48.0, (12.0, 96.0)),
          _Layer(16, ((1, 1), (0, 2), (2, 0)), 12.0, (4.0, 24.0)),
          _Layer(8, ((1, 1), (0, 2), (2, 0), (1, 2), (2, 1)), 8.0, (3.0, 14.0)))
FRAME_IOD = float(np.linalg.norm(template_points(FRAME)[1] - template_points(FRAME)[0]))

@dataclass(frozen=True)
class FaceMarkResult:
    """Detection of the face mark in one image.

    ``faces``: one z-score per face examined (largest first); ``score``: the best; ``payload``:
    the 32-bit payload as 8 hex digits when its CRC checks out on the best face, else None.
    """

    found: bool
    score: float
    threshold: float
    faces: list[float] = field(default_factory=list)
    payload: str | None = None
    faces_too_small: int = 0
    match: float | None = None  # z-score of the expected payload, when one was given

    @property
    def payload_matches(self) -> bool | None:
        """True/False when an expected payload was tested on a found mark, else None."""
        return None if self.match is None else self.match >= MATCH_Z

    def to_dict(self) -> dict:
        return {"found": self.found, "score": round(self.score, 3),
                "threshold": round(self.threshold, 3), "faces": [round(z, 3) for z in self.faces],
                "payload": self.payload, "faces_too_small": self.faces_too_small,
                "payload_match_z": None if self.match is None else round(self.match, 3),
                "min_face_px": MIN_FACE_PX}


def threshold(jitters: int = len(_JITTER), rate: float = FALSE_ALARM_RATE) -> float:
    """Smallest t with ``jitters * exp(-t^2/2) <= rate`` (Hoeffding + union bound)."""
    return math.sqrt(2.0 * math.log(max(jitters, 1) / rate))


def _cells(cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [N] int of the cells whose centre lies inside the face ellipse."""
    (cx, cy), (rx, ry) = _ELLIPSE
    centres = (np.arange(FRAME // cell) + 0.5) * cell
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    return np.nonzero(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)


def _fade() -> np.ndarray:
    """[FRAME,FRAME] float32: 1 well inside the face ellipse, falling smoothly to 0 at its
    edge (over about 12% of its radius), so the mark has no visible outline."""
    (cx, cy), (rx, ry) = _ELLIPSE
    yy, xx = np.mgrid[:FRAME, :FRAME] + 0.5
    radius = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    t = np.clip((1.0 - radius) / 0.12, 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def _basis(cell: int, coeffs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """[K, cell*cell] float32 orthonormal DCT basis images of ``coeffs``."""
    n = np.arange(cell)
    d = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * cell)) * math.sqrt(2 / cell)
    d[0] /= math.sqrt(2)
    return np.stack([np.outer(d[u], d[v]).ravel() for u, v in coeffs]).astype(np.float32)


_GEOMETRY = [(_cells(layer.cell), _basis(layer.cell, layer.coeffs)) for layer in LAYERS]
_SIZES = [rows.size * len(layer.coeffs) for layer, ((rows, _), _) in zip(LAYERS, _GEOMETRY)]
N_CHIPS = sum(_SIZES)
_TARGETS = np.concatenate([np.full(n, layer.target) for layer, n in zip(LAYERS, _SIZES)])
_FADE = _fade()
_LAYER_OF = np.concatenate([np.full(n, i) for i, n in enumerate(_SIZES)])


def _layer_weights(iod: float) -> np.ndarray:
    """[N_CHIPS] weight of each chip when reading a face with ``iod`` px between the eyes.

    A layer whose cells span under 2 image pixels is noise there (resampling and JPEG removed
    it): weight 0; from 4 px on, weight 1; linear in between. The weights depend on the face
    size only, never on the key, so the false-alarm bound still holds.
    """
    cell_px = np.array([layer.cell for layer in LAYERS]) * iod / FRAME_IOD
    return np.clip((cell_px - 2.0) / 2.0, 0.0, 1.0)[_LAYER_OF]


def _layout(key: int) -> tuple[np.ndarray, np.ndarray]:
    """Key-derived chips [N_CHIPS] ±1 and roles [N_CHIPS] int: -1 = pilot, j >= 0 = carries
    code bit j (pilot and code chips interleaved at random over both layers and the face)."""
    rng = np.random.default_rng([key & 0xFFFFFFFF, key >> 32, 0xFACE])
    chips = rng.choice(np.array([-1.0, 1.0]), size=N_CHIPS)
    roles = np.full(N_CHIPS, -1)
    code = rng.permutation(N_CHIPS)[: N_CHIPS // 4]
    roles[code] = np.arange(code.size) % (PAYLOAD_BITS + CRC_BITS)
    return chips, roles


def payload_for(rgb: np.ndarray) -> str:
    """The payload for an image: the first 32 bits of SHA-256 of its pixels, 8 hex digits.

    Deterministic (the same image gets the same mark); the C2PA manifest records it too."""
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()[:8]


def _code_bits(payload: str) -> np.ndarray:
    value = int(payload, 16)
    crc = zlib.crc32(value.to_bytes(4, "big")) & 0xFF
    word = (value << CRC_BITS) | crc
    n = PAYLOAD_BITS + CRC_BITS
    return np.array([(word >> (n - 1 - i)) & 1 for i in range(n)], np.float32)


def _decode_bits(soft: np.ndarray) -> str | None:
    bits = (soft > 0).astype(np.int64)
    word = 0
    for b in bits:
        word = (word << 1) | int(b)
    value, crc = word >> CRC_BITS, word & 0xFF
    if zlib.crc32(value.to_bytes(4, "big")) & 0xFF != crc:
        return None
    return f"{value:08x}"


def _wanted(key: int, payload: str) -> np.ndarray:
    """[N_CHIPS] ±1: the sign each chip's coefficient should have."""
    chips, roles = _layout(key)
    symbols = np.ones(N_CHIPS, np.float32)
    coded = roles >= 0
    symbols[coded] = 2.0 * _code_bits(payload)[roles[coded]] - 1.0
    return chips * symbols


def frame_affine(kps: np.ndarray) -> np.ndarray:
    """[2,3] photo -> aligned frame, from [5,2] keypoints (FaceRecord.kps)."""
    return similarity_transform(np.asarray(kps, np.float64), template_points(FRAME, "arcface"))


def luma(rgb: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 -> [H,W] float32 BT.601 luma in [0,255]."""
    r, g, b = (np.float32(c) for c in (0.299, 0.587, 0.114))
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def interocular(kps: np.ndarray) -> float:
    kps = np.asarray(kps, np.float64)
    return float(np.linalg.norm(kps[1] - kps[0]))


def reader_kps(rgb: np.ndarray, kps: np.ndarray, detector) -> np.ndarray:
    """The [5,2] keypoints a reader will find for the face near ``kps`` in ``rgb``.

    After a swap the eyes and mouth are not where the target's were; anchoring the mark to
    the target's keypoints would misalign it for every reader. This re-detects the face on a
    crop around ``kps`` (upscaled to >= 384 px, as a reader's tile pass would see it) with
    ``detector`` (a faces.detect.FaceDetector) and returns the detected keypoints, or ``kps``
    when no face is found within half an eye distance.
    """
    kps = np.asarray(kps, np.float64)
    h, w = rgb.shape[:2]
    iod = max(interocular(kps), 1.0)
    cx, cy = kps.mean(axis=0)
    half = 2.5 * iod
    x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
    x1, y1 = int(min(w, cx + half)), int(min(h, cy + half))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return kps
    crop = rgb[y0:y1, x0:x1]
    scale = max(1.0, 384 / max(crop.shape[:2]))
    if scale > 1.0:
        crop = cv2.resize(crop, (round(crop.shape[1] * scale), round(crop.shape[0] * scale)),
                          interpolation=cv2.INTER_CUBIC)
    best, best_d = kps, 0.5 * iod
    for face in detector.detect(np.ascontiguousarray(crop), tiles=False):
        found = face.kps.astype(np.float64) / scale + (x0, y0)
        d = float(np.linalg.norm(found - kps, axis=1).mean())
        if d < best_d:
            best, best_d = found, d
    return best


def embed_face_mark(rgb: np.ndarray, faces_kps: Sequence[np.ndarray], region: np.ndarray | None,
                    *, key: int, payload: str, strength: float = STRENGTH) -> np.ndarray:
    """Add the face mark to every face in ``faces_kps`` ([5,2] keypoints each).

    rgb: [H,W,3] uint8; region: [H,W] bool (None = anywhere). Returns a new [H,W,3] uint8
    array; pixels where ``region`` is False are bit-identical to ``rgb``. The same luma change
    goes to R, G and B. Faces with an interocular distance under MIN_FACE_PX are skipped.
    """
    h, w = rgb.shape[:2]
    y = luma(rgb)
    wanted = _wanted(key, payload)
    total = np.zeros((h, w), np.float32)
    for kps in faces_kps:
        if interocular(kps) < MIN_FACE_PX:
            continue
        affine = frame_affine(kps)
        change = frame_delta(_to_frame(y, affine), wanted, strength,
                             boost=_coarse_boost(interocular(kps)))
        delta = cv2.warpAffine(change, affine, (w, h),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        total += delta
    if region is not None:  # (copyto ... where=: boolean-index assignment, half the time)
        np.copyto(total, 0.0, where=~np.asarray(region, bool))
    out = rgb.astype(np.float32)
    out += total[:, :, None]
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    out = out.astype(np.uint8)
    # rint(x + 0) == x, but be exact by construction where nothing was added.
    np.copyto(out, rgb, where=(total == 0.0)[:, :, None])
    return out


def _layer_coefficients(frame: np.ndarray, index: int) -> np.ndarray:
    """[N_i] float64 chip coefficients of layer ``index`` in a [FRAME,FRAME] frame."""
    cell = LAYERS[index].cell
    (rows, cols), basis = _GEOMETRY[index]
    g = FRAME // cell
    blocks = frame.reshape(g, cell, g, cell).swapaxes(1, 2)[rows, cols]
    return (blocks.reshape(rows.size, cell * cell) @ basis.T).ravel().astype(np.float64)


def _draw_layer(values: np.ndarray, index: int) -> np.ndarray:
    """[N_i] chip coefficients of layer ``index`` -> [FRAME,FRAME] float32 luma change."""
    cell = LAYERS[index].cell
    (rows, cols), basis = _GEOMETRY[index]
    g = FRAME // cell
    cells = values.reshape(rows.size, -1).astype(np.float32) @ basis
    frame = np.zeros((g, g, cell, cell), np.float32)
    frame[rows, cols] = cells.reshape(rows.size, cell, cell)
    return frame.swapaxes(1, 2).reshape(FRAME, FRAME)


def _to_frame(plane: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return cv2.warpAffine(plane, affine, (FRAME, FRAME), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT101)


def _coefficients(frame: np.ndarray) -> np.ndarray:
    """[N_CHIPS] chip coefficients of both layers of an aligned [FRAME,FRAME] luma frame."""
    return np.concatenate([_layer_coefficients(frame, i) for i in range(len(LAYERS))])


def _coarse_boost(iod: float) -> float:
    """Extra strength for the coarse layers of a small face (its fine layer will not survive
    the face being shrunk): 1 from BOOST_FROM px between the eyes up, up to BOOST_MAX."""
    return float(np.clip(BOOST_FROM / max(iod, 1.0), 1.0, BOOST_MAX))


def frame_delta(frame: np.ndarray, wanted: np.ndarray, strength: float = 1.0,
                boost: float = 1.0) -> np.ndarray:
    """Informed embedding in the frame: [FRAME,FRAME] luma change for an aligned luma frame.

    Each chip's coefficient moves just enough to have the wanted sign with margin ``target``,
    by at least the layer's min move (alignment at reading time is never exact, so the mark
    must be there even where the content agrees by chance) and at most its max move (a chip
    on an eyebrow edge that strongly disagrees is left to the error correction rather than
    painted over). Layers are embedded coarse first, each seeing the previous one's change.
    Each layer's change is blurred by an eighth of its cell (DCT cells end in steps at their
    borders, which the eye sees as tiles) and the whole change fades out at the ellipse edge.
    """
    delta = np.zeros((FRAME, FRAME), np.float32)
    start = 0
    for i, (layer, n) in enumerate(zip(LAYERS, _SIZES)):
        w = wanted[start:start + n]
        gain = strength * (boost if layer.cell > 8 else 1.0)
        lo, hi = layer.moves
        used = np.zeros(n)
        # Two passes: the blur and the fade take part of each move, and neighbouring cells
        # leak into each other through the blur; the second pass tops up what fell short.
        for floor in (lo, 0.0):
            c = _layer_coefficients(frame + delta, i)
            need = np.clip(layer.target * gain - w * c, floor * gain,
                           np.maximum(hi * gain - used, 0.0))
            used += need
            delta += _FADE * cv2.GaussianBlur(_draw_layer(w * need, i), (0, 0), layer.cell / 8)
        start += n
    # No pixel moves more than this: a chip that needed a big move would otherwise show as
    # a pale or dark spot on the skin.
    limit = PEAK * strength * boost
    return np.clip(delta, -limit, limit)


def score_face(rgb_or_luma: np.ndarray, kps: np.ndarray, *, key: int,
               expect: str | None = None) -> tuple[float, str | None, float | None]:
    """Read one face: (presence z-score, decoded payload or None, match z or None).

    rgb_or_luma: [H,W,3] uint8 or [H,W] float luma; kps: [5,2] keypoints in it. The payload is
    decoded blind (soft repetition code, then the CRC must check). ``expect``: a payload to
    test (e.g. the one a C2PA manifest records); the match z-score correlates every code chip
    with the signs that payload would give, far stronger evidence than blind decoding.
    """
    y = luma(rgb_or_luma) if rgb_or_luma.ndim == 3 else rgb_or_luma
    chips, roles = _layout(key)
    pilot = roles < 0
    base = frame_affine(kps)
    weights = _layer_weights(interocular(kps))
    best, payload, match = -math.inf, None, None
    for dx, dy in _JITTER:
        affine = base.copy()
        affine[:, 2] += (dx, dy)
        # Each chip in units of its layer's target, clipped (content cannot outvote the
        # mark), weighted by how well its layer survives at this face size.
        r = weights * np.clip(_coefficients(_to_frame(y, affine)) / _TARGETS, -1.0, 1.0)
        cr = chips * r
        z = float(cr[pilot].sum() / math.sqrt(max(float((r[pilot] ** 2).sum()), 1e-12)))
        if z > best:
            soft = np.bincount(roles[~pilot], weights=cr[~pilot],
                               minlength=PAYLOAD_BITS + CRC_BITS)
            best, payload = z, _decode_bits(soft)
            if expect is not None:
                match = match_z(r, key=key, expect=expect)
    return best, payload, match


def chip_responses(rgb_or_luma: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """[N_CHIPS] float64: every chip's response in the face at ``kps`` ([5,2]), in units of
    its layer's target, clipped to [-1,1] and weighted by face size (what score_face
    correlates). Responses of one marked face in several frames add up (video_mark)."""
    y = luma(rgb_or_luma) if rgb_or_luma.ndim == 3 else rgb_or_luma
    r = np.clip(_coefficients(_to_frame(y, frame_affine(kps))) / _TARGETS, -1.0, 1.0)
    return _layer_weights(interocular(kps)) * r


def match_z(responses: np.ndarray, *, key: int, expect: str) -> float:
    """The z-score of the payload ``expect`` in chip ``responses`` ([N_CHIPS], one face's or
    a sum over frames): for a payload unrelated to the mark it is sub-Gaussian with variance 1
    whatever the content (the payload's signs are independent of it), so MATCH_Z holds."""
    _, roles = _layout(key)
    code = roles >= 0
    r = responses[code]
    return float((_wanted(key, expect)[code] * r).sum()
                 / math.sqrt(max(float((r ** 2).sum()), 1e-12)))


def detect_face_mark(rgb: np.ndarray, faces_kps: Sequence[np.ndarray], *, key: int,
                     expect: str | None = None) -> FaceMarkResult:
    """Score every face (its [5,2] keypoints in ``rgb``: [H,W,3] uint8); found when any face
    passes the threshold. ``expect``: a payload to test against (see :func:`score_face`)."""
    t = threshold()
    y = luma(rgb)
    scores, best, payload, match, small = [], -math.inf, None, None, 0
    for kps in faces_kps:
        if interocular(kps) < MIN_FACE_PX:
            small += 1
            continue
        z, p, m = score_face(y, kps, key=key, expect=expect)
        scores.append(z)
        if z > best:
            best, payload, match = z, p, m
    if not scores:
        return FaceMarkResult(False, 0.0, t, [], None, small)
    found = best >= t
    return FaceMarkResult(found, best, t, scores, payload if found else None, small,
                          match if found else None)

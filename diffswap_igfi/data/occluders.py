"""Synthetic occlusions for JR training (FaceShifter's HEAR-Net idea).

JR must bring back what covers the target's face (glasses, a hand, hair, a microphone): the
residual map ``target - SFI(target, target)`` lights up there, because the SFI stage repaints
the face without it. Real occluded faces are rare in face data sets, so occluders are pasted
onto targets: drawn procedurally (glasses frames, hands with fingers, hair strands,
microphones) or cut from the photos that ship with our dependencies (textured patches of
clothes and background, never faces).

``paste_occluders(images, rng, p)`` works on a training batch; everything draws only from the
given ``np.random.Generator``, so a batch's occlusions are a pure function of its seed.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch

KINDS = ("glasses", "hand", "hair", "microphone", "patch")


def _colour(rng: np.random.Generator, dark: bool = False) -> tuple[float, float, float]:
    if dark:
        v = rng.uniform(0, 80)
        return tuple(float(np.clip(v + rng.normal(0, 15), 0, 255)) for _ in range(3))
    return tuple(float(c) for c in rng.uniform(0, 255, 3))


def _skin(rng: np.random.Generator) -> tuple[float, float, float]:
    base = np.array([224, 172, 140], np.float64) * rng.uniform(0.45, 1.1)
    return tuple(float(c) for c in np.clip(base + rng.normal(0, 10, 3), 0, 255))


def _glasses(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    s = canvas.shape[0]
    cy = s * rng.uniform(0.38, 0.48)
    half = s * rng.uniform(0.15, 0.2)
    rx, ry = s * rng.uniform(0.09, 0.13), s * rng.uniform(0.06, 0.09)
    thick = max(1, int(round(s * rng.uniform(0.01, 0.025))))
    colour = _colour(rng, dark=rng.random() < 0.7)
    tinted = rng.random() < 0.3  # sunglasses: filled lenses
    for cx in (s / 2 - half, s / 2 + half):
        centre = (int(cx), int(cy))
        axes = (int(rx), int(ry))
        if tinted:
            cv2.ellipse(canvas, centre, axes, 0, 0, 360, colour, -1, cv2.LINE_AA)
            cv2.ellipse(alpha, centre, axes, 0, 0, 360, 0.85, -1, cv2.LINE_AA)
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, colour, thick, cv2.LINE_AA)
        cv2.ellipse(alpha, centre, axes, 0, 0, 360, 1.0, thick, cv2.LINE_AA)
    bridge = ((int(s / 2 - half + rx), int(cy)), (int(s / 2 + half - rx), int(cy)))
    for target, value in ((canvas, colour), (alpha, 1.0)):
        cv2.line(target, *bridge, value, thick, cv2.LINE_AA)
        for side in (-1, 1):  # temple arms towards the ears
            start = (int(s / 2 + side * (half + rx)), int(cy))
            cv2.line(target, start, (int(s / 2 + side * s * 0.48), int(cy - ry / 2)), value,
                     thick, cv2.LINE_AA)


def _hand(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    s = canvas.shape[0]
    colour = _skin(rng)
    width = s * rng.uniform(0.22, 0.32)
    # drawn coming up from the bottom edge, then turned to enter from a random side
    palm_c = np.array([rng.uniform(0.3, 0.7) * s, s * rng.uniform(0.9, 1.05)])
    angle = rng.uniform(-0.5, 0.5)
    direction = np.array([np.sin(angle), -np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    turns = int(rng.integers(4))
    rot = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), turns)

    def place(points: np.ndarray) -> np.ndarray:
        return np.round((points - s / 2) @ rot.T + s / 2).astype(np.int32)

    layer = np.zeros(canvas.shape[:2], np.float32)
    palm = palm_c + direction * width * 0.45
    ring = np.array([palm + width * 0.5 * (np.cos(t) * normal + 0.95 * np.sin(t) * direction)
                     for t in np.linspace(0, 2 * np.pi, 32)])
    cv2.fillPoly(layer, [place(ring)], 1.0, cv2.LINE_AA)
    finger_w = width * 0.075
    for k, length in enumerate(rng.uniform(0.55, 0.9, 4) * width):
        base = palm_c + direction * width * 0.8 + normal * width * (-0.33 + 0.22 * k)
        tip = base + direction * length
        cv2.line(layer, tuple(place(base[None])[0]), tuple(place(tip[None])[0]), 1.0,
                 max(2, int(2 * finger_w)), cv2.LINE_AA)
        cv2.circle(layer, tuple(place(tip[None])[0]), max(1, int(finger_w)), 1.0, -1,
                   cv2.LINE_AA)
    thumb = palm_c + direction * width * 0.35 + normal * width * 0.5
    thumb_tip = thumb + (direction * 0.6 + normal * 0.5) * width * 0.6
    cv2.line(layer, tuple(place(thumb[None])[0]), tuple(place(thumb_tip[None])[0]), 1.0,
             max(2, int(2.4 * finger_w)), cv2.LINE_AA)
    # soft shading across the hand so it is not a flat sticker
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    shade = 0.8 + 0.25 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1) + 1) / 2
    hand = np.asarray(colour, np.float32)[None, None] * shade[..., None]
    canvas[:] = np.where(layer[..., None] > 0, hand * layer[..., None]
                         + canvas * (1 - layer[..., None]), canvas)
    np.maximum(alpha, layer, out=alpha)


def _hair(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    s = canvas.shape[0]
    # black, brown, auburn, blond, grey
    palette = ((20, 18, 16), (60, 40, 28), (110, 60, 35), (190, 160, 110), (170, 170, 165))
    colour = tuple(float(np.clip(c + rng.normal(0, 8), 0, 255))
                   for c in palette[int(rng.integers(len(palette)))])
    x0 = rng.uniform(0.2, 0.8) * s
    for _ in range(int(rng.integers(6, 18))):
        p0 = np.array([x0 + rng.normal(0, s * 0.05), -s * 0.05])
        p1 = p0 + np.array([rng.normal(0, s * 0.15), s * rng.uniform(0.2, 0.4)])
        p2 = p1 + np.array([rng.normal(0, s * 0.15), s * rng.uniform(0.1, 0.3)])
        t = np.linspace(0, 1, 24)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # quadratic Bezier
        pts = np.round(curve).astype(np.int32)
        thick = max(1, int(round(s * rng.uniform(0.004, 0.012))))
        cv2.polylines(canvas, [pts], False, colour, thick, cv2.LINE_AA)
        cv2.polylines(alpha, [pts], False, 1.0, thick, cv2.LINE_AA)


def _microphone(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    s = canvas.shape[0]
    centre = np.array([rng.uniform(0.3, 0.7) * s, rng.uniform(0.65, 0.85) * s])
    radius = s * rng.uniform(0.06, 0.1)
    colour = _colour(rng, dark=True)
    end = centre + np.array([rng.normal(0, s * 0.1), s * 0.6])
    thick = max(2, int(radius * 0.8))
    for target, value in ((canvas, colour), (alpha, 1.0)):
        cv2.line(target, tuple(int(v) for v in centre), tuple(int(v) for v in end), value,
                 thick, cv2.LINE_AA)
        cv2.circle(target, tuple(int(v) for v in centre), int(radius), value, -1, cv2.LINE_AA)
    # the mesh of the head: lighter dots
    for _ in range(12):
        d = rng.uniform(-0.7, 0.7, 2) * radius
        cv2.circle(canvas, tuple(int(v) for v in centre + d), max(1, int(radius * 0.08)),
                   tuple(c + 60 for c in colour), -1, cv2.LINE_AA)


@lru_cache(maxsize=1)
def _texture_sources() -> tuple[np.ndarray, ...]:
    """Face-free textured regions of the shipped photos: the astronaut's suit and flag, the
    bottom of Grace Hopper's uniform."""
    from diffswap_igfi.io.images import load_image
    from diffswap_igfi.io.samples import sample_path

    astronaut = load_image(sample_path("astronaut")).rgb
    hopper = load_image(sample_path("grace_hopper")).rgb
    h, w = hopper.shape[:2]
    return (astronaut[300:512, 0:200], astronaut[330:512, 250:512], hopper[int(h * 0.75):, :])


def _patch(canvas: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    s = canvas.shape[0]
    sources = _texture_sources()
    src = sources[int(rng.integers(len(sources)))]
    size = int(s * rng.uniform(0.2, 0.4))
    y = int(rng.integers(0, max(1, src.shape[0] - size)))
    x = int(rng.integers(0, max(1, src.shape[1] - size)))
    piece = cv2.resize(src[y:y + size, x:x + size], (size, size))
    # an irregular blob shape from a few random points' hull
    pts = rng.uniform(0, size, (7, 2)).astype(np.int32)
    shape = np.zeros((size, size), np.float32)
    cv2.fillPoly(shape, [cv2.convexHull(pts)], 1.0, cv2.LINE_AA)
    oy, ox = (int(v) for v in rng.integers(0, s - size, 2))
    region = (slice(oy, oy + size), slice(ox, ox + size))
    canvas[region] = np.where(shape[..., None] > 0, piece.astype(np.float32), canvas[region])
    alpha[region] = np.maximum(alpha[region], shape)


_DRAW = {"glasses": _glasses, "hand": _hand, "hair": _hair, "microphone": _microphone,
         "patch": _patch}


def draw_occluder(size: int, rng: np.random.Generator,
                  kind: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """One occluder on a size x size canvas: (rgb [S,S,3] float32 0..255, alpha [S,S] float32
    in [0,1], kind). ``kind`` is drawn at random from KINDS when None."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind not in _DRAW:
        raise ValueError(f"unknown occluder {kind!r}; choose from {KINDS}")
    canvas = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size), np.float32)
    _DRAW[kind](canvas, alpha, rng)
    return canvas, np.clip(alpha, 0.0, 1.0), kind


def paste_occluders(images: torch.Tensor, rng: np.random.Generator,
                    p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one occluder on each image with probability ``p``.

    images: [B,3,S,S] float in [-1,1] (aligned face crops). Returns (occluded images, same
    shape and range; masks [B,1,S,S] float in [0,1], the occluder's opacity, zero for images
    left alone). Pixels where the mask is 0 are unchanged, bit for bit.
    """
    b, _, h, w = images.shape
    out = images.clone()
    masks = torch.zeros(b, 1, h, w, dtype=images.dtype, device=images.device)
    for i in range(b):
        if rng.random() >= p:
            continue
        rgb, alpha, _ = draw_occluder(max(h, w), rng)
        rgb = torch.from_numpy(rgb[:h, :w] / 127.5 - 1.0).permute(2, 0, 1).to(images)
        a = torch.from_numpy(alpha[:h, :w]).to(images)[None]
        out[i] = torch.where(a > 0, images[i] * (1 - a) + rgb * a, images[i])
        masks[i] = a
    return out, masks

"""Training augmentations of the SFI stage: plain numpy/OpenCV functions of a random generator.

- ``reference_augment``: the source (reference) crop is a distorted copy of the target crop
  (self-reconstruction, as in REFace and DiffSwap), so the model must take identity from it
  rather than copy pixels: flip, small rotation/scale, blur, colour jitter, elastic warp.
- ``shape_augment_mask`` / ``shuffle_region_mask``: the inpainting mask must not give away the
  target's face shape, and the model should also learn to inpaint single regions.
- ``head_region_mask``: REFace-style mask shuffling towards head swaps: with some probability
  the mask is the whole head (face, hair, ears; ``faces.head``) instead of the face.
- ``condition_dropout``: which conditions to drop, for classifier-free guidance.

Every function draws only from the ``np.random.Generator`` it is given, so a sample's
augmentation is a pure function of that generator's seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.faces import head, masks, topology
from diffswap_igfi.faces.align import transform_points

# Keypoint order after a horizontal flip: the image-left eye and mouth corner swap sides.
FLIP_KPS_ORDER = (1, 0, 2, 4, 3)
# Region groups for mask shuffling.
REGION_GROUPS = {"eyes": ("left_eye", "right_eye"), "brows": ("left_brow", "right_brow"),
                 "nose": ("nose",), "lips": ("lips",)}


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation (see the functions for each field)."""

    flip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.05
    blur: float = 0.2
    color: float = 0.3
    elastic: float = 0.1
    mask_shape: float = 0.5
    mask_shuffle: float = 0.2
    mask_head: float = 0.0
    p_identity: float = 0.1
    p_clip: float = 0.05
    p_both: float = 0.05

    @classmethod
    def off(cls) -> AugmentConfig:
        """No augmentation and no condition dropout: source = target, mask = face oval."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    @classmethod
    def from_value(cls, value: AugmentConfig | dict | None) -> AugmentConfig:
        """None -> the defaults; a dict (e.g. from a YAML recipe) overrides them."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ConfigError(f"unknown augmentation option(s) {', '.join(unknown)}: "
                                  f"choose from {', '.join(f.name for f in fields(cls))}")
            return cls(**{k: float(v) for k, v in value.items()})
        raise ConfigError(f"augment must be an AugmentConfig, a dict or None, got "
                          f"{type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation (factors in [0.8, 1.2]) and hue (+-0.03 turn)."""
    x = image.astype(np.float32) / 255.0
    brightness, contrast, saturation = (float(v) for v in rng.uniform(0.8, 1.2, 3))
    hue = float(rng.uniform(-0.03, 0.03))
    x = x * brightness
    grey = cv2.cvtColor(np.clip(x, 0, 1), cv2.COLOR_RGB2GRAY)
    x = (x - grey.mean()) * contrast + grey.mean()
    grey = cv2.cvtColor(np.clip(x, 0, 1), cv2.COLOR_RGB2GRAY)[..., None]
    x = np.clip(grey + (x - grey) * saturation, 0, 1)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: H in degrees [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * hue, 360.0)
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _elastic(image: np.ndarray, kps: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random displacement (a 5x5 grid of offsets up to S/64 px, cubic-upsampled).
    The output pixel p shows the input at p + d(p); a keypoint q moves to the p solving
    p + d(p) = q, found by fixed-point iteration (d is small and smooth, so it converges fast)."""
    size = image.shape[0]
    amplitude = size / 64.0
    coarse = rng.uniform(-amplitude, amplitude, (2, 5, 5)).astype(np.float32)
    dx, dy = (cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse)
    grid = np.arange(size, dtype=np.float32)
    out = cv2.remap(image, grid[None, :] + dx, grid[:, None] + dy, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT101)
    q = np.asarray(kps, np.float32)
    p = q.copy()
    for _ in range(5):
        mx, my = p[None, :, 0], p[None, :, 1]
        sx = cv2.remap(dx, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]
        sy = cv2.remap(dy, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]
        p = q - np.stack([sx, sy], axis=1)
    return out, p.astype(np.float32)


def reference_augment(crop: np.ndarray, kps: np.ndarray, rng: np.random.Generator, *,
                      flip: float = 0.5, rotate_deg: float = 10.0, scale: float = 0.05,
                      blur: float = 0.2, color: float = 0.3, elastic: float = 0.1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A distorted copy of the source crop, with its keypoints moved to match.

    crop: [S,S,3] uint8 RGB; kps: [5,2] float crop pixels (ArcFace order: image-left eye,
    image-right eye, nose, image-left and image-right mouth corner). flip, blur, color, elastic:
    probabilities; rotate_deg, scale: uniform ranges (+-) of a rotation/scale about the centre,
    always drawn. After a flip the keypoints are re-ordered so the order above still holds.
    Returns (crop [S,S,3] uint8, kps [5,2] float32).
    """
    size = crop.shape[0]
    out = np.ascontiguousarray(crop)
    points = np.asarray(kps, np.float32).copy()
    if rng.random() < flip:
        out = np.ascontiguousarray(out[:, ::-1])
        points[:, 0] = (size - 1) - points[:, 0]  # pixel centres: x -> S-1-x
        points = points[list(FLIP_KPS_ORDER)]
    if rotate_deg > 0 or scale > 0:
        angle = rng.uniform(-rotate_deg, rotate_deg)
        factor = rng.uniform(1.0 - scale, 1.0 + scale)
        centre = ((size - 1) / 2.0, (size - 1) / 2.0)
        affine = cv2.getRotationMatrix2D(centre, angle, factor)
        out = cv2.warpAffine(out, affine, (size, size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT101)
        points = transform_points(points, affine)
    if rng.random() < blur:
        sigma = rng.uniform(0.5, 1.5) * size / 256.0
        out = cv2.GaussianBlur(out, (0, 0), sigma, borderType=cv2.BORDER_REFLECT101)
    if rng.random() < color:
        out = _color_jitter(out, rng)
    if rng.random() < elastic:
        out, points = _elastic(out, points, rng)
    return out, points.astype(np.float32)


def shape_augment_mask(mask: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, *,
                       p: float = 0.5) -> np.ndarray:
    """With probability ``p``, change the mask's outline so it no longer traces the face shape:
    dilate (up to S/24 px), erode (up to S/48 px), or the convex hull of the face oval with each
    point pushed in or out from the centre by a smooth random -6%..+10%.

    mask: [S,S] uint8 {0,255}; landmarks: [468,2] (or 478) crop pixels.
    Returns [S,S] uint8 {0,255}.
    """
    if rng.random() >= p:
        return mask
    size = mask.shape[0]
    kind = rng.integers(3)
    if kind == 0:
        return masks.dilate(mask, int(rng.integers(1, max(2, size // 24) + 1)))
    if kind == 1:
        return masks.erode(mask, int(rng.integers(1, max(2, size // 48) + 1)))
    oval = np.asarray(landmarks, np.float64)[list(topology.FACE_OVAL)]
    centre = oval.mean(axis=0)
    jitter = rng.uniform(-0.06, 0.10, len(oval))
    jitter = (np.roll(jitter, 1) + 2 * jitter + np.roll(jitter, -1)) / 4  # smooth along the oval
    return masks.polygon_mask(centre + (oval - centre) * (1 + jitter[:, None]), mask.shape,
                              convex=True)


def shuffle_region_mask(mask: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, *,
                        p: float = 0.2) -> np.ndarray:
    """With probability ``p``, replace the mask by a random non-empty union of region groups
    (eyes, brows, nose, lips; each picked with probability 1/2), dilated by S/64 px for
    context; otherwise return ``mask``. mask: [S,S] uint8; landmarks: [468,2] crop pixels.
    Returns [S,S] uint8 {0,255}."""
    if rng.random() >= p:
        return mask
    names = list(REGION_GROUPS)
    chosen = [name for name in names if rng.random() < 0.5]
    if not chosen:
        chosen = [names[int(rng.integers(len(names)))]]
    regions = [r for name in chosen for r in REGION_GROUPS[name]]
    shuffled = masks.region_mask(np.asarray(landmarks, np.float64), mask.shape, regions)
    return masks.dilate(shuffled, max(1, mask.shape[0] // 64))


def head_region_mask(crop: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, *,
                     p: float = 0.0) -> np.ndarray | None:
    """With probability ``p``, the head mask of the crop (face, hair, ears: the mesh's head
    prior refined on the crop, ``faces.head.head_mask``) dilated by S/64 px for context, as
    the inference mask is; otherwise None (the caller keeps the face mask). No draw at all when
    ``p`` is 0, so runs without head masks see the same random stream as before.

    crop: [S,S,3] uint8 RGB; landmarks: [468,2] (or 478) crop pixels.
    Returns [S,S] uint8 {0,255} or None.
    """
    if p <= 0 or rng.random() >= p:
        return None
    size = crop.shape[0]
    mask = head.head_mask(np.asarray(landmarks, np.float64), crop.shape[:2], crop)
    return masks.dilate(mask, max(1, size // 64))


def condition_dropout(rng: np.random.Generator, *, p_identity: float = 0.1, p_clip: float = 0.05,
                      p_both: float = 0.05) -> tuple[bool, bool]:
    """(drop_identity, drop_clip) for classifier-free guidance. The three events are disjoint
    (one uniform draw): identity only with ``p_identity``, CLIP only with ``p_clip``, both with
    ``p_both``; so identity is dropped with p_identity + p_both in all."""
    if min(p_identity, p_clip, p_both) < 0 or p_identity + p_clip + p_both > 1:
        raise ConfigError(f"dropout probabilities must be >= 0 and sum to at most 1, got "
                          f"{p_identity}, {p_clip}, {p_both}")
    u = rng.random()
    if u < p_both:
        return True, True
    if u < p_both + p_identity:
        return True, False
    if u < p_both + p_identity + p_clip:
        return False, True
    return False, False

"""Swap one face at a bounded working resolution, on a crop around it.

The geometric engine's cost grows with the cube of the face size (its lighting blur is a
Gaussian whose width follows the inter-ocular distance), and a video frame is mostly not face.
So each face is swapped on a crop around it, downscaled so its inter-ocular distance is at most
``max_iod`` pixels; the swapped crop and its alpha are scaled back up and composited into the
full-resolution frame. Pixels where the (upscaled) alpha is 0 keep the frame's values bit for
bit. The swapped face is then no sharper than ``max_iod`` allows: 64 px between the eyes is
about what a source photo holds anyway, and at 720p it looked the same as 80 px and as a
full-resolution swap (which also showed the engine's tiling seams on a large face), at a fifth
of the full-resolution cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from diffswap_igfi.faces.align import similarity_transform
from diffswap_igfi.faces.blend import composite
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.swapper import Source, Swapper

DEFAULT_MAX_IOD = 64.0
MIN_WORK_IOD = 32.0  # the landmark warp needs this much room between the eyes
MARGIN_IOD = 1.1  # crop margin past the face box: the engine's mask + feather reach ~0.9


def face_crop_box(face: FaceRecord, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the crop around ``face`` holding everything its swap may touch."""
    h, w = shape
    x0, y0, x1, y1 = face.box
    m = MARGIN_IOD * face.interocular + 16
    return (int(max(0, np.floor(x0 - m))), int(max(0, np.floor(y0 - m))),
            int(min(w, np.ceil(x1 + m))), int(min(h, np.ceil(y1 + m))))


@dataclass
class WarmState:
    """A track's last swap at working resolution, to warm-start the next frame's (diffusion
    engine): ``image`` [h,w,3] uint8 the engine's output, ``kps`` [5,2] the face's keypoints
    in it."""

    image: np.ndarray
    kps: np.ndarray


def swap_face_bounded(swapper: Swapper, rgb: np.ndarray, face: FaceRecord, source: Source, *,
                      max_iod: float = DEFAULT_MAX_IOD, engine=None,
                      warm: WarmState | None = None
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], WarmState]:
    """Swap ``face`` of the frame ``rgb`` ([H,W,3] uint8) with ``source``.

    engine: the engine to call (default the swapper's; video passes each track's own, see
    DiffusionEngine.for_track); warm: the track's previous swap, moved onto this face by the
    similarity between the two faces' keypoints and given to the engine as its warm start
    (engines whose ``swap_pairs`` takes ``warm=``; others ignore it). Returns (swapped crop
    [h,w,3] uint8, alpha [h,w] float32 in [0,1], box (x0, y0, x1, y1) of the crop in the
    frame, this swap's WarmState). The crop equals ``rgb[y0:y1, x0:x1]`` exactly where
    alpha == 0.
    """
    box = face_crop_box(face, rgb.shape[:2])
    x0, y0, x1, y1 = box
    crop = rgb[y0:y1, x0:x1]
    scale = min(1.0, max_iod / max(face.interocular, 1e-6))
    h, w = crop.shape[:2]
    sh, sw = max(8, round(h * scale)), max(8, round(w * scale))
    sx, sy = sw / w, sh / h
    affine = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy]])
    local = face.transformed(affine, (sh, sw))
    small = crop if (sh, sw) == (h, w) else cv2.resize(crop, (sw, sh),
                                                       interpolation=cv2.INTER_AREA)
    small = np.ascontiguousarray(small)
    engine = engine or swapper.engine
    if warm is not None and hasattr(engine, "for_track"):
        moved = cv2.warpAffine(warm.image, similarity_transform(warm.kps, local.kps), (sw, sh),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        image, alpha_small = engine.swap_pairs(small, [(local, source)], warm=moved)
    else:
        image, alpha_small = engine.swap_pairs(small, [(local, source)])
    state = WarmState(image, np.asarray(local.kps, np.float64))
    if (sh, sw) == (h, w):
        return image, alpha_small, box, state
    # Only the part where the small alpha is > 0 is scaled back up and composited (the rest of
    # the crop is untouched anyway): frame pixel p sits at small pixel (p + 0.5) * s - 0.5, as
    # for cv2.resize; take every frame pixel whose position lies in that box, plus one of
    # slack for the interpolation.
    ys, xs = np.nonzero(alpha_small > 0)
    out = crop.copy()
    alpha = np.zeros((h, w), np.float32)
    if len(xs) == 0:
        return out, alpha, box, state
    a0, a1, b0, b1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    px0 = max(0, int(np.floor((a0 - 0.5) / sx - 0.5)))
    px1 = min(w, int(np.ceil((a1 + 0.5) / sx - 0.5)) + 1)
    py0 = max(0, int(np.floor((b0 - 0.5) / sy - 0.5)))
    py1 = min(h, int(np.ceil((b1 + 0.5) / sy - 0.5)) + 1)
    gx = ((np.arange(px0, px1) + 0.5) * sx - 0.5).astype(np.float32)
    gy = ((np.arange(py0, py1) + 0.5) * sy - 0.5).astype(np.float32)
    map_x = np.ascontiguousarray(np.broadcast_to(gx[None, :], (len(gy), len(gx))))
    map_y = np.ascontiguousarray(np.broadcast_to(gy[:, None], (len(gy), len(gx))))
    up = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    part = cv2.remap(alpha_small, map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    np.clip(part, 0, 1, out=part)
    part[part < 1e-3] = 0.0  # interpolation tails: keep untouched pixels exact
    alpha[py0:py1, px0:px1] = part
    out[py0:py1, px0:px1] = composite(up, crop[py0:py1, px0:px1], part)
    return out, alpha, box, state

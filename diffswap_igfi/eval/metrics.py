"""What evaluation measures of a face swap, as small functions of faces, descriptors and pixels.

- Identity: a recognizer that is *not* the one a model was conditioned or trained with (dlib by
  default; an ArcFace ONNX model only as a labelled second opinion). Cosine similarity of swap
  and source descriptors, and retrieval of each swap among the distinct source identities.
- Pose: the largest of |yaw|, |pitch|, |roll| differences (degrees) between swap and target,
  from the MediaPipe geometry fit; per-angle differences are kept too.
- Expression: L2 distance between the 52 MediaPipe blendshapes of swap and target.
- Self-swaps (source == target): SSIM and PSNR of swap vs target, LPIPS with local weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffswap_igfi.conditions.identity import cosine_similarity
from diffswap_igfi.errors import DiffSwapError, FaceNotFoundError, ModelNotFoundError
from diffswap_igfi.faces.detect import box_iou, pick_source_face
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import DEFAULT_MAX_PIXELS, load_image

PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; JSON and means need a number
SWAP_FACE_IOU = 0.3

__all__ = ["FaceMeasure", "FaceMeter", "LPIPS", "PSNR_CAP_DB", "cosine_similarity",
           "expression_error", "finite_mean", "load_lpips", "pair_scores", "PhotoMeasurer", "pose_differences",
           "retrieval_ranks", "self_swap_row", "self_swap_scores", "swap_face", "topk_accuracy"]


@dataclass
class FaceMeasure:
    """What evaluation keeps of one face.

    descriptor: [D] float32 from the independent recognizer; arcface: [512] float32 or None;
    pose: (yaw, pitch, roll) degrees; blendshapes: [52] float32 in [0,1] or None;
    box: [4] float32 (x0, y0, x1, y1) in the photo's pixels.
    """

    descriptor: np.ndarray
    pose: tuple[float, float, float]
    blendshapes: np.ndarray | None
    box: np.ndarray
    arcface: np.ndarray | None = None


class FaceMeter:
    """Measures faces with one recognizer, one geometry backend and an optional ArcFace."""

    def __init__(self, recognizer, geometry=None, arcface=None) -> None:
        if geometry is None:
            from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend

            geometry = MediaPipeBackend()
        self.recognizer, self.geometry, self.arcface = recognizer, geometry, arcface

    def measure(self, rgb: np.ndarray, face: FaceRecord) -> FaceMeasure:
        """rgb: [H,W,3] uint8 photo; face: a face detected in it."""
        arc = self.arcface.embed(rgb, face) if self.arcface is not None else None
        pose = tuple(float(a) for a in self.geometry.fit(rgb, face).pose)
        shapes = None if face.blendshapes is None else np.asarray(face.blendshapes, np.float32)
        return FaceMeasure(self.recognizer.describe(rgb, face), pose, shapes,
                           np.asarray(face.box, np.float32), arc)


def swap_face(swap_faces: list[FaceRecord], target_face: FaceRecord, *, target_count: int,
              target_size: tuple[int, int], swap_size: tuple[int, int]) -> FaceRecord:
    """The face of a swap that stands where the target's swapped face stood.

    When both photos hold one face, that face. Otherwise the swap face whose box overlaps the
    target face's box (scaled to the swap's size) most, with IoU >= 0.3; a detector that finds
    another person instead would otherwise score the wrong face.
    """
    if not swap_faces:
        raise FaceNotFoundError("no face found")
    if len(swap_faces) == 1 and target_count == 1:
        return swap_faces[0]
    sy, sx = swap_size[0] / target_size[0], swap_size[1] / target_size[1]
    box = np.asarray(target_face.box, np.float64) * (sx, sy, sx, sy)
    best = max(swap_faces, key=lambda f: box_iou(f.box, box))
    if box_iou(best.box, box) < SWAP_FACE_IOU:
        raise FaceNotFoundError("no face found where the target's face is")
    return best


class PhotoMeasurer:
    """Detects each photo once and measures each (photo, role) face once.

    Roles: ``source`` (the clearly largest face, see faces.detect.pick_source_face), ``target``
    (the largest face: the one the swap CLI replaces by default) and ``swap`` (see swap_face).
    A failure is remembered too, and raised again with its role for every pair that needs it.
    """

    def __init__(self, detector, meter: FaceMeter, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.detector, self.meter, self.max_pixels = detector, meter, max_pixels
        self.faces: dict[Path, list] = {}
        self.cache: dict[tuple[Path, str], tuple | DiffSwapError] = {}

    def measure(self, path: Path, role: str, images: dict, target=None) -> tuple:
        """(FaceMeasure, FaceRecord) of the ``role`` face in ``path``; ``images`` caches
        the pair's decoded photos; ``target`` = (target path, target face) for a swap."""
        key = (path, role)
        try:
            if role != "source" and path not in images:  # callers need these pixels
                images[path] = load_image(path, max_pixels=self.max_pixels).rgb
            if key not in self.cache or role == "swap":  # a swap's face depends on its target
                self.cache[key] = self._measure(path, role, images, target)
        except DiffSwapError as err:
            self.cache[key] = err
        found = self.cache[key]
        if isinstance(found, DiffSwapError):
            raise type(found)(f"{role}: {found}")
        return found

    def _measure(self, path: Path, role: str, images: dict, target):
        if path not in images:
            images[path] = load_image(path, max_pixels=self.max_pixels).rgb
        rgb = images[path]
        if path not in self.faces:
            self.faces[path] = self.detector.detect(rgb)
        faces = self.faces[path]
        if role == "source":
            face = pick_source_face(faces, what=path.name)
        elif role == "target":
            if not faces:
                raise FaceNotFoundError(f"no face found in {path.name}")
            face = faces[0]
        else:
            target_path, target_face = target
            face = swap_face(faces, target_face, target_count=len(self.faces[target_path]),
                             target_size=images[target_path].shape[:2],
                             swap_size=rgb.shape[:2])
        return self.meter.measure(rgb, face), face


def pose_differences(a: tuple[float, float, float], b: tuple[float, float, float]) -> np.ndarray:
    """[3] float64 absolute (yaw, pitch, roll) differences in degrees, wrapped into [0, 180]."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64) + 180.0) % 360.0 - 180.0
    return np.abs(d)


def expression_error(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between two [52] blendshape vectors (each coefficient in [0,1])."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def retrieval_ranks(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank of each query's true identity among the gallery, by Euclidean distance.

    queries: [N,D]; gallery: [M,D] (one row per identity); truth: [N] int gallery rows.
    Returns [N] int, 0 = the true identity is the nearest. Ties count against the query: the
    rank is the number of *other* identities at least as close as the true one.
    """
    q = np.asarray(queries, np.float64)
    g = np.asarray(gallery, np.float64)
    dist = np.linalg.norm(q[:, None, :] - g[None, :, :], axis=2)  # [N,M]
    rows = np.arange(len(q))
    true = dist[rows, truth][:, None]
    return (dist <= true).sum(axis=1) - 1


def topk_accuracy(ranks: np.ndarray, k: int) -> float:
    """Fraction of ranks below k (top-k retrieval accuracy)."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if ranks.size else float("nan")


def self_swap_scores(swap: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SSIM and PSNR (dB, capped at 100) of two [H,W,3] uint8 photos of the same size."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if swap.shape != target.shape:
        raise ValueError(f"swap {swap.shape} and target {target.shape} differ in size")
    ssim = structural_similarity(target, swap, channel_axis=2, data_range=255)
    if np.array_equal(swap, target):
        psnr = PSNR_CAP_DB
    else:
        psnr = min(PSNR_CAP_DB, peak_signal_noise_ratio(target, swap, data_range=255))
    return {"ssim": float(ssim), "psnr": float(psnr)}


def pair_scores(src: FaceMeasure, tgt: FaceMeasure, swp: FaceMeasure, recognizer) -> dict:
    """The per-pair numbers of a report row: identity (cosine and distances to source and
    target), pose differences (largest and per angle, degrees), expression error."""
    diff = pose_differences(swp.pose, tgt.pose)
    scores = {"id_cosine": float(cosine_similarity(swp.descriptor, src.descriptor)),
              "id_distance_source": recognizer.distance(swp.descriptor, src.descriptor),
              "id_distance_target": recognizer.distance(swp.descriptor, tgt.descriptor),
              "pose_error_deg": float(diff.max()), "pose_error_yaw_deg": float(diff[0]),
              "pose_error_pitch_deg": float(diff[1]), "pose_error_roll_deg": float(diff[2]),
              "expression_error": None}
    if swp.blendshapes is not None and tgt.blendshapes is not None:
        scores["expression_error"] = expression_error(swp.blendshapes, tgt.blendshapes)
    if swp.arcface is not None:
        scores["arcface_id_cosine"] = float(cosine_similarity(swp.arcface, src.arcface))
    return scores


def self_swap_row(swap: np.ndarray, target: np.ndarray, lpips: LPIPS | None) -> dict:
    """SSIM, PSNR and (with a model) LPIPS of a self-swap; None where the sizes differ."""
    if swap.shape != target.shape:
        return {"ssim": None, "psnr": None, "lpips": None}
    scores = self_swap_scores(swap, target)
    scores["lpips"] = lpips.distance(swap, target) if lpips is not None else None
    return scores


# ------------------------------------------------------------------------------------- LPIPS
class _Lin(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018), AlexNet variant: unit-normalised activations at five ReLUs,
    squared differences weighted by learned 1x1 convolutions, averaged over space, summed.

    Weights: one state dict with torchvision AlexNet's ``features.*`` tensors and the LPIPS
    heads ``lin0..lin4.model.1.weight`` (see docs/evaluation.md for how to build it).
    """

    CHANNELS = (64, 192, 384, 256, 256)
    TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in AlexNet's feature stack

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        for i, c in enumerate(self.CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))
        # LPIPS's fixed input scaling, not part of its weight files
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: [B,3,H,W] float in [-1,1]. Returns [B] distances (0 = identical)."""
        xa, xb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device)
        for i, layer in enumerate(self.features):
            xa, xb = layer(xa), layer(xb)
            if i in self.TAPS:
                k = self.TAPS.index(i)
                na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + getattr(self, f"lin{k}").model((na - nb) ** 2).mean((1, 2, 3))
        return total

    @torch.no_grad()
    def distance(self, swap: np.ndarray, target: np.ndarray) -> float:
        """LPIPS of two [H,W,3] uint8 photos of the same size."""
        def prep(x):
            return torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return float(self(prep(swap), prep(target))[0])


def load_lpips(path: str | Path) -> LPIPS:
    """An LPIPS model from a local state dict (.pt/.pth via weights_only, or .safetensors)."""
    from diffswap_igfi.eval.fid import load_state_dict

    state = load_state_dict(path, "LPIPS")
    model = LPIPS()
    wanted = set(model.state_dict())
    missing = sorted(wanted - set(state))
    if missing:
        raise ModelNotFoundError(
            f"{path} is not an LPIPS (AlexNet) state dict: missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; see docs/evaluation.md for how to build it")
    model.load_state_dict({k: state[k] for k in wanted})
    return model.eval()


def finite_mean(values) -> float | None:
    """Mean of the finite numbers among ``values`` (None entries skipped); None if none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(kept)) if kept else None

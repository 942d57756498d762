"""Everything the SFI stage is conditioned on, computed once per face and cached on its record.

Per face (cached in ``FaceRecord.extras``): the geometry fit, the identity embedding, the aligned
crop and the CLIP tokens of the crop with the face blanked (keyed by the blanking mask). Per
(source, target) pair: the swapped geometry rendered in the
target's crop, and the 3D-aware mask. ``save_conditions`` stores a pair's conditions as
safetensors, the form training preprocessing keeps them in.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from diffswap_igfi.faces.align import AlignedFace, align_face, transform_points
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.geometry.base import GeometryBackend, GeometryFit
from diffswap_igfi.geometry.condition import aware_mask, landmark_edge_map, landmark_heatmaps

T = TypeVar("T")


def cached(face: FaceRecord, key: str, compute: Callable[[], T]) -> T:
    """``face.extras[key]``, computed by ``compute()`` the first time it is asked for."""
    if key not in face.extras:
        face.extras[key] = compute()
    return face.extras[key]


def _key(kind: str, model: Any) -> str:
    """A cache key naming one model instance. A token stored on the model, not ``id()``: a
    collected model's id is reused, and a new model must not read the old one's results."""
    token = getattr(model, "_condition_cache_token", None)
    if token is None:
        token = uuid.uuid4().hex[:12]
        object.__setattr__(model, "_condition_cache_token", token)  # torch modules too
    return f"{kind}/{getattr(model, 'name', type(model).__name__)}/{token}"


@dataclass
class SwapConditions:
    """The conditions of one (source, target) pair, in the target's aligned crop.

    crop: [S,S,3] uint8 target crop; affine / inverse: [2,3] photo <-> crop;
    target_points, swapped_points: [K,2] float32 crop pixels (target's own geometry, and the
    source's shape under the target's pose and expression); heatmaps: [C,S/f,S/f] float32 in
    [0,1] at latent resolution; edges: [C,S,S] uint8 {0,255}; mask: [S,S] uint8 {0,255} the
    3D-aware mask, soft_mask: [S,S] float32 in [0,1]; identity: [512] float32 unit-norm source
    embedding or None; clip_tokens: [T,D] float32 target CLIP tokens or None; clip_pooled: [E].
    """

    crop: np.ndarray
    affine: np.ndarray
    inverse: np.ndarray
    target_points: np.ndarray
    swapped_points: np.ndarray
    heatmaps: np.ndarray
    edges: np.ndarray
    mask: np.ndarray
    soft_mask: np.ndarray
    swapped: GeometryFit
    identity: np.ndarray | None = None
    clip_tokens: np.ndarray | None = None
    clip_pooled: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays (for safetensors); the geometry fit's fields prefixed
        ``swapped.``."""
        out = {k: np.ascontiguousarray(v) for k, v in asdict(self).items()
               if isinstance(v, np.ndarray)}
        for k, v in asdict(self.swapped).items():
            if k != "backend":
                out[f"swapped.{k}"] = np.ascontiguousarray(np.asarray(v))
        return out


class ConditionBuilder:
    """Computes and caches conditions.

    geometry: a GeometryBackend (MediaPipe by default); identity: an encoder with
    ``embed(rgb, face) -> [512]`` (ArcFace) or None; clip: an encoder with
    ``encode_uint8(crops [B,S,S,3] uint8, mask [B,S,S] bool) -> (tokens [B,T,D], pooled [B,E])``
    that blanks the masked pixels before encoding (``conditions.clip.blank_face``), or None.
    crop_size / template: the SFI crop (FFHQ template, 512 by default); latent_factor: the VAE's
    downsampling (heatmaps are at crop_size / latent_factor); mask_dilate / mask_feather:
    fractions of the crop size. ``timings`` collects seconds per stage.
    """

    def __init__(self, geometry: GeometryBackend | None = None, identity: Any = None,
                 clip: Any = None, *, crop_size: int = 512, template: str = "ffhq",
                 latent_factor: int = 8, mask_dilate: float = 0.03,
                 mask_feather: float = 0.02) -> None:
        if geometry is None:
            from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend

            geometry = MediaPipeBackend()
        self.geometry, self.identity_encoder, self.clip_encoder = geometry, identity, clip
        self.crop_size, self.template, self.latent_factor = crop_size, template, latent_factor
        self.mask_dilate, self.mask_feather = mask_dilate, mask_feather
        self.timings: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage].append(time.perf_counter() - start)

    def _stage(self, stage: str, face: FaceRecord, key: str, compute: Callable[[], T]) -> T:
        if key in face.extras:
            return face.extras[key]
        with self._timed(stage):
            return cached(face, key, compute)

    def fit(self, rgb: np.ndarray, face: FaceRecord) -> GeometryFit:
        return self._stage("fit", face, _key("geometry", self.geometry),
                           lambda: self.geometry.fit(rgb, face))

    def aligned(self, rgb: np.ndarray, face: FaceRecord) -> AlignedFace:
        return self._stage("align", face, f"aligned/{self.template}/{self.crop_size}",
                           lambda: align_face(rgb, face.kps, self.crop_size, self.template))

    def identity(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray | None:
        if self.identity_encoder is None:
            return None
        return self._stage("identity", face, _key("identity", self.identity_encoder),
                           lambda: np.asarray(self.identity_encoder.embed(rgb, face), np.float32))

    def clip(self, rgb: np.ndarray, face: FaceRecord,
             mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """CLIP tokens of the face's crop with ``mask`` ([S,S], nonzero = the face being
        replaced) blanked: hair, lighting and background, not the identity being replaced (the
        model is trained on the same blanked crop). Cached per face and mask."""
        if self.clip_encoder is None:
            return None
        hard = np.asarray(mask) > 0
        digest = hashlib.blake2b(np.packbits(hard).tobytes(), digest_size=8).hexdigest()

        def compute() -> tuple[np.ndarray, np.ndarray]:
            crop = self.aligned(rgb, face).crop[None]
            tokens, pooled = self.clip_encoder.encode_uint8(crop, hard[None])
            return _numpy(tokens)[0], _numpy(pooled)[0]

        return self._stage("clip", face, f"{_key('clip', self.clip_encoder)}/{digest}", compute)

    def build(self, source_rgb: np.ndarray, source_face: FaceRecord, target_rgb: np.ndarray,
              target_face: FaceRecord, *, occlusion: np.ndarray | None = None,
              region: str = "face") -> SwapConditions:
        """Conditions for putting the source's identity on the target face.

        occlusion: [S,S] bool crop pixels to keep from the target (the occluder hook);
        region: what is repainted, ``face`` or ``head`` (face, hair and ears:
        ``geometry.condition.aware_mask``). CLIP sees the target's crop with the face blanked
        for a face swap, and the source's whole crop for a head swap: the hair to paint is the
        source's (as the SFI trainer does for head-masked samples, ``sfi.conditioning``).
        """
        src_fit, tgt_fit = self.fit(source_rgb, source_face), self.fit(target_rgb, target_face)
        aligned = self.aligned(target_rgb, target_face)
        with self._timed("render"):
            swapped = self.geometry.swap(src_fit, tgt_fit)
            tp = transform_points(tgt_fit.landmarks, aligned.affine)
            sp = transform_points(swapped.landmarks, aligned.affine)
            size = self.crop_size
            heat = landmark_heatmaps(sp, size, size // self.latent_factor)
            edges = landmark_edge_map(sp, size)
            mask, soft = aware_mask(tp, sp, (size, size),
                                    dilate=max(1, round(self.mask_dilate * size)),
                                    feather=max(1, round(self.mask_feather * size)),
                                    occlusion=occlusion, region=region, image=aligned.crop)
        if region == "head":
            clip = self.clip(source_rgb, source_face, np.zeros_like(mask))
        else:
            clip = self.clip(target_rgb, target_face, mask)
        return SwapConditions(aligned.crop, aligned.affine, aligned.inverse, tp, sp, heat, edges,
                              mask, soft, swapped, self.identity(source_rgb, source_face),
                              None if clip is None else clip[0],
                              None if clip is None else clip[1])


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def save_conditions(path: str | Path, conditions: SwapConditions,
                    metadata: dict[str, str] | None = None) -> Path:
    """Store a pair's conditions as one safetensors file (no pickle)."""
    from safetensors.numpy import save_file

    meta = {"backend": conditions.swapped.backend, **(metadata or {})}
    save_file(conditions.arrays(), str(path), metadata=meta)
    return Path(path)


def load_conditions(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays ``save_conditions`` wrote, by name."""
    from safetensors.numpy import load_file

    return load_file(str(path))

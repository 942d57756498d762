"""Identity encoders: ArcFace embeddings of a face, for conditioning models and training losses.

Two encoders share one 112x112 five-point alignment (``faces.align``, ArcFace template):
- ``ArcFaceONNX``: inference with a recognition model from an insightface model pack
  (buffalo_l's ``w600k_r50.onnx``, antelopev2's ``glintr100.onnx``) through onnxruntime.
- ``ArcFaceEncoderModel``: an arcface_torch iresnet in torch (a diffusers component of the SFI
  pipeline), frozen but differentiable with respect to its input, with a differentiable crop
  (``arcface_crop``) for identity losses on generated images.

No weights ship with the project (insightface's pretrained models are for non-commercial research
use); both load from local paths and say where to get them when missing.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffswap_igfi.conditions.iresnet import ARCHS, IResNet, load_iresnet
from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.align import align_face, template_points
from diffswap_igfi.faces.record import FaceRecord

EMBEDDING_DIM = 512
CROP_SIZE = 112
MODEL_PACK_HINT = (
    "get an insightface model pack (e.g. buffalo_l.zip or antelopev2.zip from "
    "github.com/deepinsight/insightface/releases) and unzip it to a local folder"
)


class IdentityEncoder(abc.ABC):
    """Maps a face in a photo to a unit-length identity embedding (larger cosine = same person)."""

    dim: int = EMBEDDING_DIM

    @abc.abstractmethod
    def embed(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        """rgb: [H,W,3] uint8 photo; face: a face in it. Returns [512] float32, unit norm."""


def cosine_similarity(a, b):
    """Cosine similarity along the last axis of two numpy arrays or two torch tensors.

    numpy: [D] x [D] -> float, [N,D] x [N,D] (or broadcastable) -> [N] float64.
    torch: differentiable, [...,D] x [...,D] -> [...] (for losses such as ``1 - cos``).
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1, eps=1e-12)
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    out = num / den
    return float(out) if np.ndim(out) == 0 else out


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check_crops(crops: np.ndarray) -> np.ndarray:
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3) or crops.dtype != np.uint8:
        raise ValueError(f"crops must be [N,112,112,3] uint8 RGB, got {crops.shape} {crops.dtype}")
    return crops


# --------------------------------------------------------------------------------- ONNX (packs)
def _dims(value_info) -> list:
    """Dimensions of an ONNX value: ints where fixed, None where symbolic or unknown."""
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def _inspect_onnx(path: Path):
    """(is_recognition, normalises_internally, fixed_batch) of one ONNX file, without running it.

    Recognition is what insightface routes to its ArcFace class: one image input [N,3,112,112]
    and one output whose last dimension is 512. Models converted from MXNet subtract and scale
    the pixels themselves: insightface tells them by Sub and Mul nodes among the first eight.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, or an unreadable file
        raise ModelNotFoundError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}): {MODEL_PACK_HINT}"
        ) from exc
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]  # old exports list weights too
    outputs = list(graph.output)
    is_rec = (len(inputs) == 1 and len(outputs) == 1
              and _dims(inputs[0])[1:] == [3, CROP_SIZE, CROP_SIZE]
              and len(_dims(outputs[0])) >= 2 and _dims(outputs[0])[-1] == EMBEDDING_DIM)
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    fixed_batch = _dims(inputs[0])[0] if inputs and _dims(inputs[0]) else None
    return is_rec, has_sub and has_mul, fixed_batch


def find_recognition_model(path: str | Path) -> Path:
    """The ArcFace ONNX file named by ``path``: the file itself, or the one in a model-pack folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelNotFoundError(f"ArcFace model {path} not found: {MODEL_PACK_HINT}")
    found = []
    for candidate in sorted(path.glob("*.onnx")):
        try:
            if _inspect_onnx(candidate)[0]:
                found.append(candidate)
        except ModelNotFoundError:
            continue  # a broken or foreign file in the pack is not the one we want
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise ModelNotFoundError(
            f"{path} holds {what} ArcFace recognition models (input [N,3,112,112], 512-d "
            f"output); pass the .onnx file itself, or {MODEL_PACK_HINT}"
        )
    return found[0]


class ArcFaceONNX(IdentityEncoder):
    """ArcFace recognition through onnxruntime, preprocessed exactly as insightface does.

    path: an .onnx file or an unzipped insightface model-pack folder (the recognition model in
    it is found by its signature). Crops go in as RGB, ``(x - 127.5) / 127.5`` (or raw 0..255
    for models that normalise internally), and embeddings come out L2-normalised.
    """

    def __init__(self, path: str | Path, *,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 batch_size: int = 32) -> None:
        import onnxruntime

        self.path = find_recognition_model(path)
        is_rec, internal_norm, fixed_batch = _inspect_onnx(self.path)
        if not is_rec:
            raise ModelNotFoundError(
                f"{self.path} is not an ArcFace recognition model (input [N,3,112,112], "
                f"512-d output): {MODEL_PACK_HINT}"
            )
        self.input_mean, self.input_std = (0.0, 1.0) if internal_norm else (127.5, 127.5)
        self.batch_size = fixed_batch or batch_size  # some exports take exactly one face
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=list(providers))
        except Exception as exc:
            raise ModelNotFoundError(
                f"onnxruntime cannot load {self.path} ({type(exc).__name__}): {MODEL_PACK_HINT}"
            ) from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """crops: [N,112,112,3] uint8 RGB -> [N,3,112,112] float32 network input."""
        crops = _check_crops(crops)
        blob = (crops.astype(np.float32) - self.input_mean) / self.input_std
        return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """crops: [N,112,112,3] uint8 RGB ArcFace-aligned -> [N,512] float32, unit norm."""
        blob = self.preprocess(crops)
        out = [self.session.run([self.output_name], {self.input_name: blob[i:i + self.batch_size]})[0]
               for i in range(0, len(blob), self.batch_size)]
        return _l2_normalise(np.concatenate(out, axis=0).reshape(len(blob), -1))

    def embed(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        return self.embed_faces(rgb, [face])[0]

    def embed_faces(self, rgb: np.ndarray, faces: list[FaceRecord]) -> np.ndarray:
        """All ``faces`` of one photo in one batch: [N,512] float32, unit norm."""
        crops = np.stack([align_face(rgb, f.kps, CROP_SIZE, "arcface").crop for f in faces])
        return self.embed_crops(crops)


# ------------------------------------------------------------------------ torch (differentiable)
def _similarity_to_template(kps: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,3] similarity transforms (photo pixels -> crop pixels) fitting kps [B,5,2] onto the
    ArcFace template in least squares; in 2D this is Umeyama's solution in closed form."""
    dst = torch.as_tensor(template_points(size, "arcface"), dtype=kps.dtype, device=kps.device)
    src_c = kps - kps.mean(1, keepdim=True)
    dst_c = dst - dst.mean(0)
    var = (src_c**2).sum((1, 2))
    a = (src_c * dst_c).sum((1, 2)) / var
    b = (src_c[..., 0] * dst_c[..., 1] - src_c[..., 1] * dst_c[..., 0]).sum(1) / var
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # scale * R
    t = dst.mean(0) - (rot @ kps.mean(1)[..., None])[..., 0]
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=kps.dtype, device=kps.device).expand(len(kps), 1, 3)
    return torch.cat([torch.cat([rot, t[..., None]], -1), bottom], 1)


def arcface_crop(images: torch.Tensor, kps: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Differentiable ArcFace alignment: the same crop as ``align_face(..., 112, "arcface")``.

    images: [B,3,H,W] float (any range, e.g. [-1,1]); kps: [B,5,2] five keypoints in pixels of
    ``images``. Returns [B,3,size,size], bilinear, reflecting at the borders; gradients flow to
    ``images`` (and to ``kps``).
    """
    b, _, h, w = images.shape
    kps = torch.as_tensor(kps, device=images.device).to(torch.float64).reshape(b, 5, 2)
    crop_from_photo = _similarity_to_template(kps, size)
    photo_from_crop = torch.linalg.inv(crop_from_photo)

    # affine_grid works in normalised coordinates (align_corners=False: -1 and 1 are the outer
    # pixel edges, pixel i has its centre at (2i + 1) / n - 1): wrap the pixel transform in them.
    def pixels_from_norm(n: int, m: int) -> torch.Tensor:  # x_pix = (x_norm + 1) * n / 2 - 0.5
        return torch.tensor([[n / 2, 0, (n - 1) / 2], [0, m / 2, (m - 1) / 2], [0, 0, 1]],
                            dtype=torch.float64, device=images.device)

    theta = torch.linalg.inv(pixels_from_norm(w, h)) @ photo_from_crop @ pixels_from_norm(size, size)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), [b, images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


class ArcFaceEncoderModel(ModelMixin, ConfigMixin, IdentityEncoder):
    """An arcface_torch iresnet ArcFace in torch: ``forward(images: [B,3,S,S] float in [-1,1]
    RGB) -> [B,512]`` L2-normalised (S = input_size, 112).

    One class for every torch use: the SFI pipeline's identity encoder (a diffusers component:
    ``config.json`` + safetensors in the pipeline folder), the identity losses (differentiable
    with respect to the input, with ``arcface_crop``), and the condition builder (``embed``).
    Frozen by default: no parameter requires grad and the network stays in eval mode even when a
    parent module is put in training mode (BatchNorm statistics are part of the pretrained
    weights), yet gradients flow to the input images.
    """

    @register_to_config
    def __init__(self, layers: Sequence[int] = ARCHS["r50"], width: int = 64,
                 num_features: int = EMBEDDING_DIM, input_size: int = CROP_SIZE,
                 frozen: bool = True) -> None:
        super().__init__()
        self.backbone = IResNet(tuple(layers), width=width, num_features=num_features,
                                input_size=input_size)
        self._freeze(frozen)

    def _freeze(self, frozen: bool) -> None:
        self.frozen = frozen
        if frozen:
            self.backbone.requires_grad_(False)
            self.eval()

    @classmethod
    def from_backbone(cls, backbone: IResNet, *, frozen: bool = True) -> ArcFaceEncoderModel:
        """Wrap an iresnet (its own weights, not a copy)."""
        model = cls(layers=backbone.layers_config, width=backbone.conv1.out_channels,
                    num_features=backbone.features.num_features,
                    input_size=backbone.input_size, frozen=frozen)
        model.backbone = backbone
        model._freeze(frozen)
        return model

    @classmethod
    def from_file(cls, path: str | Path, arch: str = "r50", *, frozen: bool = True,
                  **kw) -> ArcFaceEncoderModel:
        """Load an arcface_torch state dict (``.safetensors``/``.pt``/``.pth``; ``backbone.pth``);
        see load_iresnet."""
        return cls.from_backbone(load_iresnet(path, arch, **kw), frozen=frozen)

    def train(self, mode: bool = True) -> ArcFaceEncoderModel:
        return super().train(False if self.frozen else mode)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images), dim=-1)

    def embed_aligned(self, images: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
        """images: [B,3,H,W] float in [-1,1] RGB; kps: [B,5,2] pixels -> [B,512] unit norm
        (differentiable)."""
        return self(arcface_crop(images, kps, size=self.config.input_size))

    @torch.no_grad()
    def embed(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        crop = align_face(rgb, face.kps, self.config.input_size, "arcface").crop
        param = next(self.backbone.parameters())
        return self(to_tensor(crop[None], param.device, param.dtype))[0].float().cpu().numpy()

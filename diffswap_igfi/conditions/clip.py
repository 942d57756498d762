"""CLIP image tokens of a face crop, from an open_clip checkpoint on local disk only.

Two classes, one preprocessing (``clip_preprocess``): ``ClipImageEncoder`` loads an open_clip
checkpoint; ``ClipVisionEncoderModel`` is its image tower as a diffusers component of the SFI
pipeline (built from one with ``from_open_clip``). Both see the crop with the face blanked
(``blank_face``) when given a mask.

The SFI UNet cross-attends to the target's CLIP patch tokens (through
:class:`~diffswap_igfi.conditions.projectors.ClipTokenProjector`). Weights never come from the
network: ``pretrained`` must be a file on disk (an open_clip checkpoint downloaded elsewhere,
``open_clip_pytorch_model.bin`` / ``.safetensors`` / a raw or ``{'state_dict': ...}`` torch file).

Why no hub access can happen: open_clip downloads only when ``model_name`` carries an
``hf-hub:`` schema (refused here), when ``pretrained`` is a known tag (we pass an absolute path,
which no tag equals, and open_clip checks ``os.path.isfile`` for it), or when a tower asks for its
default base weights (we pass ``pretrained_image=False, pretrained_text=False``) or for a Hugging
Face text config (configs with ``hf_model_name`` are refused). The tests prove it with sockets
disabled. Setting ``HF_HUB_OFFLINE`` inside the library would be hidden global state, and
huggingface_hub reads it only once at import, so we do not rely on it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.errors import ConfigError, InputError, ModelNotFoundError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_SCHEMAS = ("hf-hub:", "local-dir:")
_HOW_TO_LIST = ("see open_clip.list_models() for built-in names, or add one with "
                "diffswap_igfi.conditions.clip.register_local_config(name, config)")


def register_local_config(name: str, config: dict) -> None:
    """Add an open_clip architecture ``name`` built from ``config`` (a model-config dict).

    ``config`` has open_clip's model-config layout: ``embed_dim``, ``vision_cfg`` and
    ``text_cfg`` (open_clip always builds both towers, so a tiny text tower is needed too).
    Registering the same name again replaces it. Uses only open_clip's public
    ``add_model_config``: the JSON lives in a temporary folder just long enough to be read.
    """
    import open_clip

    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ConfigError(f"open_clip config {name!r} lacks {missing}; it needs embed_dim, "
                          "vision_cfg and text_cfg")
    if not name or "/" in name or name.startswith(_SCHEMAS):
        raise ConfigError(f"invalid open_clip model name {name!r}: use a plain name like "
                          "'tiny-vit'")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    if name not in open_clip.list_models():  # pragma: no cover - open_clip changed its registry
        raise ConfigError(f"open_clip did not accept the config {name!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _build_visual(model_name: str, path: Path, image_mean, image_std):
    """Build an open_clip model from a local file and return its image tower."""
    import open_clip

    if model_name.startswith(_SCHEMAS):
        raise ConfigError(f"model name {model_name!r} uses a hub/folder schema; pass a plain "
                          f"open_clip architecture name and a local weights file ({_HOW_TO_LIST})")
    config = open_clip.get_model_config(model_name.replace("/", "-"))
    if config is None:
        raise ConfigError(f"unknown open_clip model {model_name!r}: {_HOW_TO_LIST}")
    if "hf_model_name" in config.get("text_cfg", {}):
        raise ConfigError(f"open_clip model {model_name!r} has a Hugging Face text tower, which "
                          "needs the hub to build; choose a model with an open_clip text tower")
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path.resolve()), pretrained_image=False,
            pretrained_text=False, device="cpu", precision="fp32",
            image_mean=image_mean, image_std=image_std)
    except TypeError as exc:  # a config key the model classes do not take
        raise ConfigError(f"invalid open_clip config for {model_name!r}: {_first_line(exc)}") \
            from exc
    except Exception as exc:  # open_clip raises RuntimeError/KeyError/pickle errors alike
        raise InputError(f"cannot load {path} as open_clip {model_name!r} weights: "
                         f"{_first_line(exc)}") from exc
    visual = model.visual
    if not hasattr(visual, "output_tokens"):
        raise ConfigError(f"open_clip model {model_name!r} has a {type(visual).__name__} image "
                          "tower; only open_clip VisionTransformer towers give patch tokens")
    return visual


class ClipImageEncoder(torch.nn.Module):
    """The image tower of an open_clip model: patch tokens and the pooled, projected embedding.

    Frozen by default (eval mode, ``requires_grad=False`` on every weight, kept in eval by
    ``train()``); gradients still flow to the input image, so a loss can go through it.
    ``trainable=True`` leaves the weights trainable and the mode to the caller.

    Args:
        model_name: an open_clip architecture name (``"ViT-L-14"``, or one added with
            :func:`register_local_config`).
        pretrained: path of a local open_clip checkpoint for that architecture.
        device, dtype: where and in which precision the tower runs.
        image_mean, image_std: per-channel normalisation overriding open_clip's default
            (OpenAI CLIP's statistics, right for OpenAI and LAION ViTs); SigLIP-style
            checkpoints want ``(0.5, 0.5, 0.5)`` for both.
    """

    def __init__(self, model_name: str, pretrained: str | Path, *, device="cpu",
                 dtype: torch.dtype = torch.float32, trainable: bool = False,
                 image_mean: tuple[float, float, float] | None = None,
                 image_std: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(
                f"CLIP weights not found at {path}: download an open_clip checkpoint for "
                f"{model_name!r} (e.g. open_clip_pytorch_model.bin) on a machine with network "
                "access and pass its local path")
        self.model_name = model_name
        self.visual = _build_visual(model_name, path, image_mean, image_std)
        self.visual.output_tokens = True  # open_clip's own flag: forward returns (pooled, tokens)
        cfg = self.visual.preprocess_cfg
        self.image_size = tuple(int(s) for s in self.visual.image_size)
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.fill_color = float(cfg.get("fill_color", 0)) / 255.0
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.trainable = trainable
        if not trainable:
            self.visual.requires_grad_(False)
        self.to(device=device, dtype=dtype)
        self.train(False)

    @property
    def token_dim(self) -> int:
        """D: width of the patch tokens (the ViT width)."""
        return int(self.visual.conv1.out_channels)

    @property
    def embed_dim(self) -> int:
        """E: width of the pooled, projected embedding."""
        return int(self.visual.output_dim)

    @property
    def num_tokens(self) -> int:
        """T: number of patch tokens (grid height x grid width; the class token is excluded)."""
        return int(self.visual.grid_size[0] * self.visual.grid_size[1])

    def train(self, mode: bool = True) -> ClipImageEncoder:
        super().train(mode)
        if not self.trainable:
            self.visual.eval()
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B,3,H,W] float in [-1,1] RGB -> [B,3,h,w] normalised at the model's size
        (``clip_preprocess``)."""
        return clip_preprocess(images, self.image_size, self.mean, self.std,
                               resize_mode=self.resize_mode, interpolation=self.interpolation,
                               fill=self.fill_color)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B,3,H,W] float in [-1,1] RGB, any size.

        Returns (tokens [B,T,D] patch tokens after the final LayerNorm, pooled [B,E] projected
        embedding, not L2-normalised), in the encoder's dtype.
        """
        pooled, tokens = self.visual(self.preprocess(images))
        return tokens, pooled

    forward = encode

    @torch.no_grad()
    def encode_uint8(self, crops: np.ndarray, mask: np.ndarray | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: [B,H,W,3] (or one [H,W,3]) uint8 RGB; mask: optional [B,H,W] bool, pixels to
        blank first (``blank_face``) -> (tokens [B,T,D], pooled [B,E])."""
        return self.encode(uint8_images(crops, mask, self.mean.device))


class ClipVisionEncoderModel(ModelMixin, ConfigMixin):
    """An open_clip ViT image tower: [B,3,H,W] in [-1,1] -> (tokens [B,T,D], pooled [B,E])."""

    @register_to_config
    def __init__(self, embed_dim: int = 512, vision_cfg: dict | None = None,
                 quick_gelu: bool = False, image_mean: Sequence[float] = OPENAI_MEAN,
                 image_std: Sequence[float] = OPENAI_STD) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.visual = _build_vision_tower(embed_dim, dict(vision_cfg or {}), quick_gelu)
        self.visual.output_tokens = True
        self.visual.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def token_dim(self) -> int:
        return int(self.visual.conv1.out_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = clip_preprocess(images, tuple(int(s) for s in self.visual.image_size), self.mean,
                            self.std)
        pooled, tokens = self.visual(x.to(self.mean.dtype))
        return tokens, pooled

    @torch.no_grad()
    def encode_uint8(self, crops: np.ndarray, mask: np.ndarray | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: [B,S,S,3] uint8; mask: [B,S,S] bool pixels to blank first, or None
        -> (tokens [B,T,D], pooled [B,E]); the ConditionBuilder's CLIP interface."""
        return self(uint8_images(crops, mask, self.mean.device).to(self.dtype))

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained) -> ClipVisionEncoderModel:
        """From a local open_clip checkpoint (see conditions.clip.ClipImageEncoder)."""
        import open_clip

        source = ClipImageEncoder(model_name, pretrained)
        cfg = open_clip.get_model_config(model_name)
        model = cls(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                    quick_gelu=cfg.get("quick_gelu", False),
                    image_mean=tuple(source.mean.flatten().tolist()),
                    image_std=tuple(source.std.flatten().tolist()))
        model.visual.load_state_dict(source.visual.state_dict())
        return model


def blank_face(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The crop CLIP is conditioned on, in training and inference alike: the face blanked.

    images: [B,3,S,S] float in [-1,1]; mask: [B,1,S,S] in [0,1] (1 = the face being replaced).
    Returns images * (1 - mask): the face set to 0 (mid grey), so CLIP sees hair, lighting and
    background, not the identity being replaced (the model would learn to copy it).
    """
    return images * (1 - mask.to(images))


def uint8_images(crops: np.ndarray, mask: np.ndarray | None = None,
                 device=None) -> torch.Tensor:
    """crops: [B,H,W,3] (or [H,W,3]) uint8 RGB, mask: [B,H,W] bool or None -> [B,3,H,W] float32
    in [-1,1], masked pixels blanked (``blank_face``)."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise InputError(f"crops must be [B,H,W,3] uint8, got {crops.shape} {crops.dtype}")
    x = to_tensor(crops, device)
    if mask is not None:
        hard = torch.from_numpy(np.asarray(mask, bool).reshape(len(x), 1, *x.shape[-2:]))
        x = blank_face(x, hard.to(x.device))
    return x


def clip_preprocess(images: torch.Tensor, size: tuple[int, int], mean: torch.Tensor,
                    std: torch.Tensor, *, resize_mode: str = "shortest",
                    interpolation: str = "bicubic", fill: float = 0.0) -> torch.Tensor:
    """images: [B,3,H,W] float in [-1,1] RGB -> [B,3,*size] normalised CLIP input.

    Differentiable torch version of open_clip's inference transform (resize by ``resize_mode``
    with antialiasing as PIL does, centre crop or pad, then mean/std [1,3,1,1]); the one
    preprocessing of every CLIP encoder here.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    x = (images.to(mean.dtype) + 1.0) * 0.5
    x = _resize(x, tuple(size), resize_mode, interpolation, fill)
    return (x - mean.to(x)) / std.to(x)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str, interpolation: str,
            fill: float) -> torch.Tensor:
    """x: [B,3,H,W] float in [0,1] -> [B,3,*size], following open_clip's ``resize_mode``."""
    h, w = x.shape[-2:]
    th, tw = size
    interp = "bilinear" if interpolation == "bilinear" else "bicubic"
    if mode == "squash":
        new = (th, tw)
    elif mode == "shortest" and th == tw:  # torchvision's Resize(int): the long side floors
        new = (th, int(th * w / h)) if h <= w else (int(th * h / w), th)
    else:  # open_clip's ResizeKeepRatio rounds
        ratios = (th / h, tw / w)
        scale = min(ratios) if mode == "longest" else max(ratios)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if (h, w) != new:
        # antialias matches PIL's downscaling, which open_clip's transform uses
        x = F.interpolate(x, size=new, mode=interp, align_corners=False, antialias=True)
        if interp == "bicubic":
            x = x.clamp(0.0, 1.0)
    if tuple(x.shape[-2:]) == (th, tw):
        return x
    ph, pw = max(th - x.shape[-2], 0), max(tw - x.shape[-1], 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    # torchvision's CenterCrop rounds the offset the same way
    top, left = int(round((x.shape[-2] - th) / 2.0)), int(round((x.shape[-1] - tw) / 2.0))
    return x[..., top:top + th, left:left + tw]

"""The pipeline's own encoders, as diffusers components that save with the checkpoint folder.

``ArcFaceEncoderModel`` wraps an arcface_torch iresnet, ``ClipVisionEncoderModel`` an open_clip
image tower; both carry their architecture in ``config.json`` and their weights in safetensors,
so a DiffSwapIGFIPipeline folder is complete and loads offline. Build them once from the weights
you have (``from_iresnet_file``, ``from_open_clip``) and save the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffswap_igfi.conditions.clip import clip_preprocess, uint8_images
from diffswap_igfi.conditions.identity import arcface_crop
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.conditions.iresnet import ARCHS, IResNet, load_iresnet

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ArcFaceEncoderModel(ModelMixin, ConfigMixin):
    """Frozen iresnet ArcFace: [B,3,112,112] in [-1,1] RGB -> [B,512] unit-norm embeddings."""

    @register_to_config
    def __init__(self, layers: Sequence[int] = ARCHS["r50"], width: int = 64,
                 num_features: int = 512, input_size: int = 112) -> None:
        super().__init__()
        self.backbone = IResNet(tuple(layers), width=width, num_features=num_features,
                                input_size=input_size)
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> ArcFaceEncoderModel:
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics are part of the pretrained weights
        return self

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(crops), dim=-1)

    def embed_photo(self, images: torch.Tensor, kps: torch.Tensor) -> torch.Tensor:
        """images: [B,3,H,W] in [-1,1]; kps: [B,5,2] pixels -> [B,512] (differentiable)."""
        return self(arcface_crop(images, kps, size=self.config.input_size))

    @torch.no_grad()
    def embed(self, rgb: np.ndarray, face: FaceRecord) -> np.ndarray:
        """rgb: [H,W,3] uint8 photo; face: a face in it -> [512] float32 unit norm (the
        ConditionBuilder's identity interface)."""
        crop = align_face(rgb, face.kps, self.config.input_size, "arcface").crop
        return self(to_tensor(crop[None], self.device, self.dtype))[0].float().cpu().numpy()

    @classmethod
    def from_iresnet_file(cls, path, arch: str = "r50") -> ArcFaceEncoderModel:
        """From an arcface_torch state dict (``backbone.pth`` or safetensors)."""
        model = cls(layers=ARCHS[arch])
        model.backbone.load_state_dict(load_iresnet(path, arch).state_dict())
        return model


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

        from diffswap_igfi.conditions.clip import ClipImageEncoder

        source = ClipImageEncoder(model_name, pretrained)
        cfg = open_clip.get_model_config(model_name)
        model = cls(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                    quick_gelu=cfg.get("quick_gelu", False),
                    image_mean=tuple(source.mean.flatten().tolist()),
                    image_std=tuple(source.std.flatten().tolist()))
        model.visual.load_state_dict(source.visual.state_dict())
        return model


def to_tensor(crops: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,3,H,W] float in [-1,1]."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
    return (x.to(device=device, dtype=dtype) / 127.5) - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float in [-1,1] -> [B,H,W,3] uint8 (rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)

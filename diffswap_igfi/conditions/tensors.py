"""Image batches between numpy (uint8 photos and crops) and torch (model inputs in [-1,1])."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(crops: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,3,H,W] float in [-1,1]."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
    return (x.to(device=device, dtype=dtype) / 127.5) - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] float in [-1,1] -> [B,H,W,3] uint8 (rounded)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)

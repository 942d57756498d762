"""IR-SE ArcFace backbones in the layout of TreB1eN's InsightFace_Pytorch (``model_ir_se50.pth``).

The same recognizer family as ``conditions.iresnet`` (arcface_torch), but a different network
and state-dict layout: ``input_layer`` (conv, BN, PReLU), ``body.N`` bottleneck units with a
squeeze-and-excitation gate, and ``output_layer`` (BN, dropout, flatten, linear, BN1d). Face
swappers built on pSp/e4e code (REFace, DiffSwap's identity loss) ship this file. Written from
the published architecture; the key names match the released weights so they load as they are.

No weights ship with the project. ``load_irse`` reads safetensors, or a torch file with
``weights_only=True`` (a plain state dict of tensors; nothing is unpickled beyond that).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from diffswap_igfi.errors import ModelNotFoundError

# units per stage for the published depths; stage widths are always 64, 128, 256, 512
DEPTHS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
WIDTHS = (64, 128, 256, 512)
WEIGHTS_HINT = ("get model_ir_se50.pth (InsightFace_Pytorch IR-SE50, e.g. from REFace's or pSp's "
                "release page) and pass its local path")


class SqueezeExcite(nn.Module):
    """Channel gate: x * sigmoid(fc2(relu(fc1(mean over pixels of x)))), 1x1 convs, no bias."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class StrideShortcut(nn.Module):
    """Identity shortcut of an IR unit that keeps the width: subsampling by ``stride``
    (a 1x1 max pool in the original, which has no parameters)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x


class IRSEUnit(nn.Module):
    """BN-conv3x3-PReLU-conv3x3(stride)-BN-SE residual plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cin == cout:
            self.shortcut_layer = StrideShortcut(stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
            SqueezeExcite(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEBackbone(ModelMixin, ConfigMixin):
    """IR-SE ArcFace: [B,3,S,S] float in [-1,1] RGB (S = input_size, 112) -> [B,512] unit norm.

    units: residual units per stage ((3,4,14,3) is IR-SE50); widths: the four stage widths
    (smaller only for tests). Always in eval mode: BatchNorm statistics are part of the weights.
    """

    @register_to_config
    def __init__(self, units: Sequence[int] = DEPTHS[50], widths: Sequence[int] = WIDTHS,
                 input_size: int = 112, num_features: int = 512) -> None:
        super().__init__()
        w0 = widths[0]
        self.input_layer = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(w0), nn.PReLU(w0))
        body, cin = [], w0
        for count, cout in zip(units, widths):
            for i in range(count):
                body.append(IRSEUnit(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*body)
        side = input_size // 2 ** len(units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Dropout(0.0), nn.Flatten(),
            nn.Linear(cin * side * side, num_features), nn.BatchNorm1d(num_features))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> IRSEBackbone:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file loaded with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"IR-SE weights {path} not found: {WEIGHTS_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for anything beyond plain tensors
        raise ModelNotFoundError(f"{path} is not a plain state dict of tensors "
                                 f"({type(exc).__name__}): {WEIGHTS_HINT}") from exc
    if not isinstance(state, dict):
        raise ModelNotFoundError(f"{path} holds a {type(state).__name__}, not a state dict: "
                                 f"{WEIGHTS_HINT}")
    return state


def load_irse(path: str | Path, num_layers: int = 50) -> IRSEBackbone:
    """An IR-SE backbone (50/100/152 layers, 112 px input) from ``model_ir_se50.pth``-style
    weights (safetensors or a torch state dict). Missing or unexpected keys are an error."""
    if num_layers not in DEPTHS:
        raise ValueError(f"num_layers must be one of {sorted(DEPTHS)}, got {num_layers}")
    model = IRSEBackbone(units=DEPTHS[num_layers])
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelNotFoundError(f"{path} does not fit IR-SE{num_layers} "
                                 f"({str(exc).splitlines()[0]}): {WEIGHTS_HINT}") from exc
    return model

"""The improved ResNet ("iresnet") face-recognition backbone of insightface's arcface_torch.

Written from the architecture's description: pre-activation-style basic blocks (BN, conv, BN,
PReLU, strided conv, BN, plus a shortcut), four stages that each halve the resolution, and a
BN -> flatten -> dropout -> linear -> BN head producing the embedding. Parameter names follow
arcface_torch's so its published ``backbone.pth`` state dicts load without renaming.

The weights themselves are not shipped (insightface's pretrained models are for non-commercial
research use); ``load_iresnet`` reads a state dict the user downloaded, and never unpickles
arbitrary objects.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from diffswap_igfi.errors import ModelNotFoundError

ARCHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
ARCFACE_TORCH_HINT = (
    "get an arcface_torch backbone (backbone.pth) from the insightface model zoo "
    "(github.com/deepinsight/insightface, recognition/arcface_torch) and pass its local path"
)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """bn1 -> conv1 -> bn2 -> prelu -> conv2 (strided) -> bn3, plus the (downsampled) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """iresnet backbone. ``forward(images: [B,3,S,S] float in [-1,1] RGB) -> [B,num_features]``.

    layers: blocks per stage (r50 = (3,4,14,3), r100 = (3,13,30,3)). width: channels of the stem
    and first stage; stages use width * (1,2,4,8) (64 for the real models; smaller for tests).
    input_size: S, a multiple of 16 (112 for ArcFace crops: the last stage is 7x7).
    The embedding is *not* L2-normalised here (arcface_torch's convention).
    """

    def __init__(self, layers: Sequence[int] = ARCHS["r50"], *, width: int = 64,
                 num_features: int = 512, input_size: int = 112, dropout: float = 0.0) -> None:
        super().__init__()
        if len(layers) != 4 or input_size % 16:
            raise ValueError("layers needs 4 stage depths and input_size a multiple of 16")
        self.layers_config = tuple(int(n) for n in layers)
        self.input_size = input_size
        widths = [width, width * 2, width * 4, width * 8]
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        inplanes = width
        for i, (planes, blocks) in enumerate(zip(widths, self.layers_config), start=1):
            setattr(self, f"layer{i}", self._make_layer(inplanes, planes, blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        side = input_size // 16
        self.fc = nn.Linear(inplanes * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        # arcface_torch fixes the scale of the last BN to 1 (only its shift is learned).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
        # Every stage halves the resolution in its first block, so that block always needs a
        # projection shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        mods = [IBasicBlock(inplanes, planes, 2, downsample)]
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet(arch: str = "r50", **kw) -> IResNet:
    """An untrained backbone of a named depth (``r18 r34 r50 r100 r200``); kw go to IResNet."""
    if arch not in ARCHS:
        raise ValueError(f"unknown iresnet arch {arch!r}; choose {sorted(ARCHS)}")
    kw.setdefault("layers", ARCHS[arch])
    return IResNet(**kw)


def iresnet50(**kw) -> IResNet:
    return iresnet("r50", **kw)


def iresnet100(**kw) -> IResNet:
    return iresnet("r100", **kw)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pt``/``.pth`` state dict file, on the CPU.

    ``.pt`` files are read with ``weights_only=True``: a file holding pickled objects other than
    tensors and plain containers is refused, since unpickling it could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"iresnet weights {path} not found: {ARCFACE_TORCH_HINT}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ModelNotFoundError(
                f"{path} is not a readable safetensors file ({type(exc).__name__})"
            ) from exc
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelNotFoundError(
                f"{path} holds pickled objects other than tensors; refusing to unpickle it "
                "(save a plain state dict, or convert it to .safetensors)"
            ) from exc
        except Exception as exc:
            raise ModelNotFoundError(
                f"{path} is not a readable torch state dict ({type(exc).__name__})"
            ) from exc
    else:
        raise ModelNotFoundError(
            f"{path}: unsupported weights format {suffix!r}; use .safetensors, .pt or .pth"
        )
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelNotFoundError(f"{path} does not hold a state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _summarise(keys: Sequence[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_iresnet(path: str | Path, arch: str = "r50", **kw) -> IResNet:
    """An iresnet with the weights of a local state dict file, in eval mode on the CPU.

    arch: ``r18 r34 r50 r100 r200``; kw go to IResNet (e.g. ``layers``/``width`` for small
    variants). Keys are checked strictly (only BatchNorm's ``num_batches_tracked`` counters may
    be absent) and shapes must match; a mismatch names a few offending keys.
    """
    state = read_state_dict(path)
    model = iresnet(arch, **kw)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_summarise(unexpected)}")
        raise ModelNotFoundError(
            f"{path} does not match iresnet {arch!r}: {'; '.join(parts)} "
            "(wrong arch, or not an arcface_torch backbone?)"
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k = sorted(wrong)[0]
        raise ModelNotFoundError(
            f"{path} does not match iresnet {arch!r}: {len(wrong)} tensors have other shapes, "
            f"e.g. {k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=False)  # missing keys were checked above
    return model.eval()

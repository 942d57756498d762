"""3DDFA_V2's regressor in torch: differentiable BFM parameters of a face in an image.

The geometry backend (``geometry.tddfa``) runs 3DDFA_V2's MobileNet through ONNX on numpy
photos. Training losses on generated images (MFIM's shape/pose/expression supervision, GHOST's
eye loss) need gradients, so this module holds the same network as a torch module that loads the
*same* weights: the ``mb1_120x120.onnx`` of the converted folder (its initialisers, batch norms
folded into the convolutions as the exporter does), or a safetensors state dict of this module.

- ``TDDFARegressor``: MobileNet-v1 (3DDFA_V2's ``mobilenet_1``: a 3x3 stride-2 stem, 13
  depthwise-separable blocks, global average pool, linear head), every batch norm folded into
  its convolution, ReLU. ``widen_factor`` scales the widths (1.0 for the release model).
- ``load_tddfa_regressor(path)``: from an ONNX file (walks the graph: Conv, optional
  BatchNormalization, Relu, pooling, Gemm or MatMul+Add) or from ``*.safetensors``.
- ``roi_crop``: the regressor's input cut from a batch of images by a differentiable affine
  sampling of each face's roi box (bilinear, zero outside the image), BGR and scaled by
  ``(v - 127.5) / 128`` as 3DDFA_V2 feeds it; ``roi_boxes_from_kps``: that roi box from five
  keypoints (what training batches carry).
- ``TDDFAParams`` (``from_path``: a folder or a regressor file): regressor + basis
  normalisation: images and boxes in, de-normalised params [B, 12+S+E] out, ``split`` into pose
  [B,3,4], shape [B,S], expression [B,E], and (with the BFM basis) ``landmarks``: the 68
  keypoints in image pixels, differentiable.
- ``ThreeDMMLoss`` (MFIM's 3DMM supervision): the swap's shape equal to the source's, its pose
  and expression equal to the target's; ``EyeLoss`` (GHOST's eye loss): eye-region landmark
  heatmaps of the swap equal to the target's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffswap_igfi.errors import ConfigError, ModelNotFoundError

# (input width factor, output width factor, stride) of the 13 depthwise-separable blocks
_BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
           (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
           (512, 512, 1), (512, 1024, 2), (1024, 1024, 1))
POSE_DIM = 12
INPUT_SIZE = 120


class TDDFARegressor(nn.Module):
    """3DDFA_V2's MobileNet-v1 with batch norms folded: x [B,3,120,120] (BGR, (v-127.5)/128)
    -> normalised params [B, num_params]."""

    def __init__(self, widen_factor: float = 1.0, num_params: int = 62) -> None:
        super().__init__()
        self.widen_factor, self.num_params = float(widen_factor), int(num_params)

        def width(c: int) -> int:
            return int(c * widen_factor)

        self.stem = nn.Conv2d(3, width(32), 3, stride=2, padding=1)
        convs = []
        for cin, cout, stride in _BLOCKS:
            convs.append(nn.Conv2d(width(cin), width(cin), 3, stride=stride, padding=1,
                                   groups=width(cin)))
            convs.append(nn.Conv2d(width(cin), width(cout), 1))
        self.blocks = nn.ModuleList(convs)
        self.head = nn.Linear(width(1024), num_params)

    def convolutions(self) -> list[nn.Conv2d]:
        """Every convolution in graph order (the order an exported ONNX lists them)."""
        return [self.stem, *self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for conv in self.blocks:
            x = F.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


# -- loading -----------------------------------------------------------------------------------
def _onnx_layers(path: Path) -> tuple[list[dict], tuple[np.ndarray, np.ndarray]]:
    """Convolutions (weight, bias, stride, pad, group; batch norms folded) and the linear head
    (weight [out,in], bias [out]) of a 3DDFA_V2-style ONNX graph, in graph order."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    for node in model.graph.node:  # some exporters keep weights as Constant nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    init[node.output[0]] = numpy_helper.to_array(attr.t).astype(np.float64)
    convs: list[dict] = []
    by_output: dict[str, dict] = {}
    head_w = head_b = None
    pending_matmul: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            weight = init[node.input[1]]
            bias = init[node.input[2]] if len(node.input) > 2 and node.input[2] else \
                np.zeros(weight.shape[0])
            conv = {"weight": weight, "bias": bias, "stride": tuple(attrs.get("strides", (1, 1))),
                    "pads": tuple(attrs.get("pads", (0, 0, 0, 0))), "group": attrs.get("group", 1)}
            convs.append(conv)
            by_output[node.output[0]] = conv
        elif node.op_type == "BatchNormalization":
            conv = by_output.get(node.input[0])
            if conv is None:
                raise ConfigError(f"{path}: a batch norm that does not follow a convolution")
            scale, shift, mean, var = (init[n] for n in node.input[1:5])
            k = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
            conv["weight"] = conv["weight"] * k[:, None, None, None]
            conv["bias"] = (conv["bias"] - mean) * k + shift
            by_output[node.output[0]] = conv
        elif node.op_type == "Gemm":
            weight, bias = init[node.input[1]], init[node.input[2]]
            head_w = weight if attrs.get("transB", 0) else weight.T
            head_b = bias
        elif node.op_type == "MatMul" and node.input[1] in init:
            pending_matmul[node.output[0]] = init[node.input[1]].T
        elif node.op_type == "Add" and node.input[0] in pending_matmul and node.input[1] in init:
            head_w, head_b = pending_matmul[node.input[0]], init[node.input[1]]
    if head_w is None:
        raise ConfigError(f"{path}: no linear head (Gemm or MatMul+Add) in the graph")
    return convs, (head_w, head_b)


def _infer_widen(first_conv_out: int) -> float:
    return first_conv_out / 32.0


def regressor_from_onnx(path: str | Path) -> TDDFARegressor:
    """A TDDFARegressor holding the weights of an exported 3DDFA_V2 MobileNet ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"3DDFA_V2 regressor {path} not found")
    convs, (head_w, head_b) = _onnx_layers(path)
    net = TDDFARegressor(_infer_widen(convs[0]["weight"].shape[0]), head_w.shape[0])
    ours = net.convolutions()
    if len(convs) != len(ours):
        raise ConfigError(f"{path} has {len(convs)} convolutions, 3DDFA_V2's MobileNet has "
                          f"{len(ours)}: not an mb1 regressor")
    for i, (conv, module) in enumerate(zip(convs, ours)):
        pads = conv["pads"]
        if (tuple(conv["weight"].shape) != tuple(module.weight.shape)
                or conv["stride"] != module.stride or conv["group"] != module.groups
                or pads[:2] != module.padding):
            raise ConfigError(f"{path}: convolution {i} is {conv['weight'].shape} stride "
                              f"{conv['stride']} group {conv['group']}, expected "
                              f"{tuple(module.weight.shape)} stride {module.stride} group "
                              f"{module.groups}: not an mb1 regressor")
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(conv["weight"]))
            module.bias.copy_(torch.from_numpy(conv["bias"]))
    if tuple(head_w.shape) != tuple(net.head.weight.shape):
        raise ConfigError(f"{path}: head {head_w.shape}, expected {tuple(net.head.weight.shape)}")
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(head_w))
        net.head.bias.copy_(torch.from_numpy(head_b))
    return net.eval()


def save_regressor(net: TDDFARegressor, path: str | Path) -> Path:
    """Write the regressor as safetensors (widths and head size in the metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"widen_factor": repr(net.widen_factor),
                        "num_params": str(net.num_params)})
    return path


def load_tddfa_regressor(path: str | Path) -> TDDFARegressor:
    """From ``mb1_120x120.onnx`` (the backend's file) or a ``.safetensors`` from
    ``save_regressor``; in eval mode, on the CPU, float32."""
    path = Path(path)
    if path.suffix == ".onnx":
        return regressor_from_onnx(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: load the regressor from .onnx or .safetensors")
    if not path.is_file():
        raise ModelNotFoundError(f"3DDFA_V2 regressor {path} not found")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        net = TDDFARegressor(float(meta["widen_factor"]), int(meta["num_params"]))
    except KeyError as missing:
        raise ConfigError(f"{path} lacks {missing} in its metadata; write it with "
                          f"save_regressor") from None
    net.load_state_dict(state)
    return net.eval()


# -- the differentiable input --------------------------------------------------------------------
def roi_crop(images: torch.Tensor, boxes: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """The regressor's input, differentiable in ``images`` (and ``boxes``).

    images: [B,3,H,W] float RGB in [-1,1]; boxes: [B,4] (x0, y0, x1, y1) in pixels, pixel
    centres at integer coordinates (the numpy backend's convention: the crop of ``x0..x1``
    resized to ``size`` with bilinear interpolation). Returns [B,3,size,size] BGR scaled like
    3DDFA_V2's ``(v - 127.5) / 128`` with v in 0..255, zero (that is, v = 0) outside the image.
    """
    b, _, h, w = images.shape
    boxes = boxes.to(images.dtype)
    # cv2.resize samples source pixel x0 + (i + 0.5) * side / size - 0.5 for output pixel i;
    # in grid_sample's normalised coordinates (align_corners=False) pixel p is (2p + 1) / W - 1.
    ramp = (torch.arange(size, dtype=images.dtype, device=images.device) + 0.5) / size
    xs = boxes[:, 0:1] + ramp[None] * (boxes[:, 2:3] - boxes[:, 0:1]) - 0.5
    ys = boxes[:, 1:2] + ramp[None] * (boxes[:, 3:4] - boxes[:, 1:2]) - 0.5
    gx = (2 * xs + 1) / w - 1
    gy = (2 * ys + 1) / h - 1
    grid = torch.stack([gx[:, None, :].expand(b, size, size),
                        gy[:, :, None].expand(b, size, size)], dim=-1)
    pixels = (images + 1) * 127.5  # 0..255
    crop = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    return (crop.flip(1) - 127.5) / 128.0


# Fitted on the 9 faces of the shipped photos (MediaPipe mesh -> 68 points -> 3DDFA_V2's
# landmark roi): the roi's centre lies 0.67 +- 0.11 of the way from the eye centre to the mouth
# centre (0.10 +- 0.18 of it sideways: taken as 0), its side is 3.17 +- 0.24 eye-to-mouth
# distances (the eye-to-eye distance varies 3x more with yaw).
KPS_ROI_CENTRE = 0.67
KPS_ROI_SIDE = 3.17


def roi_boxes_from_kps(kps: torch.Tensor) -> torch.Tensor:
    """3DDFA_V2's roi box of faces known by their five keypoints (no 68-point fit needed).

    kps: [B,5,2] pixels in ArcFace order (eyes, nose, mouth corners). Returns [B,4] (x0, y0,
    x1, y1), square, axis-aligned, not rounded (``roi_crop`` samples sub-pixel boxes): centre
    ``KPS_ROI_CENTRE`` of the way from the eye centre to the mouth centre, side ``KPS_ROI_SIDE``
    eye-to-mouth distances. On aligned crops (fixed template) this is nearly one fixed box.
    """
    kps = kps.float()
    eyes, mouth = kps[:, :2].mean(1), kps[:, 3:5].mean(1)
    centre = eyes + KPS_ROI_CENTRE * (mouth - eyes)
    half = 0.5 * KPS_ROI_SIDE * (mouth - eyes).norm(dim=-1, keepdim=True)
    return torch.cat([centre - half, centre + half], dim=-1)


class TDDFAParams(nn.Module):
    """Differentiable 3DDFA_V2 parameters: regressor + the basis' normalisation.

    ``forward(images [B,3,H,W] in [-1,1], boxes [B,4])`` -> de-normalised params [B,12+S+E].
    """

    def __init__(self, regressor: TDDFARegressor, param_mean: np.ndarray,
                 param_std: np.ndarray, shape_dim: int,
                 basis: dict[str, np.ndarray] | None = None) -> None:
        super().__init__()
        if regressor.num_params != len(param_mean):
            raise ConfigError(f"the regressor outputs {regressor.num_params} params, the basis "
                              f"expects {len(param_mean)}; use the ONNX and basis of one model")
        self.regressor = regressor
        self.register_buffer("mean", torch.as_tensor(np.asarray(param_mean), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.asarray(param_std), dtype=torch.float32))
        self.shape_dim = int(shape_dim)
        self.has_basis = basis is not None
        if basis is not None:  # u_base [68,3], w_shp_base [204,S], w_exp_base [204,E]
            for name in ("u_base", "w_shp_base", "w_exp_base"):
                self.register_buffer(name, torch.as_tensor(np.asarray(basis[name]),
                                                           dtype=torch.float32))

    @classmethod
    def from_folder(cls, folder: str | Path) -> TDDFAParams:
        """From the backend's converted folder (``mb1_120x120.onnx`` + ``bfm_68.*``)."""
        from diffswap_igfi.geometry.tddfa import ONNX_NAME, load_basis

        folder = Path(folder)
        basis = load_basis(folder)
        return cls(load_tddfa_regressor(folder / ONNX_NAME), basis["param_mean"],
                   basis["param_std"], basis["w_shp_base"].shape[1], basis)

    @classmethod
    def from_path(cls, path: str | Path) -> TDDFAParams:
        """From the converted folder (``mb1_120x120.onnx``, or ``mb1_120x120.safetensors``
        from ``save_regressor``, beside ``bfm_68.*``) or from a regressor file (.onnx or
        .safetensors) whose folder holds the basis."""
        from diffswap_igfi.geometry.tddfa import ONNX_NAME, load_basis

        path = Path(path).expanduser()
        if path.is_dir():
            folder = path
            onnx_file = folder / ONNX_NAME
            regressor = onnx_file if onnx_file.is_file() else onnx_file.with_suffix(
                ".safetensors")
        else:
            folder, regressor = path.parent, path
        basis = load_basis(folder)
        return cls(load_tddfa_regressor(regressor), basis["param_mean"], basis["param_std"],
                   basis["w_shp_base"].shape[1], basis)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        normalised = self.regressor(roi_crop(images, boxes))
        return normalised * self.std.to(normalised.dtype) + self.mean.to(normalised.dtype)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """params [B,12+S+E] -> pose [B,3,4], shape [B,S], expression [B,E]."""
        s = self.shape_dim
        return (params[:, :POSE_DIM].reshape(-1, 3, 4), params[:, POSE_DIM:POSE_DIM + s],
                params[:, POSE_DIM + s:])

    def landmarks(self, params: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The 68 BFM keypoints of de-normalised ``params`` [B,12+S+E] regressed in ``boxes``
        [B,4], in image pixels [B,68,2] (x right, y down), as 3DDFA_V2 reconstructs them:
        ``P @ (u + W_shp a + W_exp b) + offset`` in 1-based crop pixels with y up."""
        if not self.has_basis:
            raise ConfigError("landmarks need the BFM basis: build with TDDFAParams.from_folder")
        pose, shape, expression = self.split(params)
        flat = (self.u_base.reshape(-1)[None] + shape @ self.w_shp_base.T
                + expression @ self.w_exp_base.T)  # [B,204] x,y,z interleaved
        points = flat.reshape(len(params), -1, 3)
        crop = points @ pose[:, :, :3].transpose(1, 2) + pose[:, None, :, 3]  # [B,68,3]
        k = ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1]))[:, None] / (2 * INPUT_SIZE)
        x = (crop[..., 0] - 1) * k + boxes[:, 0:1]
        y = (INPUT_SIZE - crop[..., 1]) * k + boxes[:, 1:2]
        return torch.stack([x, y], dim=-1)


class ThreeDMMLoss(nn.Module):
    """MFIM's 3DMM supervision on a generated swap (e.g. the decoded midpoint estimate).

    Params are compared after normalisation by the regressor's std (each coefficient in its own
    units), with an L1 distance: shape of the swap to the source's; pose and expression of the
    swap to the target's. Returns a dict of scalar terms and their weighted ``total``.
    """

    def __init__(self, params: TDDFAParams, *, shape_weight: float = 1.0,
                 pose_weight: float = 1.0, expression_weight: float = 1.0) -> None:
        super().__init__()
        self.params = params
        self.weights = (float(shape_weight), float(pose_weight), float(expression_weight))
        for p in self.params.parameters():
            p.requires_grad_(False)  # a frozen judge: gradients flow to the images only

    def forward(self, swap: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                swap_boxes: torch.Tensor, source_boxes: torch.Tensor,
                target_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """swap/source/target: [B,3,H,W] in [-1,1]; boxes [B,4] pixels (3DDFA rois)."""
        with torch.no_grad():
            src = self.params(source, source_boxes)
            tgt = src if (target is source and target_boxes is source_boxes) else \
                self.params(target, target_boxes)
        return self.terms(self.params(swap, swap_boxes), src, tgt)

    def terms(self, out: torch.Tensor, src: torch.Tensor,
              tgt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss from de-normalised params [B,12+S+E] already regressed (``TDDFAParams``
        outputs) of the swap (with gradients), the source and the target (constants)."""
        std = self.params.std.to(out.dtype)
        split = self.params.split
        (p_out, s_out, e_out), (_, s_src, _), (p_tgt, _, e_tgt) = \
            split(out / std), split(src.detach() / std), split(tgt.detach() / std)
        terms = {"shape": (s_out - s_src).abs().mean(), "pose": (p_out - p_tgt).abs().mean(),
                 "expression": (e_out - e_tgt).abs().mean()}
        terms["total"] = sum(w * terms[k] for w, k in zip(self.weights,
                                                           ("shape", "pose", "expression")))
        return terms


EYE_POINTS = tuple(range(36, 48))  # the 68-point scheme's eye contours


def landmark_heatmaps(points: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """points [B,K,2] pixels -> [B,K,H,W] Gaussian heatmaps (peak 1), differentiable."""
    h, w = size
    ys = torch.arange(h, dtype=points.dtype, device=points.device)[None, None, :, None]
    xs = torch.arange(w, dtype=points.dtype, device=points.device)[None, None, None, :]
    d2 = (xs - points[..., 0, None, None]) ** 2 + (ys - points[..., 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma ** 2))


class EyeLoss(nn.Module):
    """GHOST's eye loss: eye-region landmark heatmaps of the swap equal to the target's, so gaze
    and eyelids follow the target. Landmarks from the differentiable 3DDFA regressor."""

    def __init__(self, params: TDDFAParams, *, sigma: float = 2.0) -> None:
        super().__init__()
        self.params, self.sigma = params, float(sigma)
        for p in self.params.parameters():
            p.requires_grad_(False)

    def forward(self, swap: torch.Tensor, target: torch.Tensor,
                boxes: torch.Tensor) -> torch.Tensor:
        """swap/target: [B,3,H,W] in [-1,1], aligned alike (the swap repaints the target's crop);
        boxes [B,4] the target's 3DDFA rois. Returns the mean squared heatmap difference."""
        with torch.no_grad():
            want = self.params(target, boxes)
        return self.from_params(self.params(swap, boxes), want, boxes, swap.shape[-2:])

    def from_params(self, got: torch.Tensor, want: torch.Tensor, boxes: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
        """The loss from de-normalised params [B,12+S+E] of the swap (with gradients) and of
        the target (a constant), both regressed in ``boxes`` [B,4] of images of ``size``."""
        eyes = list(EYE_POINTS)
        with torch.no_grad():
            want_maps = landmark_heatmaps(self.params.landmarks(want.detach(), boxes)[:, eyes],
                                          size, self.sigma)
        got_points = self.params.landmarks(got, boxes)[:, eyes]
        return (landmark_heatmaps(got_points, size, self.sigma) - want_maps).pow(2).mean()

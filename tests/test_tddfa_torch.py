"""3DDFA_V2's regressor in torch equals the ONNX one on the same (tiny, random) weights, and its
input crop is the backend's, but differentiable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.geometry.tddfa_torch import (TDDFAParams, TDDFARegressor,
                                                load_tddfa_regressor, regressor_from_onnx,
                                                roi_crop, save_regressor)

WIDEN = 0.125  # widths 4..128: the release architecture, small enough for a unit test


def random_net(seed: int = 0) -> TDDFARegressor:
    torch.manual_seed(seed)
    net = TDDFARegressor(WIDEN, 62)
    with torch.no_grad():
        for conv in net.convolutions():
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0, (2.0 / fan_in) ** 0.5)
            conv.bias.uniform_(-0.1, 0.1)
        net.head.weight.normal_(0, 0.05)
        net.head.bias.uniform_(-0.5, 0.5)
    return net.eval()


def write_onnx(net: TDDFARegressor, path, *, unfused: bool, rng=None) -> None:
    """The net as an exported graph: Conv (+ BatchNormalization when ``unfused``, the fused
    weights split back into a conv and a random batch norm that recombine to the same map),
    Relu, GlobalAveragePool, Flatten, Gemm."""
    rng = rng or np.random.default_rng(1)
    nodes, inits, x = [], [], "input"
    for i, conv in enumerate(net.convolutions()):
        w = conv.weight.detach().double().numpy()
        b = conv.bias.detach().double().numpy()
        attrs = {"strides": list(conv.stride), "pads": [conv.padding[0]] * 4,
                 "group": conv.groups, "kernel_shape": list(conv.kernel_size)}
        if unfused:
            scale = rng.uniform(0.5, 2.0, len(b))
            var = rng.uniform(0.5, 2.0, len(b))
            mean = rng.normal(0, 0.1, len(b))
            k = scale / np.sqrt(var + 1e-5)
            raw_w = w / k[:, None, None, None]
            shift = b - (0 - mean) * k  # conv without bias: y = (conv - mean) * k + shift
            inits += [numpy_helper.from_array(raw_w.astype(np.float32), f"w{i}")]
            for name, v in (("s", scale), ("sh", shift), ("m", mean), ("v", var)):
                inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}{i}"))
            nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], **attrs))
            nodes.append(helper.make_node("BatchNormalization",
                                          [f"c{i}", f"s{i}", f"sh{i}", f"m{i}", f"v{i}"],
                                          [f"n{i}"], epsilon=1e-5))
            pre = f"n{i}"
        else:
            inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                      numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], **attrs))
            pre = f"c{i}"
        nodes.append(helper.make_node("Relu", [pre], [f"r{i}"]))
        x = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1)]
    inits += [numpy_helper.from_array(net.head.weight.detach().numpy(), "fc_w"),
              numpy_helper.from_array(net.head.bias.detach().numpy(), "fc_b")]
    graph = helper.make_graph(
        nodes, "mb1_tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                          [None, 3, 120, 120])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 62])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


@pytest.mark.parametrize("unfused", [False, True], ids=["folded", "batchnorm"])
def test_torch_regressor_equals_onnx_on_the_same_weights(tmp_path, unfused):
    net = random_net()
    write_onnx(net, tmp_path / "mb1.onnx", unfused=unfused)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 120, 120)).astype(np.float32)
    expected = run_onnx(tmp_path / "mb1.onnx", x)
    loaded = load_tddfa_regressor(tmp_path / "mb1.onnx")
    assert loaded.widen_factor == WIDEN and loaded.num_params == 62
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    assert np.abs(expected).max() > 0.1  # the outputs are not trivially small
    # the bound: two runtimes (ORT vs torch) on the same float32 weights
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_safetensors_round_trip_and_wrong_graphs(tmp_path):
    net = random_net(3)
    save_regressor(net, tmp_path / "mb1.safetensors")
    again = load_tddfa_regressor(tmp_path / "mb1.safetensors")
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # copied values
    with pytest.raises(ConfigError):
        load_tddfa_regressor(tmp_path / "mb1.pth")
    # a graph that is not 3DDFA_V2's MobileNet is refused with a message
    small = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w", "b"], ["output"], transB=1)], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.zeros((2, 4), np.float32), "w"),
         numpy_helper.from_array(np.zeros(2, np.float32), "b")])
    onnx.save(helper.make_model(small, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "other.onnx"))
    with pytest.raises((ConfigError, IndexError)):
        regressor_from_onnx(tmp_path / "other.onnx")


def test_roi_crop_matches_the_backend_preprocessing_and_has_gradients(photos, faces):
    from diffswap_igfi.geometry.tddfa import MESH_TO_68, crop_roi, roi_box_from_landmarks
    import cv2

    rgb = photos["astronaut"].rgb
    box = roi_box_from_landmarks(faces["astronaut"][0].points[list(MESH_TO_68)])
    crop = cv2.resize(crop_roi(np.ascontiguousarray(rgb[..., ::-1]), box), (120, 120),
                      interpolation=cv2.INTER_LINEAR)
    expected = (crop.astype(np.float32).transpose(2, 0, 1) - 127.5) / 128.0
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    images.requires_grad_(True)
    got = roi_crop(images, torch.tensor(box)[None])
    inner = (slice(None), slice(2, -2), slice(2, -2))  # cv2 replicates the crop's own border
    diff = np.abs(got[0].detach().numpy()[inner] - expected[inner])
    # cv2 interpolates uint8 in fixed point (1/2048 weights): under a level or two of 255
    assert diff.max() < 2.5 / 128 and diff.mean() < 0.3 / 128
    got.sum().backward()
    assert images.grad.abs().sum() > 0


def test_params_module_denormalises_and_splits():
    net = random_net(4)
    mean, std = np.arange(62, dtype=np.float32), np.full(62, 2.0, np.float32)
    model = TDDFAParams(net, mean, std, shape_dim=40)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    boxes = torch.tensor([[4.0, 4.0, 60.0, 60.0], [0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        params = model(images, boxes)
        raw = net(roi_crop(images, boxes))
    torch.testing.assert_close(params, raw * 2 + torch.arange(62.0))
    pose, shape, expression = model.split(params)
    assert pose.shape == (2, 3, 4) and shape.shape == (2, 40) and expression.shape == (2, 10)
    with pytest.raises(ConfigError):
        TDDFAParams(net, mean[:50], std[:50], shape_dim=40)


def basis_model(seed: int = 5) -> TDDFAParams:
    from test_tddfa import make_arrays

    arrays = make_arrays()
    basis = {"u_base": arrays["u_base"].reshape(-1, 3), "w_shp_base": arrays["w_shp_base"],
             "w_exp_base": arrays["w_exp_base"]}
    net = random_net(seed)
    with torch.no_grad():  # keep outputs near the mean so poses stay plausible
        net.head.weight.mul_(0.01)
        net.head.bias.zero_()
    return TDDFAParams(net, arrays["param_mean"], arrays["param_std"],
                       arrays["w_shp_base"].shape[1], basis), arrays


def test_landmarks_are_3ddfa_reconstruction(rng):
    from test_tddfa import pose_params, reference_landmarks

    model, arrays = basis_model()
    s = arrays["w_shp_base"].shape[1]
    e = arrays["w_exp_base"].shape[1]
    params = np.concatenate([pose_params(10, -5, 3), rng.normal(0, 1, s + e)])
    box = np.array([100.0, 80.0, 260.0, 240.0])
    got = model.landmarks(torch.tensor(params, dtype=torch.float32)[None],
                          torch.tensor(box, dtype=torch.float32)[None])[0].numpy()
    expected = reference_landmarks(params, box, arrays)
    np.testing.assert_allclose(got, expected, atol=0.05)  # float32 vs float64, ~100 px coords


def test_3dmm_and_eye_losses_vanish_on_their_references_and_reach_the_image():
    from diffswap_igfi.geometry.tddfa_torch import EyeLoss, ThreeDMMLoss

    model, _ = basis_model()
    g = torch.Generator().manual_seed(0)
    source, target = (torch.rand(1, 3, 96, 96, generator=g) * 2 - 1 for _ in range(2))
    boxes = torch.tensor([[8.0, 8.0, 88.0, 88.0]])
    loss = ThreeDMMLoss(model)
    same_as_source = loss(source.clone(), source, target, boxes, boxes, boxes)
    same_as_target = loss(target.clone(), source, target, boxes, boxes, boxes)
    assert same_as_source["shape"] < 1e-6 < same_as_source["pose"]
    assert same_as_target["pose"] < 1e-6 and same_as_target["expression"] < 1e-6
    assert same_as_target["shape"] > 1e-4
    swap = ((source + target) / 2).requires_grad_(True)
    terms = loss(swap, source, target, boxes, boxes, boxes)
    terms["total"].backward()
    assert swap.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # a frozen judge

    eye = EyeLoss(model)
    assert eye(target.clone(), target, boxes) < 1e-8
    swap = source.clone().requires_grad_(True)
    value = eye(swap, target, boxes)
    value.backward()
    assert value > 0 and swap.grad.abs().sum() > 0

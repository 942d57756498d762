"""Identity encoders: tiny models built here in the real formats (insightface-style ONNX packs,
arcface_torch state dicts) and loaded through the real loaders, on real detected faces."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line
from onnx import TensorProto, helper
from safetensors.torch import save_file

from diffswap_igfi.conditions.identity import (ArcFaceEncoderModel, ArcFaceONNX, IdentityEncoder,
                                               arcface_crop, cosine_similarity)
from diffswap_igfi.conditions.iresnet import IResNet, iresnet, iresnet50, load_iresnet
from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.align import align_face
from tolerances import assert_same_maths

TINY = dict(layers=(1, 1, 1, 1), width=8)


def tiny_iresnet(seed: int = 0) -> IResNet:
    """A tiny iresnet with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = iresnet("r50", **TINY)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean") or name.endswith("bias"):
                t.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model.eval()


def export_onnx(model: torch.nn.Module, path, *, dynamic_batch: bool = True) -> None:
    """Export like insightface's packs: input "input.1" [None,3,112,112], one [None,512] output."""
    axes = {"input.1": {0: "None"}, "embedding": {0: "None"}} if dynamic_batch else None
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and enough here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), str(path), dynamo=False,
                          input_names=["input.1"], output_names=["embedding"], dynamic_axes=axes)


def decoy_onnx(path, input_shape, n_outputs: int) -> None:
    """A non-recognition model (detector- or landmark-like signature) made of Identity nodes."""
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, input_shape)
    outs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None)
            for i in range(n_outputs)]
    nodes = [helper.make_node("Identity", ["input.1"], [f"out{i}"]) for i in range(n_outputs)]
    graph = helper.make_graph(nodes, "decoy", [x], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_iresnet()


@pytest.fixture(scope="module")
def pack(tmp_path_factory, tiny_model):
    """A buffalo_l-like folder: detector and landmark decoys, a broken file, the recognizer."""
    root = tmp_path_factory.mktemp("buffalo_tiny")
    decoy_onnx(root / "det_10g.onnx", [1, 3, None, None], 9)
    decoy_onnx(root / "2d106det.onnx", [None, 3, 192, 192], 1)
    (root / "broken.onnx").write_bytes(b"not a protobuf at all")
    export_onnx(tiny_model, root / "w600k_r50.onnx")
    return root


@pytest.fixture
def crops(photos, rng):
    """Two crops: Tom Hanks (a real aligned 112 px face) and noise."""
    hanks = photos["tom_hanks"].rgb
    assert hanks.shape == (112, 112, 3)
    return np.stack([hanks, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)])


def torch_reference(model: torch.nn.Module, crops: np.ndarray) -> np.ndarray:
    """The same embedding computed independently: RGB, (x - 127.5) / 127.5, torch, L2."""
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        out = model(x)
    return torch.nn.functional.normalize(out, dim=-1).numpy()


# ---------------------------------------------------------------------------- iresnet (torch)
def test_full_size_key_names():
    keys = iresnet50().state_dict()
    assert keys["fc.weight"].shape == (512, 25088)
    for name in ("conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.downsample.0.weight",
                 "layer1.0.downsample.1.running_var", "layer2.3.bn3.bias", "layer3.13.conv2.weight",
                 "layer4.2.prelu.weight", "bn2.weight", "features.running_var", "features.bias"):
        assert name in keys
    assert "layer3.14.conv1.weight" not in keys and "layer1.1.downsample.0.weight" not in keys
    deep = iresnet("r100", width=8).state_dict()  # key names do not depend on the width
    assert "layer2.12.conv1.weight" in deep and "layer3.29.bn3.running_var" in deep
    assert "layer3.30.bn1.weight" not in deep


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_iresnet_round_trips_exactly(tmp_path, tiny_model, suffix):
    path = tmp_path / f"backbone{suffix}"
    state = tiny_model.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = load_iresnet(path, "r50", **TINY)
    assert not loaded.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert_same_maths(loaded(x), tiny_model(x))  # reloaded weights: kernels may round differently on another memory layout


def test_load_iresnet_key_mismatch_is_named(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["layer2.0.conv2.weight"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "backbone.pt"
    torch.save(state, path)
    with pytest.raises(ModelNotFoundError) as err:
        load_iresnet(path, "r50", **TINY)
    assert "layer2.0.conv2.weight" in str(err.value) and "head.weight" in str(err.value)
    assert_one_line(str(err.value))
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(ModelNotFoundError, match="shapes"):  # right keys, wrong width
        load_iresnet(path, "r50", layers=(1, 1, 1, 1), width=16)


class _Arbitrary:
    def __reduce__(self):
        return (print, ("this would run on unpickling",))


def test_load_iresnet_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Arbitrary()}, path)
    with pytest.raises(ModelNotFoundError, match="refusing to unpickle") as err:
        load_iresnet(path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert_one_line(str(err.value))


def test_load_iresnet_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="arcface_torch") as err:
        load_iresnet(tmp_path / "nope.pth")
    assert "nope.pth" in str(err.value)
    assert_one_line(str(err.value))


# ------------------------------------------------------------------------------ ONNX (packs)
def test_onnx_picks_recognition_model_from_pack(pack):
    enc = ArcFaceONNX(pack)
    assert enc.path.name == "w600k_r50.onnx" and isinstance(enc, IdentityEncoder)
    assert (enc.input_mean, enc.input_std) == (127.5, 127.5)
    assert ArcFaceONNX(pack / "w600k_r50.onnx").path == enc.path


def test_onnx_embeddings_match_independent_computation(pack, tiny_model, crops):
    enc = ArcFaceONNX(pack)
    emb = enc.embed_crops(crops)
    assert emb.shape == (2, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(enc.embed_crops(crops), emb)  # deterministic
    np.testing.assert_allclose(emb, torch_reference(tiny_model, crops), atol=1e-5)
    np.testing.assert_allclose(enc.embed_crops(crops[1]), emb[1:], atol=1e-6)  # batch = single


def test_onnx_detects_internal_normalisation_and_fixed_batch(tmp_path, tiny_model, crops):
    """MXNet-converted packs subtract and scale inside the graph (Sub/Mul among the first
    nodes) and take raw 0..255 pixels; some exports also fix the batch at one face."""

    class Normalising(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model

        def forward(self, x):
            return self.net((x - 127.5) * (1 / 127.5))

    path = tmp_path / "glint_mx.onnx"
    export_onnx(Normalising().eval(), path, dynamic_batch=False)
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node[:8]):
        if node.op_type in ("Sub", "Mul"):
            node.name = f"{node.op_type}_{i}"  # MXNet-style node names
    onnx.save(model, str(path))
    enc = ArcFaceONNX(path)
    assert (enc.input_mean, enc.input_std, enc.batch_size) == (0.0, 1.0, 1)
    np.testing.assert_allclose(enc.embed_crops(crops), torch_reference(tiny_model, crops),
                               atol=1e-5)


def test_embed_real_faces_end_to_end(pack, tiny_model, photos, faces):
    enc = ArcFaceONNX(pack)
    rgb, face = photos["grace_hopper"].rgb, faces["grace_hopper"][0]
    emb = enc.embed(rgb, face)
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert abs(np.linalg.norm(emb) - 1) < 1e-6
    group = enc.embed_faces(photos["group"].rgb, faces["group"])
    assert group.shape == (len(faces["group"]), 512) == (6, 512)
    np.testing.assert_allclose(group[2], enc.embed(photos["group"].rgb, faces["group"][2]),
                               atol=1e-5)
    # Same weights and the same alignment: the torch encoder agrees with the ONNX one.
    torch_emb = ArcFaceEncoderModel.from_backbone(tiny_model).embed(rgb, face)
    assert torch_emb.shape == (512,) and torch_emb.dtype == np.float32
    np.testing.assert_allclose(torch_emb, emb, atol=1e-5)


def test_onnx_missing_or_invalid_models(tmp_path, pack):
    with pytest.raises(ModelNotFoundError, match="buffalo_l") as err:
        ArcFaceONNX(tmp_path / "models" / "buffalo_l")
    assert "models/buffalo_l" in str(err.value)
    assert_one_line(str(err.value))
    garbage = tmp_path / "w600k_r50.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not onnx" * 10)
    with pytest.raises(ModelNotFoundError, match="not a valid ONNX model") as err:
        ArcFaceONNX(garbage)
    assert_one_line(str(err.value))
    with pytest.raises(ModelNotFoundError, match="not an ArcFace recognition model"):
        ArcFaceONNX(pack / "det_10g.onnx")
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    decoy_onnx(decoys / "det_10g.onnx", [1, 3, None, None], 9)
    with pytest.raises(ModelNotFoundError, match="holds no ArcFace") as err:
        ArcFaceONNX(decoys)
    assert_one_line(str(err.value))
    (decoys / "a.onnx").write_bytes((pack / "w600k_r50.onnx").read_bytes())
    (decoys / "b.onnx").write_bytes((pack / "w600k_r50.onnx").read_bytes())
    with pytest.raises(ModelNotFoundError, match=r"holds 2 .*a\.onnx, b\.onnx"):
        ArcFaceONNX(decoys)


# -------------------------------------------------------------- differentiable crop and loss
def test_arcface_crop_matches_align_face_and_passes_gradients(photos, faces, tiny_model):
    rgb, face = photos["astronaut"].rgb, faces["astronaut"][0]
    reference = align_face(rgb, face.kps, 112, "arcface").crop.astype(np.float64)
    images = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1).requires_grad_()
    kps = torch.from_numpy(face.kps)[None]
    crop = arcface_crop(images, kps)
    assert crop.shape == (1, 3, 112, 112)
    ours = ((crop[0].detach().permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float64)
    # Grey levels on 0..255: only rounding apart (cv2 warps with 5-bit fixed-point weights).
    assert np.abs(ours - reference).mean() < 0.5 and np.abs(ours - reference).max() <= 1.0

    group, group_faces = photos["group"].rgb, faces["group"]  # a batch, one kps set per face
    batch = torch.from_numpy(group).permute(2, 0, 1)[None].float().expand(len(group_faces),
                                                                         -1, -1, -1)
    batch_kps = np.stack([f.kps for f in group_faces])
    crops = (arcface_crop(batch / 127.5 - 1, batch_kps).permute(0, 2, 3, 1).numpy() + 1) * 127.5
    for f, ours in zip(group_faces, crops):
        reference = align_face(group, f.kps, 112, "arcface").crop
        assert np.abs(ours - reference).max() <= 1.0

    encoder = ArcFaceEncoderModel.from_backbone(tiny_model)
    target = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    loss = 1 - cosine_similarity(encoder(crop), target).mean()
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_torch_arcface_is_frozen_and_normalised(tiny_model):
    encoder = ArcFaceEncoderModel.from_backbone(tiny_model)
    parent = torch.nn.Sequential(encoder).train()
    assert not encoder.training and not encoder.backbone.training
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    out = encoder(x)
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert not parent[0].backbone.bn1.training
    trainable = ArcFaceEncoderModel.from_backbone(iresnet("r50", **TINY), frozen=False).train()
    assert trainable.backbone.training and trainable.backbone.conv1.weight.requires_grad


def test_cosine_similarity():
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    assert cosine_similarity(a, b) == pytest.approx(2**-0.5)
    np.testing.assert_allclose(cosine_similarity(np.stack([a, b]), b), [2**-0.5, 1.0])
    t = torch.tensor([[3.0, 4.0]], requires_grad=True)
    out = cosine_similarity(t, torch.tensor([[4.0, 3.0]]))
    assert out.shape == (1,) and out.item() == pytest.approx(24 / 25)
    out.sum().backward()
    assert t.grad is not None

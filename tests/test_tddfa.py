"""The 3DDFA_V2 backend, with a tiny synthetic BFM basis and a tiny ONNX regressor in the real
file layout. The reference reconstruction below follows 3DDFA_V2's formulas (x,y,z interleaved
keypoints, ``P @ X + offset``, 1-based x, y up, roi scaling), written apart from the module."""

from __future__ import annotations

import math
import pickle

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from conftest import assert_one_line
from diffswap_igfi.errors import ConfigError, ModelNotFoundError
from diffswap_igfi.faces.record import FaceRecord, rotation_to_euler
from diffswap_igfi.geometry.tddfa import (TDDFABackend, convert_3ddfa_v2, crop_roi, main,
                                          roi_box_from_landmarks)

SIZE = 120
S, E = 40, 10


# -- the tiny model ----------------------------------------------------------------------------
def mean_face() -> np.ndarray:
    """[68,3] a plausible face in the 68-point order, BFM-like units (micrometres), x right,
    y up, z towards the camera."""
    t = np.linspace(0, math.pi, 17)
    jaw = np.c_[-72 * np.cos(t), 5 - 80 * np.sin(t), -40 + 40 * np.sin(t)]
    bx = np.linspace(-60, -15, 5)
    brow_r = np.c_[bx, 32 + 6 * np.sin((bx + 60) / 45 * math.pi), np.full(5, 20.0)]
    brow_l = brow_r[::-1] * np.array([-1, 1, 1])
    bridge = np.c_[np.zeros(4), np.linspace(20, -18, 4), np.linspace(25, 55, 4)]
    nostril = np.c_[np.linspace(-16, 16, 5), np.full(5, -28.0), [30, 36, 42, 36, 30]]

    def ring(cx, cy, a, b, n, z):
        u = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.c_[cx - a * np.cos(u), cy + b * np.sin(u), np.full(n, z)]

    pts = np.vstack([jaw, brow_r, brow_l, bridge, nostril, ring(-35, 12, 13, 5, 6, 15),
                     ring(35, 12, 13, 5, 6, 15), ring(0, -48, 28, 12, 12, 25),
                     ring(0, -48, 20, 4, 8, 22)])
    assert pts.shape == (68, 3)
    return pts * 1000.0


def rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(roll) Ry(yaw) Rx(pitch), degrees (faces.record.rotation_to_euler's convention)."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_params(yaw, pitch, roll, c=4.7e-4, offset=(61.0, 58.0, 5.0)) -> np.ndarray:
    return np.c_[c * rot(yaw, pitch, roll), offset].reshape(-1)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Basis and normalisation at the release files' magnitudes (pose entries ~1e-4, offsets
    ~10 px), so float32 network outputs keep sub-millipixel precision as the real ones do."""
    rng = np.random.default_rng(seed)
    pose_scale = np.tile([2e-4, 2e-4, 2e-4, 20.0], 3)
    scale = np.concatenate([pose_scale, np.ones(S + E)])
    return {"u_base": mean_face().reshape(-1).astype(np.float32),  # x,y,z interleaved
            "w_shp_base": rng.normal(0, 2000, (204, S)).astype(np.float32),
            "w_exp_base": rng.normal(0, 1500, (204, E)).astype(np.float32),
            "param_mean": (scale * rng.normal(0, 0.5, 12 + S + E)).astype(np.float32),
            "param_std": (scale * rng.uniform(0.5, 2.0, 12 + S + E)).astype(np.float32)}


def write_onnx(path, bias: np.ndarray, weight: np.ndarray) -> None:
    """output [1,62] = mean over pixels of input [1,3,120,120] (per channel) @ weight + bias."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["mw"]),
         helper.make_node("Add", ["mw", "b"], ["output"])],
        "tiny_tddfa",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, bias.size])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"),
         numpy_helper.from_array(bias.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_bundle(folder, pose, arrays=None, *, image_dependent=True, fmt="safetensors"):
    """A folder like the real one. Params = pose + shape/expression that follow the crop's mean
    colour when ``image_dependent`` (the pose part never does, so it stays a scaled rotation)."""
    arrays = arrays or make_arrays()
    rng = np.random.default_rng(1)
    params = np.concatenate([pose, rng.normal(0, 1, S + E)])
    weight = np.zeros((3, params.size))
    if image_dependent:
        weight[:, 12:] = rng.normal(0, 1, (3, S + E))
    bias = (params - arrays["param_mean"]) / arrays["param_std"]
    folder.mkdir(parents=True, exist_ok=True)
    write_onnx(folder / "mb1_120x120.onnx", bias, weight)
    if fmt == "npz":
        np.savez(folder / "bfm_68.npz", **arrays)
    else:
        save_file(arrays, str(folder / "bfm_68.safetensors"))
    return folder, params, weight, arrays


def synthetic_face(centre=(200.0, 190.0), size=90.0, seed=2) -> FaceRecord:
    rng = np.random.default_rng(seed)
    pts = np.asarray(centre) + rng.uniform(-size / 2, size / 2, (478, 2))
    return FaceRecord(pts.astype(np.float32), (400, 400))


def uniform(rgb=(200, 100, 50)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (400, 400, 3)).copy()


def expected_params(params, weight, arrays, rgb):
    """What the tiny net returns for a uniform photo: per-channel means of the BGR input."""
    bgr = (np.array(rgb[::-1], np.float64) - 127.5) / 128.0
    return (bgr @ weight + (params - arrays["param_mean"]) / arrays["param_std"]) \
        * arrays["param_std"] + arrays["param_mean"]


def reference_landmarks(params, box, arrays) -> np.ndarray:
    """3DDFA_V2's 68-point reconstruction, mapped to photo pixels [68,2]."""
    p = np.asarray(params, np.float64)
    flat = (arrays["u_base"].astype(np.float64) + arrays["w_shp_base"] @ p[12:12 + S]
            + arrays["w_exp_base"] @ p[12 + S:])
    vert = flat.reshape(3, -1, order="F")  # column j = (x_j, y_j, z_j)
    cam = p[:12].reshape(3, 4)[:, :3] @ vert + p[:12].reshape(3, 4)[:, 3:]
    k = (box[2] - box[0]) / SIZE
    return np.c_[(cam[0] - 1) * k + box[0], (SIZE - cam[1]) * k + box[1]]


def interocular(lm68: np.ndarray) -> float:
    return float(np.linalg.norm(lm68[36:42].mean(0) - lm68[42:48].mean(0)))


def fit_weak_perspective(model: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Least-squares rotation [3,3] with pixels ≈ s (R X)[:2] (1,-1) + t (test's own solver)."""
    sol, *_ = np.linalg.lstsq(np.c_[model, np.ones(len(model))], pixels, rcond=None)
    affine = sol[:3].T * np.array([[1.0], [-1.0]])
    u, _, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt
    return np.vstack([rows, np.cross(rows[0], rows[1])])


def angle_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


# -- loading -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_loads_from_folder(tmp_path, fmt):
    folder, *_ = make_bundle(tmp_path / "m", pose_params(10, 5, -3), fmt=fmt)
    backend = TDDFABackend(folder)
    assert (backend.name, backend.num_landmarks, backend.input_size) == ("3ddfa_v2", 68, 120)
    assert (backend.shape_dim, backend.exp_dim) == (S, E)
    np.testing.assert_array_equal(backend.u_base, mean_face().astype(np.float32))
    np.testing.assert_allclose(backend.model_points(np.zeros(S), np.zeros(E)), backend.u_base)


def test_missing_files_are_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        TDDFABackend(tmp_path / "nowhere")
    assert_one_line(str(err.value))
    assert "nowhere" in str(err.value) and "--allow-pickle" in str(err.value)
    folder, *_ = make_bundle(tmp_path / "m", pose_params(0, 0, 0))
    (folder / "bfm_68.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="bfm_68") as err:
        TDDFABackend(folder)
    assert_one_line(str(err.value))
    (folder / "mb1_120x120.onnx").unlink()
    with pytest.raises(ModelNotFoundError, match="mb1_120x120.onnx") as err:
        TDDFABackend(folder)
    assert_one_line(str(err.value))


# -- cropping and input ------------------------------------------------------------------------
def test_roi_box_rule_and_crop_padding():
    pts = np.array([[10.0, 20.0], [50.0, 40.0], [30.0, 25.0]])
    side = 40 * math.sqrt(2)  # the square around the 40x20 box, side its diagonal
    np.testing.assert_array_equal(roi_box_from_landmarks(pts),
                                  np.round([30 - side / 2, 30 - side / 2, 30 + side / 2,
                                            30 + side / 2]))
    img = np.arange(16, dtype=np.uint8).reshape(4, 4) + 1
    out = crop_roi(img, np.array([-1, -1, 3, 5]))
    assert out.shape == (6, 4)
    np.testing.assert_array_equal(out[1:5, 1:], img[:, :3])
    assert out[0].sum() == 0 and out[:, 0].sum() == 0 and out[5].sum() == 0


def test_regress_feeds_bgr_normalised_crop(tmp_path):
    folder, params, weight, arrays = make_bundle(tmp_path / "m", pose_params(10, 5, -3))
    backend = TDDFABackend(folder)
    face = synthetic_face()
    got, box = backend.regress(uniform(), face)
    assert box[2] - box[0] == box[3] - box[1] and np.all(box == np.round(box))
    np.testing.assert_allclose(got, expected_params(params, weight, arrays, (200, 100, 50)),
                               rtol=1e-5, atol=1e-5)
    rgb_order = expected_params(params, weight, arrays, (50, 100, 200))
    assert np.abs(got - rgb_order).max() > 1e-2  # the channel order matters and is BGR


# -- acceptance: the fit reproduces 3DDFA_V2's reconstruction ---------------------------------
def test_fit_reproduces_3ddfa_reconstruction(tmp_path):
    folder, params, weight, arrays = make_bundle(tmp_path / "m", pose_params(25, -10, 8))
    backend = TDDFABackend(folder)
    rgb, face = uniform(), synthetic_face()
    fit = backend.fit(rgb, face)
    regressed, box = backend.regress(rgb, face)
    ref = reference_landmarks(regressed, box, arrays)
    assert fit.landmarks.shape == (68, 2) and fit.landmarks.dtype == np.float32
    assert np.abs(fit.landmarks - ref).max() < 1e-3  # exact up to float32
    exact = reference_landmarks(expected_params(params, weight, arrays, (200, 100, 50)), box,
                                arrays)
    assert np.abs(fit.landmarks - exact).max() < 1e-2  # the float32 net, not the conversion
    own = backend.project(fit.shape, fit.expression, fit)
    err = np.linalg.norm(own - ref, axis=1).mean()
    assert err < 0.01 * interocular(ref) and err < 1e-3
    np.testing.assert_allclose(fit.rotation @ fit.rotation.T, np.eye(3), atol=1e-12)
    assert angle_diff(fit.pose, (25, -10, 8)) < 1e-3
    assert fit.scale == pytest.approx(4.7e-4 * (box[2] - box[0]) / SIZE, rel=1e-5)


def test_fit_of_a_sheared_pose_stays_close(tmp_path):
    """A network's P is only nearly a scaled rotation: the nearest one still reproduces it."""
    pose = pose_params(-20, 12, 4).reshape(3, 4)
    pose[0, :3] *= 1.01  # rows 1% apart in norm and 0.5% off orthogonal
    pose[1, :3] += 0.005 * pose[0, :3]
    folder, _, _, arrays = make_bundle(tmp_path / "m", pose.reshape(-1))
    backend = TDDFABackend(folder)
    fit = backend.fit(uniform(), synthetic_face())
    ref = reference_landmarks(*backend.regress(uniform(), synthetic_face()), arrays)
    err = np.linalg.norm(fit.landmarks - ref, axis=1).mean()
    assert 1e-3 < err < 0.01 * interocular(ref)


# -- swap ---------------------------------------------------------------------------------------
def test_swap_keeps_target_pose_and_expression(tmp_path):
    arrays = make_arrays()
    src_dir, *_ = make_bundle(tmp_path / "src", pose_params(-15, 8, -12), arrays)
    tgt_dir, *_ = make_bundle(tmp_path / "tgt", pose_params(25, -10, 5), arrays)
    source = TDDFABackend(src_dir).fit(uniform((30, 160, 220)), synthetic_face(seed=3))
    backend = TDDFABackend(tgt_dir)
    target = backend.fit(uniform((200, 100, 50)), synthetic_face(centre=(210, 180), seed=4))
    assert np.abs(source.shape - target.shape).max() > 0.1  # different people

    swapped = backend.swap(source, target)
    assert swapped.backend == "3ddfa_v2"
    assert angle_diff(swapped.pose, target.pose) < 2.0
    assert angle_diff(swapped.pose, (25, -10, 5)) < 1e-3
    np.testing.assert_array_equal(swapped.shape, source.shape)
    np.testing.assert_array_equal(swapped.expression, target.expression)
    model = backend.model_points(source.shape, target.expression)
    refit = rotation_to_euler(fit_weak_perspective(model, swapped.landmarks))
    assert angle_diff(refit, target.pose) < 2.0
    assert angle_diff(refit, source.pose) > 10.0
    assert np.abs(swapped.landmarks - target.landmarks).max() > 0.5  # the shape did change


# -- conversion of the original pickles ---------------------------------------------------------
def write_release(root, arrays, vertex_keypoints: bool = False):
    """Fake 3DDFA_V2 checkout: configs/bfm_noneck_v3.pkl, configs/param_mean_std_62d_120x120.pkl,
    weights/mb1_120x120.onnx, with the original dict layouts. Returns the 68 vertex indices."""
    rng = np.random.default_rng(5)
    n = 300
    vidx = rng.choice(n, 68, replace=False)
    u = rng.normal(0, 5e4, (n, 3))
    u[vidx] = arrays["u_base"].reshape(68, 3)
    w_shp = rng.normal(0, 1e3, (3 * n, 60))
    w_exp = rng.normal(0, 1e3, (3 * n, 29))
    keys3 = (3 * vidx[:, None] + np.arange(3)).reshape(-1)
    w_shp[keys3, :S], w_exp[keys3, :E] = arrays["w_shp_base"], arrays["w_exp_base"]
    (root / "configs").mkdir(parents=True)
    (root / "weights").mkdir()
    bfm = {"u": u.reshape(-1, 1).astype(np.float32), "w_shp": w_shp.astype(np.float32),
           "w_exp": w_exp.astype(np.float32), "tri": np.zeros((3, 10), np.int32),
           "keypoints": vidx if vertex_keypoints else keys3}
    with open(root / "configs" / "bfm_noneck_v3.pkl", "wb") as f:
        pickle.dump(bfm, f)
    with open(root / "configs" / "param_mean_std_62d_120x120.pkl", "wb") as f:
        pickle.dump({"mean": arrays["param_mean"], "std": arrays["param_std"]}, f)
    return vidx


@pytest.mark.parametrize("vertex_keypoints", [False, True])
def test_converter_writes_loadable_folder(tmp_path, vertex_keypoints):
    arrays = make_arrays()
    made, *_ = make_bundle(tmp_path / "made", pose_params(5, 5, 5), arrays)
    src = tmp_path / "3DDFA_V2"
    write_release(src, arrays, vertex_keypoints)
    (made / "mb1_120x120.onnx").rename(src / "weights" / "mb1_120x120.onnx")
    with pytest.warns(UserWarning, match="trusted source"):
        out = convert_3ddfa_v2(src, tmp_path / "out", allow_pickle=True)
    assert sorted(p.name for p in out.iterdir()) == ["bfm_68.safetensors", "mb1_120x120.onnx"]
    backend = TDDFABackend(out)
    np.testing.assert_array_equal(backend.u_base, arrays["u_base"].reshape(68, 3))
    np.testing.assert_array_equal(backend.w_shp, arrays["w_shp_base"])
    np.testing.assert_array_equal(backend.w_exp, arrays["w_exp_base"])
    fit = backend.fit(uniform(), synthetic_face())
    ref = reference_landmarks(*backend.regress(uniform(), synthetic_face()), arrays)
    assert np.abs(fit.landmarks - ref).max() < 1e-3


def test_converter_refuses_pickle_without_the_flag(tmp_path, capsys):
    write_release(tmp_path / "src", make_arrays())
    with pytest.raises(ConfigError, match="allow_pickle") as err:
        convert_3ddfa_v2(tmp_path / "src", tmp_path / "out")
    assert_one_line(str(err.value))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "src"), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert_one_line(capsys.readouterr().err)


# -- a real face ---------------------------------------------------------------------------------
def test_fit_on_real_faces(tmp_path, photos, faces):
    folder, *_ = make_bundle(tmp_path / "m", pose_params(0, 0, 0))
    backend = TDDFABackend(folder)
    for name in ("astronaut", "group"):
        face = faces[name][0]
        fit = backend.fit(photos[name].rgb, face)
        assert fit.shape.shape == (S,) and fit.expression.shape == (E,)
        assert fit.landmarks.shape == (68, 2) and fit.rotation.shape == (3, 3)
        assert all(np.all(np.isfinite(v)) for v in (fit.shape, fit.expression, fit.rotation,
                                                    fit.translation, fit.landmarks))
        x0, y0, x1, y1 = backend.roi_box(face)
        kps = face.kps
        assert np.all((kps >= [x0, y0]) & (kps <= [x1, y1]))  # the roi holds the face
        # the untrained regressor puts the mean face in the middle of the roi
        centre = fit.landmarks.mean(0)
        assert x0 < centre[0] < x1 and y0 < centre[1] < y1

"""Geometry: MediaPipe backend fit/project/swap, condition rendering, the 3D-aware mask."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.align import align_face, transform_points
from diffswap_igfi.faces.landmarker import landmarker_model_path
from diffswap_igfi.geometry.canonical import canonical_face
from diffswap_igfi.geometry.condition import (MESH_REGIONS, aware_mask, debug_panel,
                                              landmark_edge_map, landmark_heatmaps)
from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend


@pytest.fixture(scope="module")
def backend():
    return MediaPipeBackend()


def _angle_gap(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def test_canonical_face_is_read_from_the_bundle():
    vertices, triangles = canonical_face()
    assert vertices.shape == (468, 3) and triangles.shape[1] == 3
    assert triangles.max() == 467
    # MediaPipe's canonical face: symmetric about x = 0, the tip of the nose (vertices 1 and 4)
    # nearest the camera, forehead (10) above the chin (152)
    assert int(vertices[:, 2].argmax()) in (1, 4)
    assert vertices[10, 1] > 0 > vertices[152, 1]
    assert abs(vertices[:, 0].mean()) < 1e-3


def test_missing_geometry_metadata_is_a_clear_error(tmp_path):
    bundle = tmp_path / "stripped.task"
    with zipfile.ZipFile(landmarker_model_path()) as src, zipfile.ZipFile(bundle, "w") as dst:
        for item in src.infolist():
            if not item.filename.startswith("geometry"):
                dst.writestr(item, src.read(item))
    with pytest.raises(ModelNotFoundError, match="geometry_pipeline_metadata"):
        canonical_face(bundle)


@pytest.mark.parametrize("name,index", [("astronaut", 0), ("grace_hopper", 0), ("group", 1),
                                        ("group", 2)])
def test_projecting_a_face_with_its_own_parameters_reproduces_its_landmarks(backend, faces, name,
                                                                            index):
    face = faces[name][index]
    fit = backend.fit(None, face)
    own = backend.project(fit.shape, fit.expression, fit)
    err = np.linalg.norm(own - fit.landmarks, axis=1).mean()
    assert err < 0.01 * face.interocular
    # and the fit explains the detector's mesh (the split into shape and expression loses
    # nothing)
    to_detector = np.linalg.norm(own - face.points[:468], axis=1).mean()
    assert to_detector < 0.01 * face.interocular


def test_fitted_pose_agrees_with_mediapipes_own_head_pose(backend, faces):
    for name, index in [("astronaut", 0), ("grace_hopper", 0), ("group", 1), ("group", 2)]:
        face = faces[name][index]
        # MediaPipe's matrix comes from a perspective fit, ours from a weak-perspective one
        assert _angle_gap(backend.fit(None, face).pose, face.pose) < 6.0, name


def test_swapped_geometry_keeps_target_pose_and_expression_with_source_shape(backend, faces):
    source = backend.fit(None, faces["grace_hopper"][0])
    target = backend.fit(None, faces["group"][1])  # turned 50 degrees, mouth slightly open
    swapped = backend.swap(source, target)
    assert np.array_equal(swapped.shape, source.shape)
    assert np.array_equal(swapped.expression, target.expression)
    assert _angle_gap(swapped.pose, target.pose) < 1e-9
    # fitting the swapped 3D landmarks again recovers the target's pose ...
    refit = backend.fit_points(backend.landmarks3d(swapped.shape, swapped.expression, swapped))
    assert _angle_gap(refit.pose, target.pose) < 2.0
    # ... the source's shape and the target's expression, not the other way round
    assert (np.linalg.norm(refit.shape - source.shape)
            < 0.5 * np.linalg.norm(refit.shape - target.shape))
    assert (np.linalg.norm(refit.expression - target.expression)
            < 0.5 * np.linalg.norm(refit.expression - source.expression))


def test_expression_weight_marks_lips_and_eyelids_not_the_nose(backend):
    w = backend.expression_weight
    assert w.shape == (468,) and w.min() >= 0 and w.max() <= 1
    assert w[13] == pytest.approx(1.0) and w[159] == pytest.approx(1.0)  # inner lip, eyelid
    assert w[1] < 0.05 and w[10] < 0.01  # nose tip, forehead


def test_heatmaps_peak_at_the_landmarks():
    points = np.zeros((468, 2), np.float32) + 100.0
    points[list(MESH_REGIONS["nose"])] = (128.0, 64.0)
    maps = landmark_heatmaps(points, 256, 32, sigma=1.0)
    assert maps.shape == (7, 32, 32) and maps.dtype == np.float32
    nose = list(MESH_REGIONS).index("nose")
    y, x = np.unravel_index(maps[nose].argmax(), maps[nose].shape)
    assert (x, y) in {(15, 7), (16, 8), (15, 8), (16, 7)}  # 128/8 = 16, 64/8 = 8 (centres .5)
    assert maps.max() <= 1.0 and maps.min() >= 0.0


def test_edge_map_and_mask_on_a_real_swap(backend, faces, photos):
    tgt_face = faces["group"][1]
    swapped = backend.swap(backend.fit(None, faces["grace_hopper"][0]),
                           backend.fit(None, tgt_face))
    aligned = align_face(photos["group"].rgb, tgt_face.kps, 256, "ffhq")
    tp = transform_points(tgt_face.points[:468], aligned.affine)
    sp = transform_points(swapped.landmarks, aligned.affine)
    edges = landmark_edge_map(sp, 256)
    assert edges.shape == (7, 256, 256) and all(ch.any() for ch in edges)
    hard, soft = aware_mask(tp, sp, (256, 256), dilate=4, feather=4)
    target_only, _ = aware_mask(tp, tp, (256, 256), dilate=4, feather=4)
    swapped_only, _ = aware_mask(sp, sp, (256, 256), dilate=4, feather=4)
    assert np.array_equal(hard, target_only | swapped_only)  # the union of both hulls
    assert not (soft[hard == 0] > 0).any()
    occluder = np.zeros((256, 256), bool)
    occluder[150:, :] = True
    cut, cut_soft = aware_mask(tp, sp, (256, 256), occlusion=occluder)
    assert not cut[occluder].any() and not (cut_soft[occluder] > 0).any()
    panel = debug_panel(aligned.crop, tp, sp, soft, landmark_heatmaps(sp, 256, 32))
    assert panel.shape == (256 + 24, 4 * 256, 3) and panel.dtype == np.uint8


def test_68_point_layouts_render_too():
    rng = np.random.default_rng(1)
    points = rng.uniform(40, 200, (68, 2)).astype(np.float32)
    assert landmark_heatmaps(points, 256, 32).shape == (7, 32, 32)
    assert landmark_edge_map(points, 256).shape == (7, 256, 256)
    with pytest.raises(ValueError, match="no region layout"):
        landmark_heatmaps(points[:10], 256, 32)

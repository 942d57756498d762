"""Condition builder: per-face caching, the pair's conditions, storage round trip."""

from __future__ import annotations

import numpy as np
import pytest

from diffswap_igfi.conditions.builder import ConditionBuilder, load_conditions, save_conditions
from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend


class CountingBackend(MediaPipeBackend):
    """The real MediaPipe backend, counting its fits."""

    name = "mediapipe"

    def __init__(self) -> None:
        super().__init__()
        self.fits = 0

    def fit(self, rgb, face):
        self.fits += 1
        return super().fit(rgb, face)


def _fresh(face):
    """A copy of a session FaceRecord with an empty cache, so tests do not share state."""
    return face.transformed(np.array([[1.0, 0, 0], [0, 1.0, 0]]), face.image_size)


def test_conditions_are_computed_once_per_face(faces, photos):
    backend = CountingBackend()
    builder = ConditionBuilder(backend, crop_size=256)
    src, tgt = _fresh(faces["grace_hopper"][0]), _fresh(faces["astronaut"][0])
    first = builder.build(photos["grace_hopper"].rgb, src, photos["astronaut"].rgb, tgt)
    second = builder.build(photos["grace_hopper"].rgb, src, photos["astronaut"].rgb, tgt)
    assert backend.fits == 2  # one per face, not per call
    assert len(builder.timings["fit"]) == 2 and len(builder.timings["render"]) == 2
    assert np.array_equal(first.heatmaps, second.heatmaps)
    assert any(key.startswith("geometry/") for key in src.extras)
    # another pair with the same target re-uses the target's fit and crop
    other = _fresh(faces["group"][0])
    builder.build(photos["group"].rgb, other, photos["astronaut"].rgb, tgt)
    assert backend.fits == 3 and len(builder.timings["align"]) == 1


def test_pair_conditions_have_the_documented_shapes(faces, photos):
    builder = ConditionBuilder(MediaPipeBackend(), crop_size=256, latent_factor=8)
    c = builder.build(photos["grace_hopper"].rgb, _fresh(faces["grace_hopper"][0]),
                      photos["astronaut"].rgb, _fresh(faces["astronaut"][0]))
    assert c.crop.shape == (256, 256, 3) and c.crop.dtype == np.uint8
    assert c.heatmaps.shape == (7, 32, 32) and c.edges.shape == (7, 256, 256)
    assert c.mask.shape == (256, 256) and c.soft_mask.shape == (256, 256)
    assert c.target_points.shape == c.swapped_points.shape == (468, 2)
    assert c.identity is None and c.clip_tokens is None  # no encoders given
    # the crop's face sits on the FFHQ template: the mask covers its centre
    assert c.mask[128, 128] == 255 and c.mask[5, 5] == 0
    # the swapped geometry is expressed in the target's pose
    assert c.swapped.pose == pytest.approx(builder.fit(None, _fresh(faces["astronaut"][0])).pose)


def test_conditions_round_trip_through_safetensors(faces, photos, tmp_path):
    builder = ConditionBuilder(MediaPipeBackend(), crop_size=128)
    c = builder.build(photos["grace_hopper"].rgb, _fresh(faces["grace_hopper"][0]),
                      photos["astronaut"].rgb, _fresh(faces["astronaut"][0]))
    path = save_conditions(tmp_path / "pair.safetensors", c, {"source": "grace_hopper"})
    loaded = load_conditions(path)
    for name, value in c.arrays().items():
        assert np.array_equal(loaded[name], value), name
    assert "swapped.rotation" in loaded and loaded["mask"].dtype == np.uint8

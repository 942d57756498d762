"""Synthetic occluders for JR training: drawn where they should be, and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffswap_igfi.data.occluders import KINDS, draw_occluder, paste_occluders


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_draws_a_visible_partial_occluder(kind):
    rng = np.random.default_rng(0)
    coverage = []
    for _ in range(8):
        rgb, alpha, got = draw_occluder(128, rng, kind)
        assert got == kind and rgb.shape == (128, 128, 3) and alpha.shape == (128, 128)
        assert 0.0 <= alpha.min() and alpha.max() <= 1.0 and rgb.min() >= 0
        coverage.append((alpha > 0.5).mean())
    # visible, but never the whole face: JR must keep the rest of the target
    assert 0.005 < np.median(coverage) < 0.5, (kind, coverage)


def test_paste_changes_only_the_occluder_and_is_deterministic():
    images = torch.rand(6, 3, 64, 64) * 2 - 1
    out, masks = paste_occluders(images, np.random.default_rng(3), p=0.5)
    again, masks2 = paste_occluders(images, np.random.default_rng(3), p=0.5)
    assert torch.equal(out, again) and torch.equal(masks, masks2)  # the same call twice
    assert out.shape == images.shape and masks.shape == (6, 1, 64, 64)
    untouched = (masks == 0).expand_as(images)
    assert torch.equal(out[untouched], images[untouched])  # copied pixels
    hit = masks.flatten(1).amax(1) > 0
    assert 0 < int(hit.sum()) < 6  # p = 0.5 over six images, this seed
    assert (out - images).abs()[(masks > 0.9).expand_as(images)].mean() > 0.05
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    none, no_masks = paste_occluders(images, np.random.default_rng(3), p=0.0)
    assert torch.equal(none, images) and not no_masks.any()

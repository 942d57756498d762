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


@pytest.mark.slow  # preprocess two photos, a tiny SFI stage samples twice
def test_the_residual_map_lights_up_on_a_pasted_occluder(tmp_path):
    """HEAR-Net's premise on our stack: the frozen SFI self-swap repaints the face without the
    occluder, so target - self-swap changes where the occluder was pasted, and barely elsewhere."""
    import shutil

    from torch.utils.data import default_collate

    from diffswap_igfi.data.augment import AugmentConfig
    from diffswap_igfi.data.dataset import SFIDataset
    from diffswap_igfi.data.preprocess import preprocess
    from diffswap_igfi.io.samples import sample_path
    from diffswap_igfi.jr.training import JRTrainable
    from diffswap_igfi.sfi.build import tiny_pipeline
    from diffswap_igfi.training.config import JRConfig

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "grace_hopper"):
        shutil.copy(sample_path(name), photos / f"{name}{sample_path(name).suffix}")
    preprocess(photos, tmp_path / "data", crop_size=64, progress=False)
    batch = default_collate(list(SFIDataset(tmp_path / "data", augment=AugmentConfig.off())))
    sfi = tiny_pipeline(seed=0)
    sfi.set_progress_bar_config(disable=True)

    def inputs(p: float) -> dict:
        config = JRConfig()
        config.sfi_steps, config.occlusion_p = 2, p
        return JRTrainable(torch.nn.Identity(), sfi, config, None).make_inputs(batch, 7)

    clean, occluded = inputs(0.0), inputs(1.0)
    assert occluded["occluded"].tolist() == [1.0, 1.0] and clean["occluded"].sum() == 0
    _, masks = paste_occluders(batch["target"], np.random.default_rng(7), 1.0)  # the same draw
    change = (occluded["residual"] - clean["residual"]).abs().mean(1, keepdim=True)
    on = masks > 0.5
    inside = change[on].mean()
    outside = change[~on & (masks == 0)].mean()
    print(f"residual change on the occluder {float(inside):.3f}, elsewhere {float(outside):.4f}")
    assert inside > 0.1 and inside > 5 * outside, (float(inside), float(outside))

"""SFI stage with tiny random models: masked sampling exactness, schedulers, guidance, warm
start, ID mixing, save/load, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DConditionModel)

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.sfi.build import tiny_pipeline
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline, IdMix
from diffswap_igfi.sfi.sampling import (is_coarse, keep_unmasked, latent_mask, masked_sample,
                                        warm_start_timesteps)
from diffswap_igfi.sfi.unet import expand_input_channels, sfi_in_channels, tiny_sfi_unet
from tolerances import assert_same_image, assert_same_maths

SCHEDULERS = [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _source(photos, faces, name):
    return Source(photos[name], faces[name][0])


def _pairs(photos, faces):
    """Grace Hopper's identity on the astronaut's face."""
    return [(faces["astronaut"][0], _source(photos, faces, "grace_hopper"))]


def _run(pipe, photos, faces, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe(photos["astronaut"].rgb, _pairs(photos, faces),
                generator=torch.Generator().manual_seed(kw.pop("seed", 0)), **kw)


def test_latent_mask_covers_every_masked_pixel():
    mask = torch.zeros(1, 1, 64, 64)
    mask[0, 0, 10, 20] = 0.01  # one faint pixel
    lat = latent_mask(mask, (8, 8))
    assert lat.sum() == 1 and lat[0, 0, 1, 2] == 1
    assert set(lat.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
def test_unmasked_latent_is_the_targets_after_every_step(scheduler_cls):
    torch.manual_seed(0)
    unet = tiny_sfi_unet(cross_attention_dim=32, geometry_channels=0)
    scheduler = scheduler_cls(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 3:7] = 1
    noise = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 6, 32)
    extra = torch.cat([mask, target * (1 - mask)], 1)

    def denoise(latents, t):
        return unet(torch.cat([latents, extra], 1), t, encoder_hidden_states=context).sample

    checked = []
    timesteps = scheduler.timesteps

    def check(i, t, latents):
        nxt = timesteps[i + 1] if i + 1 < len(timesteps) else None
        expected = target if nxt is None else scheduler.add_noise(target, noise, nxt.reshape(1))
        keep = (mask == 0).expand_as(latents)
        assert torch.equal(latents[keep], expected[keep]), f"step {i}"
        assert not torch.equal(latents[~keep], expected[~keep])
        checked.append(i)

    final = masked_sample(denoise, scheduler, target, mask, timesteps, noise, callback=check)
    assert checked == list(range(5))
    assert torch.equal(final[(mask == 0).expand_as(final)], target[(mask == 0).expand_as(final)])


def test_keep_unmasked_at_the_end_is_the_clean_target():
    target, latents = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    out = keep_unmasked(latents, target, mask, DDIMScheduler(), torch.randn(1, 4, 4, 4), None)
    assert torch.equal(out[..., 2:, :], target[..., 2:, :])
    assert torch.equal(out[..., :2, :], latents[..., :2, :])


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
def test_output_photo_equals_the_target_outside_the_mask(pipe, photos, faces, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    try:
        out = _run(pipe, photos, faces)
    finally:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    target = photos["astronaut"].rgb
    alpha = out.alphas[0]
    assert out.images[0].shape == target.shape and out.images[0].dtype == np.uint8
    assert np.array_equal(out.images[0][alpha == 0], target[alpha == 0])
    assert (alpha > 0).sum() > 1000
    assert not np.array_equal(out.images[0], target)  # the face was repainted
    assert out.crops.shape == (1, 64, 64, 3) and out.masks.shape == (1, 64, 64)


def test_same_seed_same_image_and_another_seed_differs(pipe, photos, faces):
    a, b = _run(pipe, photos, faces), _run(pipe, photos, faces)
    c = _run(pipe, photos, faces, seed=1)
    assert np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.crops, c.crops)


def test_save_and_load_give_the_identical_image(pipe, photos, faces, tmp_path):
    before = _run(pipe, photos, faces)
    pipe.save_pretrained(tmp_path / "ckpt")
    loaded = DiffSwapIGFIPipeline.from_pretrained(tmp_path / "ckpt")
    loaded.set_progress_bar_config(disable=True)
    after = _run(loaded, photos, faces)
    # the same weights, reloaded: kernels may round differently on a reloaded model's memory
    assert_same_image(before.images[0], after.images[0])
    assert loaded.config.crop_size == 64


def test_guidance_scale_one_skips_the_unconditional_pass(pipe, photos, faces):
    plain = _run(pipe, photos, faces, guidance_scale=1.0)
    guided = _run(pipe, photos, faces, guidance_scale=3.0)
    # guidance batches the unconditional half into the same call: one UNet call per step
    assert plain.stats.unet_calls == 3 and guided.stats.unet_calls == 3
    assert guided.stats.unet_rows == 2 * plain.stats.unet_rows == 6
    assert not np.array_equal(plain.crops, guided.crops)


def test_warm_start_runs_the_last_steps_only(pipe, photos, faces):
    assert len(warm_start_timesteps(torch.arange(10, 0, -1), 0.3)) == 3
    geometric, _ = GeometricSwapper().swap_pairs(photos["astronaut"].rgb,
                                                 _pairs(photos, faces))
    out = _run(pipe, photos, faces, num_inference_steps=10, image=geometric, strength=0.3,
               guidance_scale=1.0)
    assert out.stats.unet_calls == 3
    alpha = out.alphas[0]
    assert np.array_equal(out.images[0][alpha == 0], photos["astronaut"].rgb[alpha == 0])
    with pytest.raises(ValueError, match="warm_start"):
        _run(pipe, photos, faces, strength=0.5)


def test_id_mixing(pipe, photos, faces):
    base = _run(pipe, photos, faces)
    # the second identity equal to the first: block mixing must change nothing at all
    hopper, hanks = _source(photos, faces, "grace_hopper"), _source(photos, faces, "tom_hanks")
    same = _run(pipe, photos, faces, id_mix=IdMix([hopper], mode="blocks"))
    assert np.array_equal(base.crops, same.crops)
    mixed = _run(pipe, photos, faces, id_mix=IdMix([hanks], mode="blocks"))
    assert not np.array_equal(base.crops, mixed.crops)
    full_weight = _run(pipe, photos, faces, id_mix=IdMix([hanks], mode="weighted", weight=1.0))
    assert np.array_equal(base.crops, full_weight.crops)
    with pytest.raises(ValueError, match="mode"):
        IdMix([hanks], mode="sideways")


def test_coarse_and_fine_blocks_split_the_unet():
    assert is_coarse("mid_block.attentions.0.transformer_blocks.0.attn2.processor", 4)
    assert is_coarse("down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor", 4)
    assert not is_coarse("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 4)
    assert is_coarse("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 4)
    assert not is_coarse("up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor", 4)


def test_batches_of_targets_and_faces(pipe, photos, faces):
    source = _source(photos, faces, "grace_hopper")
    out = pipe([photos["astronaut"].rgb, photos["group"].rgb],
               [[(f, source) for f in faces[name]] for name in ("astronaut", "group")],
               num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.crops.shape[0] == 1 + 6
    for image, alpha, target in zip(out.images, out.alphas,
                                    [photos["astronaut"].rgb, photos["group"].rgb]):
        assert np.array_equal(image[alpha == 0], target[alpha == 0])


def test_new_geometry_channels_start_at_zero():
    torch.manual_seed(0)
    base = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                attention_head_dim=8, norm_num_groups=8)
    wide = expand_input_channels(base, sfi_in_channels())
    assert wide.config.in_channels == 16
    x, ctx = torch.randn(1, 9, 8, 8), torch.randn(1, 3, 32)
    geometry = torch.rand(1, 7, 8, 8)
    with torch.no_grad():
        a = base(x, 10, encoder_hidden_states=ctx).sample
        b = wide(torch.cat([x, geometry], 1), 10, encoder_hidden_states=ctx).sample
    # zero weights on the new channels: a 16- vs a 9-channel convolution, equal up to rounding
    assert_same_maths(a, b, atol=1e-5)


def test_cli_swaps_through_a_checkpoint_folder(pipe, tmp_path, capsys):
    from diffswap_igfi.cli import main
    from diffswap_igfi.io.images import load_image
    from diffswap_igfi.io.samples import sample_path
    from diffswap_igfi.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    from diffswap_igfi.provenance.verify import verify_image

    pipe.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out.png"
    code = main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--checkpoint", str(tmp_path / "ckpt"), "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = verify_image(out)
    assert report.watermark.found
    assert report.metadata.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    written = np.asarray(load_image(out).rgb)
    target = load_image(sample_path("astronaut")).rgb
    assert written.shape == target.shape and not np.array_equal(written, target)


@pytest.mark.parametrize("args,expected", [
    (["--engine", "diffusion"], "needs a checkpoint"),
    (["--checkpoint", "no-such-folder"], "not a DiffSwapIGFIPipeline folder"),
    (["--engine", "geometric", "--mix-source", "sample:tom_hanks"], "--mix-source has no effect"),
])
def test_cli_diffusion_errors_say_what_to_do(tmp_path, capsys, args, expected):
    from diffswap_igfi.cli import main

    out = tmp_path / "out.png"
    code = main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 *args])
    err = capsys.readouterr().err
    assert code != 0 and expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sfi_unet_from_a_local_sd_inpainting_folder(tmp_path):
    from tiny_models import make_tiny_sd_inpaint_folder

    from diffswap_igfi.errors import ModelNotFoundError
    from diffswap_igfi.sfi.unet import sfi_unet_from_sd_inpaint

    folder = make_tiny_sd_inpaint_folder(tmp_path / "sd")
    base = UNet2DConditionModel.from_pretrained(folder / "unet")
    wide = sfi_unet_from_sd_inpaint(folder)
    assert base.config.in_channels == 9 and wide.config.in_channels == 16
    x, ctx = torch.randn(1, 9, 8, 8), torch.randn(1, 3, base.config.cross_attention_dim)
    with torch.no_grad():
        a = base(x, 10, encoder_hidden_states=ctx).sample
        b = wide(torch.cat([x, torch.rand(1, 7, 8, 8)], 1), 10, encoder_hidden_states=ctx).sample
    assert_same_maths(a, b, atol=1e-5)  # new geometry channels start at zero (16 vs 9 channels)
    with pytest.raises(ModelNotFoundError, match="inpainting UNet"):
        sfi_unet_from_sd_inpaint(tmp_path / "nothing")

"""Latent consistency distillation: the consistency maths against LCMScheduler and by hand, the
trainer on a tiny teacher (finite losses in metrics.jsonl), and the exported student swapping in
2 and (by default) 4 UNet calls with the target's pixels kept outside the mask."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from test_train_sfi import data_dir  # noqa: F401  (the shipped photos, preprocessed at 64 px)

from diffswap_igfi.sfi.distill import (LCMDistillTrainable, LCMSettings, boundary_scalings,
                                       consistency_estimate, ddim_step, solver_timesteps,
                                       x0_and_noise)

ROOT = Path(__file__).resolve().parents[1]


def test_boundary_condition_makes_the_consistency_function_the_identity_at_t0():
    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # exact: 0.25 / 0.25 and 0 / 0.5
    sample, output = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    alphas = torch.linspace(0.99, 0.01, 1000)
    f = consistency_estimate(output, torch.tensor([0]), sample, alphas, "epsilon", 10.0)
    assert torch.equal(f, sample)


def test_one_consistency_target_step_by_hand():
    # a 3-step schedule with square-root-friendly alphas: sqrt(a) = 0.9, 0.8, 0.6
    alphas = torch.tensor([0.81, 0.64, 0.36])
    sample = torch.full((1, 1, 1, 1), 1.0)
    eps = torch.full((1, 1, 1, 1), 0.5)
    x0, noise = x0_and_noise(eps, torch.tensor([2]), sample, alphas, "epsilon")
    # x0 = (x - sqrt(1 - a) eps) / sqrt(a) = (1 - 0.8 * 0.5) / 0.6 = 1
    assert x0.item() == pytest.approx(1.0, abs=1e-6) and torch.equal(noise, eps)
    # DDIM to t = 1: sqrt(0.64) * 1 + sqrt(0.36) * 0.5 = 0.8 + 0.3
    stepped = ddim_step(x0, noise, alphas[torch.tensor([1])])
    assert stepped.item() == pytest.approx(1.1, abs=1e-6)
    # the clipped x0 (DDIM's clip_sample) re-derives the noise: x0 = 0.5 -> eps = (1 - 0.3) / 0.8
    x0c, noise_c = x0_and_noise(eps, torch.tensor([2]), sample, alphas, "epsilon", clip=0.5)
    assert x0c.item() == 0.5 and noise_c.item() == pytest.approx(0.875, abs=1e-6)
    # v-prediction: v = sqrt(a) eps - sqrt(1 - a) x0 gives back the same x0 and eps
    v = 0.6 * 0.5 - 0.8 * 1.0
    x0v, noise_v = x0_and_noise(torch.full_like(sample, v), torch.tensor([2]), sample, alphas,
                                "v_prediction")
    assert x0v.item() == pytest.approx(1.0, abs=1e-6)
    assert noise_v.item() == pytest.approx(0.5, abs=1e-6)


def test_training_grid_and_estimate_are_what_lcm_scheduler_samples_with():
    scheduler = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    grid = solver_timesteps(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    for steps in (1, 2, 4):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(grid.tolist())
    for t in (0, 19, 259, 999):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        mine = boundary_scalings(torch.tensor([t]))
        # float64 in diffusers, float32 here
        assert mine[0].item() == pytest.approx(c_skip, rel=1e-6, abs=1e-12)
        assert mine[1].item() == pytest.approx(c_out, rel=1e-6)
    # the last (noise-free) LCM step denoises to the estimate the student is trained on
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    sample, output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    denoised = scheduler.step(output, t, sample).denoised
    mine = consistency_estimate(output, t.reshape(1).repeat(2), sample,
                                scheduler.alphas_cumprod, "epsilon", 10.0)
    # the same formula, evaluated in another order: equal up to float32 rounding
    torch.testing.assert_close(mine, denoised, rtol=1e-5, atol=1e-5)


def _batch(b: int = 2, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 16:48, 16:48] = 1
    return {"target": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
            "source_id": torch.rand(b, 3, 112, 112, generator=g) * 2 - 1,
            "mask": mask, "geometry": torch.rand(b, 7, size // 8, size // 8, generator=g),
            "identity": torch.zeros(b, 512), "has_identity": torch.zeros(b, dtype=torch.bool)}


def test_the_loss_trains_the_student_only_and_the_target_follows_it():
    from diffswap_igfi.sfi.build import tiny_pipeline

    teacher = tiny_pipeline(seed=0)
    model = LCMDistillTrainable(teacher, LCMSettings(target_decay=0.5))
    target = model.attach_target()
    before = {k: v.clone() for k, v in teacher.unet.state_dict().items()}
    out = model(_batch(), torch.tensor([7]))
    assert set(out) == {"loss", "consistency", "teacher_gap", "guidance"}
    assert all(torch.isfinite(v) for v in out.values()) and out["loss"] > 0
    assert out["guidance"].item() == 3.0
    # the same seed draws the same noise, timesteps and guidance: the same loss
    assert torch.equal(model(_batch(), torch.tensor([7]))["loss"], out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    assert [n for n, _ in model.named_parameters()] == [f"unet.{n}" for n, _ in
                                                        teacher.unet.named_parameters()]
    assert all(p.grad is None for p in teacher.unet.parameters())
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01)
    old = next(target.unet.parameters()).clone()
    model.update_target()
    new, online = next(target.unet.parameters()), next(model.unet.parameters())
    torch.testing.assert_close(new, 0.5 * old + 0.5 * online)  # lerp: one rounding
    assert all(torch.equal(before[k], v) for k, v in teacher.unet.state_dict().items())
    # signal weighting scales every sample's distance by sqrt(alpha_t) <= 1: a smaller loss
    weighted = LCMDistillTrainable(teacher, LCMSettings(weighting="signal"))
    with torch.no_grad():
        plain = LCMDistillTrainable(teacher, LCMSettings())(_batch(), torch.tensor([7]))
        scaled = weighted(_batch(), torch.tensor([7]))
    assert torch.isfinite(scaled["loss"]) and 0 < scaled["loss"] < plain["loss"]


@pytest.mark.slow
def test_distill_run_logs_finite_losses_and_exports_a_student_that_swaps(
        tmp_path, data_dir, photos, faces):  # noqa: F811 (the imported fixture)
    from diffswap_igfi.cli import main
    from diffswap_igfi.conditions.source import Source
    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.sfi.build import tiny_pipeline
    from diffswap_igfi.sfi.student import LCMStudentPipeline

    teacher = tmp_path / "teacher"
    tiny_pipeline(seed=0).save_pretrained(teacher)  # untrained: the mechanics, not the quality
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "train_distill.py"), "--config",
         str(ROOT / "configs" / "sfi" / "tiny_distill.yaml"), "--teacher", str(teacher),
         "--data", str(data_dir), "--output", str(run), "--max-steps", "3"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "consistency", "teacher_gap", "guidance"):
            assert math.isfinite(r[key]), (key, r)

    student = load_pipeline(run / "pipeline")
    assert isinstance(student, LCMStudentPipeline)
    assert type(student.scheduler) is LCMScheduler
    assert student.config.default_steps == 4 and student.config.distilled_guidance == [3.0, 3.0]
    student.set_progress_bar_config(disable=True)
    target = photos["astronaut"].rgb
    pairs = [(faces["astronaut"][0], Source(photos["grace_hopper"], faces["grace_hopper"][0]))]
    out = student(target, pairs, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    alpha = out.alphas[0]
    assert np.array_equal(out.images[0][alpha == 0], target[alpha == 0])
    assert (alpha > 0).sum() > 1000 and not np.array_equal(out.images[0], target)
    # the guidance is in the weights: one UNet call on one row per face and step
    assert (out.stats.unet_calls, out.stats.unet_rows) == (2, 2)
    default = student(target, pairs, generator=torch.Generator().manual_seed(0))
    assert (default.stats.unet_calls, default.stats.unet_rows) == (4, 4)

    swap = tmp_path / "swap.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(swap),
                 "--checkpoint", str(run / "pipeline"), "--steps", "2", "--quiet"]) == 0
    assert swap.is_file()


def test_deterministic_student_scheduler_ignores_the_generator_and_loads_from_a_folder(
        tmp_path):
    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.sfi.build import tiny_pipeline
    from diffswap_igfi.sfi.student import DeterministicTCDScheduler, student_scheduler

    teacher = tiny_pipeline(seed=0)
    sample, output = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)

    def first_step(scheduler, seed):
        scheduler.set_timesteps(4)
        return scheduler.step(output, scheduler.timesteps[0], sample,
                              generator=torch.Generator().manual_seed(seed)).prev_sample

    lcm = student_scheduler(teacher.scheduler, 50, 10.0)
    tcd = student_scheduler(teacher.scheduler, 50, 10.0, sampler="tcd_deterministic")
    assert type(lcm) is LCMScheduler and type(tcd) is DeterministicTCDScheduler
    assert not torch.equal(first_step(lcm, 0), first_step(lcm, 1))  # fresh noise
    assert torch.equal(first_step(tcd, 0), first_step(tcd, 1))  # none
    from diffswap_igfi.sfi.student import student_pipeline

    student_pipeline(teacher, teacher.unet, num_ddim_timesteps=50, timestep_scaling=10.0,
                     default_steps=2, distilled_guidance=(2.0, 4.0),
                     sampler="tcd_deterministic").save_pretrained(tmp_path / "student")
    loaded = load_pipeline(tmp_path / "student")
    assert type(loaded.scheduler) is DeterministicTCDScheduler
    assert loaded.config.default_steps == 2 and loaded.config.distilled_guidance == [2.0, 4.0]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_target_network_included(
        tmp_path, data_dir):  # noqa: F811 (the imported fixture)
    import yaml

    from diffswap_igfi.sfi.build import tiny_pipeline

    teacher = tmp_path / "teacher"
    tiny_pipeline(seed=0).save_pretrained(teacher)
    config = yaml.safe_load((ROOT / "configs" / "sfi" / "tiny_distill.yaml").read_text())
    config["train"].update(max_steps=4, checkpoint_every=2, validation_every=1000)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    def train(run: Path, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train" / "train_distill.py"), "--config", str(path),
             "--teacher", str(teacher), "--data", str(data_dir), "--output", str(run), *extra],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    train(tmp_path / "whole")
    train(tmp_path / "cut", "--max-steps", "2")
    train(tmp_path / "cut", "--resume", "latest")
    # the same seeds, weights, optimizer, EMA and target network: the same arithmetic
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def test_a_blurred_head_teacher_is_distilled_and_exported_as_it_was_trained():
    """The student conditions its UNet as the teacher was trained to (blurred face here) and
    carries the teacher's region and condition into its folder's config."""
    from diffswap_igfi.sfi.build import tiny_pipeline
    from diffswap_igfi.sfi.conditioning import encode_crops
    from diffswap_igfi.sfi.student import student_pipeline

    teacher = tiny_pipeline(seed=0)
    teacher.register_to_config(region="head", condition="blurred", condition_blur=0.2)
    model = LCMDistillTrainable(teacher, LCMSettings())
    batch = _batch()
    conditions, _, _ = model.conditions(batch)
    with torch.no_grad():
        blurred = encode_crops(teacher.vae, None, batch["target"], batch["mask"],
                               condition="blurred", condition_blur=0.2).masked_latents
        masked = encode_crops(teacher.vae, None, batch["target"], batch["mask"]).masked_latents
    assert torch.equal(conditions.masked_latents, blurred)  # the same call: exact
    assert not torch.allclose(blurred, masked, atol=1e-3)
    student = student_pipeline(teacher, model.unet, num_ddim_timesteps=50, timestep_scaling=10.0,
                               default_steps=4, distilled_guidance=(3.0, 3.0))
    assert (student.config.region, student.config.condition,
            student.config.condition_blur) == ("head", "blurred", 0.2)

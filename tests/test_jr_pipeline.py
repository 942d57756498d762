"""JR inside the pipeline and its trainer: the residual map comes from a real self-swap, the
refined pipeline round-trips, and tiny JR training lowers its loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.jr.network import JRNet
from diffswap_igfi.sfi.build import tiny_pipeline
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from tolerances import assert_same_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def refined_pipe():
    pipe = tiny_pipeline(seed=0)
    torch.manual_seed(1)
    pipe.register_modules(refiner=JRNet(base_channels=8, num_res_blocks=2, use_dictionary=False,
                                        style_hidden=32, attr_dim=16).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hopper_on_astronaut(photos, faces):
    return [(faces["astronaut"][0], Source(photos["grace_hopper"], faces["grace_hopper"][0]))]


def test_residual_map_is_target_minus_a_real_self_swap(refined_pipe, photos, faces):
    tgt, face = photos["astronaut"].rgb, faces["astronaut"][0]
    out = refined_pipe(tgt, _hopper_on_astronaut(photos, faces), num_inference_steps=2,
                       residual_seed=7, generator=torch.Generator().manual_seed(0))
    self_swap = refined_pipe(tgt, [(face, Source(photos["astronaut"], face))],
                             num_inference_steps=2, refine=False,
                             generator=torch.Generator().manual_seed(7))
    crop = refined_pipe.condition_builder().aligned(tgt, face).crop
    expected = to_tensor(crop[None]) - to_tensor(self_swap.crops)
    assert torch.equal(out.residual, expected)
    assert expected.abs().max() > 0  # the self-swap did repaint the face


def test_refined_pipeline_doubles_resolution_keeps_the_target_and_round_trips(
        refined_pipe, photos, faces, tmp_path):
    tgt, src = photos["astronaut"].rgb, _hopper_on_astronaut(photos, faces)
    out = refined_pipe(tgt, src, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.crops.shape == (1, 128, 128, 3)  # 64 px SFI crop, JR upscale 2
    alpha = out.alphas[0]
    assert np.array_equal(out.images[0][alpha == 0], tgt[alpha == 0])
    plain = refined_pipe(tgt, src, num_inference_steps=2, refine=False,
                         generator=torch.Generator().manual_seed(0))
    assert plain.crops.shape == (1, 64, 64, 3) and not np.array_equal(out.images[0],
                                                                      plain.images[0])
    refined_pipe.save_pretrained(tmp_path / "ckpt")
    loaded = DiffSwapIGFIPipeline.from_pretrained(tmp_path / "ckpt")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(tgt, src, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(loaded.refiner, JRNet)
    # the same weights, reloaded: kernels may round differently on a reloaded model's memory
    assert_same_image(out.images[0], again.images[0])


@pytest.mark.slow
def test_tiny_jr_training_lowers_its_loss_and_exports_a_refining_pipeline(tmp_path):
    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess

    faces = tmp_path / "faces"
    main(["samples", str(faces)])
    data = tmp_path / "data"
    preprocess(faces, data, crop_size=64, max_faces=6, progress=False)
    sfi = tiny_pipeline(seed=0)
    sfi.save_pretrained(tmp_path / "sfi")
    run = tmp_path / "jr"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train" / "train_jr.py"), "--config",
         str(ROOT / "configs" / "jr" / "tiny.yaml"), "--data", str(data), "--sfi-checkpoint",
         str(tmp_path / "sfi"), "--output", str(run), "--max-steps", "40"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        # one thread, as test_train_sfi's runs: on a loaded 2-core machine torch's default
        # threads fight the other processes and this run took over 10 minutes instead of 15 s
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    first = np.mean([r["reconstruction"] for r in records[:10]])
    last = np.mean([r["reconstruction"] for r in records[-10:]])
    assert last < 0.8 * first, (first, last)
    out = tmp_path / "swap.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--checkpoint", str(run / "pipeline"), "--steps", "2", "--quiet"]) == 0
    loaded = DiffSwapIGFIPipeline.from_pretrained(run / "pipeline")
    assert isinstance(loaded.refiner, JRNet)

"""REFace-format checkpoints: key coverage of the real configuration, the converter, and a swap
through ``diffswap-igfi swap --checkpoint`` with a tiny model in REFace's key layout.

tests/data/reface_keys.json lists the key names and shapes of REFace's real configuration and
tests/data/reface_tiny_keys.json those of a tiny one, both listed from REFace's own classes
(no weights). The tiny checkpoint is filled here with random values and pickled with
torch.save, the way Lightning writes REFace's last.ckpt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line
from PIL import Image

from diffswap_igfi.cli import main
from diffswap_igfi.conditions.irse50 import IRSEBackbone, read_state_dict
from diffswap_igfi.convert.reface import SCHEDULE_BUFFERS, build_scheduler, layout_check, plan_keys
from diffswap_igfi.errors import ConfigError, InputError, ModelNotFoundError
from diffswap_igfi.sfi.reface_models import RefaceConditioner

DATA = Path(__file__).parent / "data"
REAL = json.loads((DATA / "reface_keys.json").read_text())["keys"]
TINY = json.loads((DATA / "reface_tiny_keys.json").read_text())
TINY_IDENTITY = {"units": [1, 1, 1, 1], "widths": [16, 16, 32, 32], "input_size": 112}


def test_the_plan_routes_every_key_of_the_real_configuration():
    plan = plan_keys(REAL)
    assert set(plan) == set(REAL)  # 100% of the keys: a destination or a stated reason
    routed = {}
    for component, _ in plan.values():
        routed[component] = routed.get(component, 0) + 1
    assert routed == {"unet": 686, "vae": 248, "clip_encoder": 392, "conditioner": 71,
                      "identity_encoder": 397, None: len(REAL) - 1794}
    dropped = [k for k, (c, _) in plan.items() if c is None]
    assert all(k in SCHEDULE_BUFFERS or k.startswith((
        "cond_stage_model.model.text", "cond_stage_model.model.logit",
        "cond_stage_model.model.vision_model.embeddings.position_ids",
        "cond_stage_model.mapper.", "cond_stage_model.final_ln.",
        "cond_stage_model.projection_back.", "lpips_loss.")) for k in dropped)


def test_keys_that_are_not_refaces_are_refused():
    with pytest.raises(ConfigError, match="not REFace's"):
        plan_keys({**REAL, "extra_head.weight": [2, 2]})


def test_converted_layout_equals_our_models_for_the_real_configuration():
    """Every weight of the real configuration gets a place and every place a weight (meta
    tensors: no weights are read or made)."""
    report = layout_check(REAL)
    for name, sides in report.items():
        assert sides["converted"] == sides["expected"], name
    total = sum(int(np.prod(s)) for sides in report.values() for s in sides["converted"].values())
    assert total > 1_000_000_000  # UNet 860M + VAE 84M + CLIP-L vision 304M + IR-SE50 44M + ...


def test_irse_weights_load_from_safetensors_or_a_plain_state_dict(tmp_path):
    from safetensors.torch import save_file

    model = IRSEBackbone(**TINY_IDENTITY)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"model": IRSEBackbone}, tmp_path / "code.pth")  # a pickled class: refused
    with pytest.raises(ModelNotFoundError, match="not a plain state dict"):
        read_state_dict(tmp_path / "code.pth")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert torch.allclose(model(x).norm(dim=1), torch.ones(2), atol=1e-5)


def test_convert_refuses_a_pickle_without_allow_pickle(tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    code = main(["convert", "--from", "reface", str(ckpt), str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert_one_line(err)
    assert "--allow-pickle" in err
    assert not (tmp_path / "out").exists()
    # with the flag, an old-format (non-zip) pickle is read, and a foreign one refused by name
    torch.save({"state_dict": {"head.weight": torch.ones(2)}}, ckpt,
               _use_new_zipfile_serialization=False)
    code = main(["convert", "--from", "reface", str(ckpt), str(tmp_path / "out"),
                 "--allow-pickle"])
    err = capsys.readouterr().err
    assert code == 2 and "head.weight" in err
    assert_one_line(err)
    assert not (tmp_path / "out").exists()


def test_the_engine_picks_the_pipeline_class_from_model_index(tmp_path):
    from diffswap_igfi.engines.diffusion import pipeline_class_for
    from diffswap_igfi.sfi.reface_pipeline import RefacePipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "RefacePipeline"}))
    assert pipeline_class_for(tmp_path) is RefacePipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    with pytest.raises(ModelNotFoundError, match="SomePipeline"):
        pipeline_class_for(tmp_path)


def tiny_reface_checkpoint(path: Path) -> Path:
    """A Lightning-style pickle ({"state_dict": ...}) in REFace's key layout with random
    weights, a tiny IR-SE (our module, REFace's names) and LDM's real noise schedule."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in TINY["keys"].items():
        state[key] = torch.randn(shape, generator=gen) * 0.05
    scheduler = build_scheduler(TINY["config"])
    state["betas"] = scheduler.betas.clone()
    state["alphas_cumprod"] = scheduler.alphas_cumprod.clone()
    for key, value in IRSEBackbone(**TINY_IDENTITY).state_dict().items():
        state["face_ID_model.facenet." + key] = value
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    return path


@pytest.mark.slow
def test_a_tiny_reface_checkpoint_converts_and_swaps_through_the_cli(tmp_path, photos, faces,
                                                                     capsys):
    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.faces.paste import paste_back
    from diffswap_igfi.provenance.verify import verify_image
    from diffswap_igfi.conditions.source import Source
    from diffswap_igfi.sfi.reface_pipeline import RefacePipeline

    ckpt = tiny_reface_checkpoint(tmp_path / "last.ckpt")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY["config"], "identity": TINY_IDENTITY}))
    folder = tmp_path / "reface"
    assert main(["convert", "--from", "reface", str(ckpt), str(folder), "--allow-pickle",
                 "--config", str(config)]) == 0
    weights = [p.suffix for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert weights and set(weights) == {".safetensors"}

    out = tmp_path / "out.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--checkpoint", str(folder), "--steps", "2", "--quiet"]) == 0
    written = np.array(Image.open(out).convert("RGB"))
    target = photos["astronaut"].rgb

    # the region the pipeline may change: its mask of the same (deterministically) detected face
    pipe = load_pipeline(folder)
    assert isinstance(pipe, RefacePipeline)
    assert (pipe.config.default_steps, pipe.config.default_guidance) == (50, 3.5)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    crop, _, soft, _, inverse = pipe.face_crop(target, faces["astronaut"][0])
    _, alpha = paste_back(target, crop, inverse, soft, return_alpha=True)
    outside = alpha == 0
    assert (~outside).sum() > 1000
    assert np.array_equal(written[outside], target[outside])
    assert not np.array_equal(written[~outside], target[~outside])
    assert verify_image(out).watermark.found
    from diffswap_igfi.engines.diffusion import DiffusionEngine

    assert DiffusionEngine(pipe, region="face").region is None  # REFace repaints the face
    with pytest.raises(InputError, match="--region head needs a DiffSwap-IGFI checkpoint"):
        DiffusionEngine(pipe, region="head")
    with pytest.raises(InputError, match="warm-start"):
        pipe(target, [(faces["astronaut"][0], Source(photos["grace_hopper"],
                                                     faces["grace_hopper"][0]))],
             image=target, strength=0.5)


def test_the_conditioner_token_is_the_weighted_mean_of_its_three_features():
    torch.manual_seed(0)
    cond = RefaceConditioner(context_dim=16, clip_dim=8, mapper_layers=1)
    for p in cond.parameters():
        p.data.normal_()
    src, tgt, ident, marks = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 512), \
        torch.rand(2, 68, 2) * 512
    clip = (cond.proj_out_source(cond.map_clip(src)) + cond.proj_out_target(cond.map_clip(tgt)))
    expected = (clip + 10 * cond.ID_proj_out(ident)[:, None]
                + 0.05 * cond.landmark_proj_out(marks.reshape(2, 136))[:, None]) / 11.05
    # same operations in another grouping: equal up to float rounding
    assert torch.allclose(cond(src, tgt, ident, marks), expected, rtol=1e-5, atol=1e-4)
    assert cond.null(3).shape == (3, 1, 16)

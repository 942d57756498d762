"""Identity adapter on a stock diffusers inpainting pipeline, and LoRA through peft.

Everything runs on a tiny SD-inpainting folder built locally (tests/tiny_models.py); nothing is
downloaded. Output comparisons are exact where exactness holds by construction (the same call
twice, scale 0 handing the call to the stock processor, a zero LoRA term); where two different
computations are compared they use tests/tolerances.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel

from diffswap_igfi.adapters.identity_adapter import (IdentityAdapter, IdentityAttnProcessor,
                                                     attach_identity_adapter,
                                                     detach_identity_adapter, identity_embedding,
                                                     set_identity_scale)
from diffswap_igfi.adapters.lora import (CONFIG_NAME, WEIGHTS_NAME, add_lora, load_lora,
                                         lora_parameters, save_lora)
from diffswap_igfi.errors import ConfigError, InputError, ModelNotFoundError
from tiny_models import make_tiny_pipeline, make_tiny_sd_inpaint_folder, tiny_inpaint_inputs
from tolerances import assert_same_maths, clearly_different

SMALL = {"projector_hidden_dim": 32, "projector_depth": 1, "projector_heads": 4}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return make_tiny_sd_inpaint_folder(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture
def pipe(sd_folder):
    return make_tiny_pipeline(sd_folder)


def generate(pipe, **kwargs) -> np.ndarray:
    """One seeded 64x64 inpainting run, 3 DDIM steps, CFG on (guidance 7.5): [1,64,64,3]."""
    args = {**tiny_inpaint_inputs(), "num_inference_steps": 3, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(**args).images


def embedding(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 512, generator=torch.Generator().manual_seed(seed))


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 9, 8, 8, generator=g), torch.tensor(500),
            torch.randn(batch, 5, 32, generator=g))


def unet_out(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


# --- the tiny folder -------------------------------------------------------------------------

def test_tiny_folder_has_sd_layout_and_generates(sd_folder, pipe):
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (sd_folder / rel).is_file(), rel
    assert pipe.unet.config.in_channels == 9 and pipe.vae_scale_factor == 8
    ids = pipe.tokenizer("a face photo").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    image = generate(pipe)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert np.array_equal(image, generate(pipe))  # seeded runs repeat exactly


@pytest.mark.slow  # a fresh interpreter importing torch + diffusers: ~5-10 s
def test_tiny_folder_loads_with_hf_hub_offline(sd_folder):
    code = ("import sys, torch; sys.path.insert(0, sys.argv[2]); "
            "from tiny_models import make_tiny_pipeline, tiny_inpaint_inputs; "
            "p = make_tiny_pipeline(sys.argv[1]); "
            "print(p(**tiny_inpaint_inputs(), num_inference_steps=2, output_type='np')"
            ".images.shape)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(sd_folder), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(1, 64, 64, 3)")


# --- identity adapter ------------------------------------------------------------------------

def test_adapter_on_stock_pipeline_acceptance(pipe):
    stock = generate(pipe)
    originals = dict(pipe.unet.attn_processors)
    adapter = IdentityAdapter.for_unet(pipe.unet, embed_dim=512, num_tokens=4, **SMALL)
    attach_identity_adapter(pipe, adapter, scale=0.0)
    swapped = [n for n, p in pipe.unet.attn_processors.items()
               if isinstance(p, IdentityAttnProcessor)]
    assert swapped and all(".attn2." in n for n in swapped)
    with identity_embedding(pipe, embedding(1)):
        assert np.array_equal(generate(pipe), stock)
        set_identity_scale(pipe, 1.0)
        first = generate(pipe)
    assert not np.array_equal(first, stock)
    with identity_embedding(pipe, embedding(2)):
        second = generate(pipe)
    assert not np.array_equal(second, first)
    with identity_embedding(pipe, embedding(1)):
        assert np.array_equal(generate(pipe), first)
    assert np.array_equal(generate(pipe), stock)  # no embedding set: the stock path
    assert detach_identity_adapter(pipe) is adapter
    assert pipe.unet.attn_processors == originals
    assert np.array_equal(generate(pipe), stock)


def test_adapter_without_guidance_and_per_prompt_embeddings(pipe):
    stock = generate(pipe, guidance_scale=1.0, prompt=["a face", "a photo"])
    attach_identity_adapter(pipe, IdentityAdapter.for_unet(pipe.unet, **SMALL))
    with identity_embedding(pipe, embedding(1, batch=2)):
        out = generate(pipe, guidance_scale=1.0, prompt=["a face", "a photo"])
    assert out.shape == stock.shape and not np.array_equal(out, stock)
    with identity_embedding(pipe, embedding(1)):  # one embedding, two images per prompt
        assert generate(pipe, num_images_per_prompt=2).shape == (2, 64, 64, 3)
    with identity_embedding(pipe, embedding(1, batch=3)), pytest.raises(InputError):
        generate(pipe, prompt=["a face", "a photo"])


def test_cfg_unconditional_half_gets_null_tokens(sd_folder):
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    sample, t, text = unet_inputs(batch=1)
    doubled = (torch.cat([sample, sample]), t, torch.cat([text, text]))
    stock = unet_out(unet, doubled)
    adapter = IdentityAdapter.for_unet(unet, **SMALL)
    attach_identity_adapter(unet, adapter)
    with identity_embedding(unet, embedding(3), guidance=True):
        out = unet_out(unet, doubled)
    # null tokens start at zero: zero identity keys/values add nothing to the uncond half (our
    # processor's text path vs diffusers': the same maths, compared with a tolerance)
    assert_same_maths(out[0], stock[0])
    assert clearly_different(out[1], stock[1])
    with identity_embedding(unet, embedding(3)):  # no guidance: both rows conditional
        both = unet_out(unet, doubled)
    assert_same_maths(both[0], both[1])
    assert_same_maths(both[1], out[1])
    pair = torch.cat([embedding(4), embedding(3)])
    with identity_embedding(unet, pair):
        kept = unet_out(unet, doubled)
    with identity_embedding(unet, pair, drop=torch.tensor([True, False])):
        dropped = unet_out(unet, doubled)  # condition dropout: row 0 gets the null tokens
    assert_same_maths(dropped[0], stock[0])
    assert_same_maths(dropped[1], kept[1])
    assert clearly_different(kept[0], stock[0])
    with torch.no_grad():
        adapter.projector.null_tokens.normal_()
    with identity_embedding(unet, embedding(3), guidance=True):
        learned = unet_out(unet, doubled)
    assert clearly_different(learned[0], stock[0])
    assert_same_maths(learned[1], out[1])


def test_zero_init_adapter_is_exact_no_op(pipe):
    stock = generate(pipe)
    attach_identity_adapter(pipe, IdentityAdapter.for_unet(pipe.unet, init="zero", **SMALL))
    with identity_embedding(pipe, embedding(1)):  # our processor with zero identity values
        assert_same_maths(generate(pipe), stock)


def test_adapter_save_load_round_trip(pipe, tmp_path):
    adapter = IdentityAdapter.for_unet(pipe.unet, num_tokens=2, **SMALL)
    adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    loaded = IdentityAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.layer_names == adapter.config.layer_names
    mine, theirs = adapter.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    outputs = []
    for each in (adapter, loaded):
        attach_identity_adapter(pipe, each, scale=0.7)
        with identity_embedding(pipe, embedding(5)):
            outputs.append(generate(pipe))
        detach_identity_adapter(pipe)
    assert_same_maths(outputs[0], outputs[1])  # equal weights; a reloaded model's memory layout
    # may pick other kernels


def test_adapter_errors(pipe):
    with pytest.raises(ConfigError):
        set_identity_scale(pipe, 1.0)
    with pytest.raises(ConfigError):
        detach_identity_adapter(pipe)
    with pytest.raises(ConfigError):
        attach_identity_adapter(pipe, IdentityAdapter(layer_names=["x.attn2"], key_dims=[32],
                                                      value_dims=[32], cross_attention_dim=32,
                                                      **SMALL))
    with pytest.raises(ConfigError):
        IdentityAdapter.for_unet(pipe.unet, init="random")
    adapter = IdentityAdapter.for_unet(pipe.unet, **SMALL)
    attach_identity_adapter(pipe, adapter)
    with pytest.raises(ConfigError):
        attach_identity_adapter(pipe, adapter)
    with pytest.raises(InputError):
        with identity_embedding(pipe, torch.zeros(1, 128)):
            pass


def test_adapter_on_lora_unet(pipe):
    add_lora(pipe.unet, rank=2)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.normal_(std=0.1)
    with_lora = generate(pipe)
    attach_identity_adapter(pipe, IdentityAdapter.for_unet(pipe.unet, **SMALL), scale=0.0)
    with identity_embedding(pipe, embedding(1)):
        assert np.array_equal(generate(pipe), with_lora)


# --- LoRA ------------------------------------------------------------------------------------

def test_lora_add_perturb_save_load(sd_folder, tmp_path):
    inputs = unet_inputs()
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    base = unet_out(unet, inputs)
    add_lora(unet, rank=4, alpha=8)
    assert torch.equal(unet_out(unet, inputs), base)  # lora_B starts at zero
    params = lora_parameters(unet)
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    tuned = unet_out(unet, inputs)
    assert clearly_different(tuned, base)

    folder = save_lora(unet, tmp_path / "lora")
    tensors = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    assert tensors and all(k.startswith("unet.") and ".lora_" in k for k in tensors)
    assert len(tensors) == len(params)
    assert json.loads((folder / CONFIG_NAME).read_text())["alpha"] == 8.0

    fresh = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    load_lora(fresh, folder)
    assert_same_maths(unet_out(fresh, inputs), tuned)  # reloaded weights: other memory layout


def test_lora_file_loads_in_stock_diffusers(sd_folder, tmp_path):
    inputs = unet_inputs()
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    add_lora(unet, rank=4, alpha=2, target_modules=("to_q", "to_v"))
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.normal_(std=0.05)
    save_lora(unet, tmp_path / "lora")
    stock = make_tiny_pipeline(sd_folder)
    stock.load_lora_weights(tmp_path / "lora")
    assert_same_maths(unet_out(stock.unet, inputs), unet_out(unet, inputs))  # diffusers' LoRA path


def test_lora_errors(sd_folder, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    with pytest.raises(ModelNotFoundError):
        load_lora(unet, tmp_path / "missing")
    with pytest.raises(ConfigError):
        add_lora(unet, target_modules=("no_such_layer",))
    with pytest.raises(ConfigError):
        save_lora(unet, tmp_path / "none")  # no adapter to save
    add_lora(unet, rank=2, target_modules=("to_q", "to_k"))
    folder = save_lora(unet, tmp_path / "lora")

    other = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    add_lora(other, rank=2, target_modules=("to_q",))
    with pytest.raises(ConfigError, match="does not match"):
        load_lora(other, folder)

    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": ["to_q"]}))
    fresh = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    with pytest.raises(ConfigError, match="do not match targets"):
        load_lora(fresh, folder)
    assert not getattr(fresh, "peft_config", {})  # a failed load leaves the UNet as it was

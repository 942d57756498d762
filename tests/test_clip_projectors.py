"""CLIP image tokens from local open_clip weights, and the identity/CLIP token projectors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from conftest import assert_one_line
from safetensors.torch import save_file

from diffswap_igfi.conditions.clip import ClipImageEncoder, register_local_config
from diffswap_igfi.conditions.projectors import ClipTokenProjector, IdentityTokenProjector
from diffswap_igfi.errors import ConfigError, InputError, ModelNotFoundError
from diffswap_igfi.faces.align import align_face
from tolerances import assert_same_maths

open_clip = pytest.importorskip("open_clip")

TINY = "diffswap-test-tiny-vit"
TINY_CFG = {  # a 64-wide, 2-layer ViT on 32 px images: 4x4 = 16 patch tokens
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip():
    """(in-memory open_clip model, its state dict) for the tiny config, frozen like ours."""
    register_local_config(TINY, TINY_CFG)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    model.eval().requires_grad_(False)
    model.visual.output_tokens = True
    return model, preprocess


@pytest.fixture(scope="module")
def weights(tiny_clip, tmp_path_factory):
    """The tiny model's weights saved as a raw torch state dict."""
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(tiny_clip[0].state_dict(), path)
    return path


@pytest.fixture(scope="module")
def encoder(weights):
    return ClipImageEncoder(TINY, weights)


def reference(model, images):
    """What open_clip itself gives for [-1,1] images already at the model's size."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    pooled, tokens = model.visual(((images + 1) / 2 - mean) / std)
    return tokens, pooled


def save_checkpoint(state: dict, path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "wrapped":  # training checkpoints: {'state_dict': ...} with DDP's 'module.'
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("fmt", ["raw", "wrapped", "safetensors"])
def test_encoder_from_local_file_matches_the_in_memory_model(tiny_clip, tmp_path, fmt):
    model, _ = tiny_clip
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    save_checkpoint(model.state_dict(), path, fmt)
    enc = ClipImageEncoder(TINY, path)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens, pooled = enc.encode(images)
    ref_tokens, ref_pooled = reference(model, images)
    assert tokens.shape == (3, 16, 64) and pooled.shape == (3, 32)
    assert (enc.num_tokens, enc.token_dim, enc.embed_dim, enc.image_size) == (16, 64, 32, (32, 32))
    assert torch.allclose(tokens, ref_tokens, atol=1e-6)
    assert torch.allclose(pooled, ref_pooled, atol=1e-6)


def test_encoder_is_frozen_but_differentiable_in_its_input(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training and not encoder.visual.training  # frozen tower stays in eval
    encoder.eval()
    images = (torch.rand(2, 3, 48, 40) * 2 - 1).requires_grad_(True)
    tokens, pooled = encoder.encode(images)  # any size: resized and centre-cropped to 32 px
    assert tokens.shape == (2, 16, 64) and pooled.shape == (2, 32)
    (tokens.square().mean() + pooled.square().mean()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_preprocessing_follows_open_clip_on_a_real_photo(tiny_clip, encoder, photos):
    """Our torch resize + crop + normalise agrees with open_clip's own PIL transform."""
    from PIL import Image

    _, preprocess = tiny_clip
    rgb = photos["astronaut"].rgb[40:360, 100:340]  # non-square: shortest side, then crop
    theirs = preprocess(Image.fromarray(rgb))[None]
    ours = encoder.preprocess(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    # same geometry and mean/std; only PIL's and torch's antialiased bicubic kernels differ
    # (measured: mean 0.004, max 0.05 in normalised units; a one-pixel shift gives ~0.15)
    assert (ours - theirs).abs().mean() < 0.01
    assert (ours - theirs).abs().max() < 0.1


def test_encode_uint8_on_a_real_face_crop(encoder, photos, faces):
    face = faces["astronaut"][0]
    crop = align_face(photos["astronaut"].rgb, face.kps, size=112).crop
    tokens, pooled = encoder.encode_uint8(crop[None])
    assert tokens.shape == (1, 16, 64) and pooled.shape == (1, 32)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    as_float = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    t2, p2 = encoder.encode(as_float)
    assert torch.equal(tokens, t2) and torch.equal(pooled, p2)
    other = align_face(photos["grace_hopper"].rgb, faces["grace_hopper"][0].kps, size=112).crop
    assert not torch.equal(encoder.encode_uint8(other)[1], pooled)
    with pytest.raises(InputError):
        encoder.encode_uint8(crop.astype(np.float32))


def test_missing_weights_file_is_one_line_model_not_found(tmp_path):
    missing = tmp_path / "nope" / "open_clip_pytorch_model.bin"
    with pytest.raises(ModelNotFoundError) as info:
        ClipImageEncoder("ViT-B-16", missing)
    assert_one_line(str(info.value))
    assert str(missing) in str(info.value) and "download" in str(info.value)


def test_unknown_model_name_and_hub_names_are_config_errors(weights):
    with pytest.raises(ConfigError) as info:
        ClipImageEncoder("ViT-Nonexistent-99", weights)
    assert_one_line(str(info.value))
    assert "list_models" in str(info.value)
    with pytest.raises(ConfigError):
        ClipImageEncoder("hf-hub:someone/some-clip", weights)
    with pytest.raises(ConfigError):
        register_local_config("no-text-tower", {"embed_dim": 8, "vision_cfg": {}})


def test_unreadable_or_mismatched_weights_are_one_line_input_errors(tmp_path, weights):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as info:
        ClipImageEncoder(TINY, garbage)
    assert_one_line(str(info.value))
    register_local_config(TINY + "-wide", {**TINY_CFG, "embed_dim": 48})
    with pytest.raises(InputError) as info:  # right format, wrong architecture
        ClipImageEncoder(TINY + "-wide", weights)
    assert_one_line(str(info.value))


def test_encoder_builds_with_no_network_at_all(weights, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    enc = ClipImageEncoder(TINY, weights)
    tokens, _ = enc.encode(torch.zeros(1, 3, 32, 32))
    assert tokens.shape == (1, 16, 64)


# ----------------------------------------------------------------------------- projectors

def make(kind: str):
    torch.manual_seed(0)
    if kind == "identity":
        proj = IdentityTokenProjector(embed_dim=512, num_tokens=4, cross_attention_dim=48,
                                      hidden_dim=32, depth=2, heads=4, num_context_tokens=3)
        x = torch.randn(5, 512)
    else:
        proj = ClipTokenProjector(clip_dim=64, num_tokens=6, cross_attention_dim=48,
                                  hidden_dim=32, depth=2, heads=4)
        x = torch.randn(5, 16, 64)
    with torch.no_grad():  # null tokens start at zero; make them distinctive for the tests
        proj.null_tokens.normal_()
    return proj, x


@pytest.mark.parametrize("kind", ["identity", "clip"])
def test_projector_output_shapes(kind):
    proj, x = make(kind)
    n = proj.config.num_tokens
    assert proj(x).shape == (5, n, 48)
    assert proj.null(3).shape == (3, n, 48)
    out = proj(x)
    assert not torch.allclose(out[0], out[1])  # the condition matters from the start
    assert torch.allclose(out.mean(-1), torch.zeros(5, n), atol=1e-5)  # final LayerNorm


@pytest.mark.parametrize("kind", ["identity", "clip"])
def test_projector_save_and_load_round_trip(kind, tmp_path):
    proj, x = make(kind)
    proj.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(proj).from_pretrained(tmp_path)
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(proj.config)
    drop = torch.tensor([False, True, False, False, True])
    assert_same_maths(loaded(x), proj(x))  # reloaded weights: kernels may round differently on another memory layout
    assert_same_maths(loaded(x, drop), proj(x, drop))
    assert torch.equal(loaded.null(2), proj.null(2))  # copied parameters


@pytest.mark.parametrize("kind", ["identity", "clip"])
def test_dropped_rows_are_exactly_the_null_tokens(kind):
    proj, x = make(kind)
    full = proj(x)
    drop = torch.tensor([True, False, True, False, False])
    out = proj(x, drop)
    for i in range(5):
        expected = proj.null_tokens if drop[i] else full[i]
        assert torch.equal(out[i], expected), i
    assert torch.equal(proj(x, torch.ones(5, dtype=torch.bool)), proj.null(5))
    with pytest.raises(ValueError):
        proj(x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        proj(x, torch.ones(5))


@pytest.mark.parametrize("kind", ["identity", "clip"])
def test_gradients_reach_queries_null_tokens_and_input_layer(kind):
    proj, x = make(kind)
    out = proj(x, torch.tensor([True, False, False, True, False]))
    out.square().sum().backward()
    first = proj.to_context if kind == "identity" else proj.proj_in
    for name, param in (("queries", proj.queries), ("null_tokens", proj.null_tokens),
                        ("input", first.weight)):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_config_round_trip_keeps_hyper_parameters(tmp_path):
    proj = IdentityTokenProjector(embed_dim=128, num_tokens=8, cross_attention_dim=64,
                                  hidden_dim=48, depth=3, heads=6, num_context_tokens=2,
                                  mlp_ratio=2.0)
    proj.save_pretrained(tmp_path)
    config = IdentityTokenProjector.load_config(tmp_path)
    again = IdentityTokenProjector.from_config(config)
    for key, value in dict(embed_dim=128, num_tokens=8, cross_attention_dim=64, hidden_dim=48,
                           depth=3, heads=6, num_context_tokens=2, mlp_ratio=2.0).items():
        assert config[key] == value and again.config[key] == value, key
    assert len(again.blocks) == 3 and again.queries.shape == (8, 48)
    with pytest.raises(ConfigError):
        IdentityTokenProjector(hidden_dim=30, heads=8)


def test_identity_tokens_depend_only_on_the_embedding_direction():
    proj, x = make("identity")
    assert torch.allclose(proj(x), proj(7.5 * x), atol=1e-5)


def test_clip_encoder_feeds_the_clip_projector(encoder):
    proj = ClipTokenProjector(clip_dim=encoder.token_dim, num_tokens=4, cross_attention_dim=48,
                              hidden_dim=32, depth=1, heads=2)
    tokens, _ = encoder.encode(torch.zeros(2, 3, 32, 32))
    assert proj(tokens, torch.tensor([False, True])).shape == (2, 4, 48)

"""Start-up memory of the SD-based pipeline: UNet, CLIP tower and ArcFace are built on the meta
device and take the memory-mapped tensors of their files (training/mmap_load.py; diffusers maps
the VAE), instead of a random init plus a private copy per process. Same weights, same training, file never written.
``bench/bench_startup_memory.py`` measures the saving at SD-1.5 size with 2 processes."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from diffswap_igfi.training.mmap_load import (WeightsMismatch, empty_module, file_backed_share,
                                              fill, mmap_state_dict)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/maps")

TINY_ARCFACE = (1, 1, 1, 1)  # iresnet stage depths (width 64, as arcface_torch's)
TINY_CLIP = "diffswap-test-mmap-vit"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny SD-inpainting folder, a tiny open_clip checkpoint (whole model, torch zip) and a
    small iresnet ArcFace (safetensors)."""
    import open_clip
    from tiny_models import make_tiny_sd_inpaint_folder

    from diffswap_igfi.conditions.clip import register_local_config

    root = tmp_path_factory.mktemp("mmap")
    folder = make_tiny_sd_inpaint_folder(root / "sd")
    register_local_config(TINY_CLIP, TINY_CLIP_CFG)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP)
    torch.save(clip.state_dict(), root / "clip.bin")
    from safetensors.torch import save_file

    from diffswap_igfi.conditions.iresnet import IResNet

    # an arcface_torch-style file without BatchNorm's counters (as released backbones are)
    state = IResNet(TINY_ARCFACE).state_dict()
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
              root / "arcface.safetensors")
    return folder, root / "clip.bin", root / "arcface.safetensors"


def _pipeline(sources, monkeypatch, mmap: bool):
    from diffswap_igfi.conditions import iresnet
    from diffswap_igfi.sfi.build import pipeline_from_sd_inpaint

    monkeypatch.setitem(iresnet.ARCHS, "tiny-test", TINY_ARCFACE)  # r18 would be 96 MB
    folder, clip, arcface = sources
    torch.manual_seed(0)
    return pipeline_from_sd_inpaint(folder, arcface=arcface, arcface_arch="tiny-test",
                                    clip_model=TINY_CLIP, clip_weights=clip, crop_size=64,
                                    mmap=mmap)


def test_sd_pipeline_weights_are_file_backed_and_equal_to_the_copying_build(sources,
                                                                            monkeypatch):
    folder, clip_file, arcface_file = sources
    mapped = _pipeline(sources, monkeypatch, mmap=True)
    copied = _pipeline(sources, monkeypatch, mmap=False)
    for name in ("unet", "vae", "clip_encoder", "identity_encoder"):
        a, b = getattr(mapped, name).state_dict(), getattr(copied, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:  # the same file's tensors, copied or not: equal to the bit
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
        assert getattr(mapped, name).training == getattr(copied, name).training, name
    assert mapped.unet.config.in_channels == copied.unet.config.in_channels == 16

    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    # diffusers maps the VAE either way; the UNet (widened) and CLIP (built by open_clip, then
    # copied) used to be private copies
    assert file_backed_share(mapped.vae, vae_file) == file_backed_share(copied.vae) == 1.0
    assert file_backed_share(mapped.clip_encoder, clip_file) == 1.0
    assert file_backed_share(mapped.identity_encoder, arcface_file) == 1.0
    assert (file_backed_share(copied.unet) == file_backed_share(copied.clip_encoder)
            == file_backed_share(copied.identity_encoder) == 0.0)
    # every UNet tensor but conv_in's weight (widened by the geometry channels: a new tensor)
    widened = mapped.unet.conv_in.weight
    share = file_backed_share(mapped.unet, unet_file)
    total = sum(p.numel() for p in mapped.unet.parameters())
    assert share == pytest.approx(1 - widened.numel() / total, abs=1e-12)
    assert not mapped.unet.conv_in.weight[:, 9:].any()
    assert all(p.requires_grad for p in mapped.unet.parameters())
    for name in ("clip_encoder", "identity_encoder"):
        assert not any(p.requires_grad for p in getattr(mapped, name).parameters()), name
    assert not mapped.identity_encoder.train().training  # frozen: stays in eval
    for name in ("unet", "vae", "clip_encoder", "identity_encoder"):
        module = getattr(mapped, name)
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), name


@pytest.mark.slow
def test_training_a_mapped_unet_matches_the_copied_one_and_never_writes_the_file(sources):
    from diffswap_igfi.sfi.build import _mmap_sd_unet
    from diffswap_igfi.sfi.unet import sfi_unet_from_sd_inpaint

    folder = sources[0]
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    before = _sha(unet_file)
    losses = {}
    for mmap in (True, False):
        unet = _mmap_sd_unet(folder) if mmap else sfi_unet_from_sd_inpaint(folder)
        assert file_backed_share(unet, unet_file) > (0.9 if mmap else -1)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randn(2, 16, 8, 8, generator=g)
            context = torch.randn(2, 3, unet.config.cross_attention_dim, generator=g)
            loss = unet(x, 10, encoder_hidden_states=context).sample.square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses[mmap] = (loss.item(), unet.state_dict())
    # the same operations on the same numbers; only where the weights lie in memory differs
    # (page-aligned file vs heap), which can change a vectorised kernel's summation order
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5, abs=1e-7)
    for key, value in losses[True][1].items():
        torch.testing.assert_close(value, losses[False][1][key], rtol=1e-4, atol=1e-6)
    assert _sha(unet_file) == before  # private mapping: the steps wrote copies of the pages


def test_fill_refuses_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(3, 4), "bias": torch.ones(3)}, tmp_path / "w.safetensors")
    state = mmap_state_dict(tmp_path / "w.safetensors")
    layer = fill(empty_module(lambda: torch.nn.Linear(4, 3)), state)
    assert file_backed_share(layer, tmp_path / "w.safetensors") == 1.0
    with pytest.raises(WeightsMismatch, match="other shapes"):
        fill(empty_module(lambda: torch.nn.Linear(5, 3)), mmap_state_dict(tmp_path /
                                                                          "w.safetensors"))
    with pytest.raises(WeightsMismatch, match="missing"):
        fill(empty_module(lambda: torch.nn.Linear(4, 3)), {"weight": torch.ones(3, 4)})

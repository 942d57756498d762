"""JR stage: JR-Net (shapes, init, save/load, fusion), component dictionaries built from real
shipped faces, and the JR losses."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.data.dataset import to_tensor_image
from diffswap_igfi.data.shards import ShardIndex
from diffswap_igfi.errors import ConfigError, InputError, OutputError
from diffswap_igfi.jr import (COMPONENTS, ComponentDictionary, ComponentEncoder, ContextualLoss,
                              JRGeneratorLoss, JRNet, PatchDiscriminator,
                              add_build_dictionaries_arguments, build_dictionaries,
                              build_dictionaries_from_shards, component_boxes, contextual_loss,
                              discriminator_loss, generator_adversarial_loss, jr_identity_loss,
                              r1_penalty, reconstruction_loss, run_build_dictionaries)
from diffswap_igfi.jr.network import crop_patches, paste_patches
from diffswap_igfi.losses import IdentityLoss, PerceptualLoss
from tolerances import assert_same_maths

TINY = dict(base_channels=8, num_res_blocks=2, attr_dim=16, style_hidden=32)
PATCHES = {name: 16 for name in COMPONENTS}


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (the zero-initialised ones too) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def jr_inputs(batch: int = 2, size: int = 32, seed: int = 0):
    swap, target = images(batch, size, seed), images(batch, size, seed + 1)
    identity = F.normalize(torch.randn(batch, 512, generator=torch.Generator().manual_seed(seed)))
    return swap, 0.1 * (target - swap), identity, target


# -------------------------------------------------------------------------------- real faces
@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """The shipped photos preprocessed to 64 px crops: 9 faces with mesh landmarks."""
    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("jr_faces")
    assert main(["samples", str(root / "photos")]) == 0
    preprocess(root / "photos", root / "data", crop_size=64, max_faces=6, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def faces(shard_dir):
    """(crops [9,3,64,64] in [-1,1], landmarks [9,468,2], kps [9,5,2])."""
    shards = ShardIndex(shard_dir)
    samples = [shards[i] for i in range(len(shards))]
    return (torch.stack([to_tensor_image(s["crop"]) for s in samples]),
            torch.stack([torch.from_numpy(s["landmarks"]) for s in samples]).float(),
            torch.stack([torch.from_numpy(s["kps"]) for s in samples]).float())


@pytest.fixture(scope="module")
def dictionary(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dict") / "components"
    built = build_dictionaries_from_shards(shard_dir, out, num_atoms=4, patch_sizes=PATCHES,
                                           iters=20)
    return built, out


# ------------------------------------------------------------------------------------ JR-Net
@pytest.mark.parametrize("upscale,blocks", [(2, 2), (1, 2), (2, 8)])
def test_untrained_jr_returns_the_upsampled_swap(upscale, blocks):
    torch.manual_seed(0)
    net = JRNet(**{**TINY, "num_res_blocks": blocks}, upscale=upscale, use_dictionary=False)
    swap, residual, identity, target = jr_inputs()
    with torch.no_grad():
        out = net(swap, residual, identity, target)
    assert out.shape == (2, 3, 32 * upscale, 32 * upscale)
    base = F.interpolate(swap, scale_factor=upscale, mode="bilinear", align_corners=False)
    assert (out - base).abs().max() <= 1e-3 + 1e-6  # only the clamp away from +-1 differs
    assert out.abs().max() < 1


def test_jr_save_load_round_trip_with_dictionary(tmp_path, dictionary, faces):
    torch.manual_seed(0)
    net = randomise(JRNet(**TINY)).eval()
    crops, landmarks, _ = faces
    swap, residual, identity, _ = jr_inputs(2, 64)
    args = (crops[:2], residual, identity, crops[2:4], landmarks[:2], dictionary[0])
    net.save_pretrained(tmp_path / "jr")
    loaded = JRNet.from_pretrained(tmp_path / "jr").eval()
    dict_loaded = ComponentDictionary.from_pretrained(dictionary[1])
    with torch.no_grad():
        a = net(*args)
        b = loaded(*args[:-1], dict_loaded)
    assert a.shape == (2, 3, 128, 128)
    assert_same_maths(a, b)  # reloaded weights: kernels may round differently on another memory layout


def test_identity_and_attributes_steer_the_output():
    net = randomise(JRNet(**TINY, use_dictionary=False))
    swap, residual, identity, target = jr_inputs()
    with torch.no_grad():
        out = net(swap, residual, identity, target)
        other_id = net(swap, residual, identity.flip(0), target)
        other_attr = net(swap, residual, identity, target.flip(0))
    assert (out - other_id).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (out - other_attr).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    swap, residual, identity, target = jr_inputs()
    grads = []
    for checkpointing in (False, True):
        net = randomise(JRNet(**TINY, use_dictionary=False))
        if checkpointing:
            net.enable_gradient_checkpointing()
        net(swap, residual, identity, target).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_inputs_are_config_errors(dictionary, faces):
    with pytest.raises(ConfigError, match="upscale"):
        JRNet(**TINY, upscale=3)
    net = JRNet(**TINY, dictionary_channels=(32, 64))
    crops, landmarks, _ = faces
    swap, residual, identity, _ = jr_inputs(2, 64)
    with pytest.raises(ConfigError, match="does not fit"):
        net(crops[:2], residual, identity, crops[:2], landmarks[:2], dictionary[0])
    with pytest.raises(ConfigError, match="divisible by 8"):
        net(swap[..., :60, :60], residual[..., :60, :60], identity, swap[..., :60, :60])


def test_jr_trains_down_the_reconstruction_loss(faces):
    torch.manual_seed(0)
    net = JRNet(**TINY, use_dictionary=False)
    target = faces[0][:2]
    swap = (target - 0.2).clamp(-1, 1)  # an SFI output that came out too dark
    identity = F.normalize(torch.randn(2, 512))
    residual = target - swap
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = reconstruction_loss(net(swap, residual, identity, target), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


# -------------------------------------------------------------------------- component geometry
def test_component_boxes_are_squares_around_their_landmarks(faces):
    _, landmarks, _ = faces
    boxes = component_boxes(landmarks, 64)
    assert set(boxes) == set(COMPONENTS)
    from diffswap_igfi.jr.network import COMPONENT_LANDMARKS

    for name, box in boxes.items():
        assert box.shape == (9, 4)
        torch.testing.assert_close(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
        points = landmarks[:, list(COMPONENT_LANDMARKS[name])] + 0.5
        assert (points >= box[:, None, :2]).all() and (points <= box[:, None, 2:]).all()
    # the subject's left eye is on the image's right
    assert (boxes["left_eye"][:, 0] > boxes["right_eye"][:, 0]).all()


def test_paste_puts_a_crop_back_where_it_came_from():
    ramp = torch.linspace(-1, 1, 64)
    image = torch.stack([ramp[None].expand(64, 64), ramp[:, None].expand(64, 64),
                         (ramp[None] * ramp[:, None])])[None]
    box = torch.tensor([[20.0, 12.0, 36.0, 28.0]])
    patch = crop_patches(image, box, 64, 16)
    torch.testing.assert_close(patch, image[..., 12:28, 20:36], atol=1e-5, rtol=0)
    canvas, cover = paste_patches(patch, box, 64, (64, 64))
    torch.testing.assert_close(canvas[..., 13:27, 21:35], image[..., 13:27, 21:35])
    assert cover[..., 13:27, 21:35].eq(1).all() and canvas[..., :11, :].eq(0).all()
    half, cover_half = paste_patches(patch, box, 64, (32, 32))  # a decoder level at S/2
    assert half.shape == (1, 3, 32, 32) and cover_half[..., 7:13, 11:17].eq(1).all()


# -------------------------------------------------------------------------------- dictionaries
def test_dictionaries_from_real_faces(dictionary):
    built, folder = dictionary
    assert built.scale_channels == {1: 64, 2: 128}
    for name in COMPONENTS:
        assert built.atoms(name, 1).shape == (4, 64, 16, 16)
        assert built.atoms(name, 2).shape == (4, 128, 8, 8)
        for s in (1, 2):
            counts = getattr(built, f"counts_{name}_s{s}")
            assert counts.sum() == 9 and (counts > 0).all()
    loaded = ComponentDictionary.from_pretrained(folder)
    plain = [json.loads(json.dumps({k: v for k, v in d.config.items() if k != "_name_or_path"}))
             for d in (built, loaded)]
    assert plain[0] == plain[1]
    state, again = built.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_matching_an_atom_returns_that_atom(dictionary):
    built, _ = dictionary
    for name in COMPONENTS:
        for s in (1, 2):
            atoms = built.atoms(name, s)
            matched, index, distance = built.match(atoms, name, s)
            assert index.tolist() == [0, 1, 2, 3]
            torch.testing.assert_close(matched, atoms, atol=1e-4, rtol=1e-4)
            # float32 sums over C*h*w products: the exact 0 comes back within rounding
            assert distance.abs().max() < 1e-4


def test_matching_restyles_the_atom_to_the_query(dictionary, faces):
    built, _ = dictionary
    crops, landmarks, _ = faces
    patches = crop_patches(crops, component_boxes(landmarks, 64)["mouth"], 64, 16)
    features = built.encode(patches)[1] * 3 + 0.5  # a colour/contrast shift of the query
    matched, index, distance = built.match(features, "mouth", 1)
    assert matched.shape == features.shape and index.shape == (9,)
    assert ((distance > 0) & (distance <= 4)).all()  # real faces are no atom, yet correlate
    active = features.std(dim=(2, 3)) > 1e-2
    torch.testing.assert_close(matched.mean(dim=(2, 3)), features.mean(dim=(2, 3)),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(matched.std(dim=(2, 3), unbiased=False)[active],
                               features.std(dim=(2, 3), unbiased=False)[active],
                               atol=1e-3, rtol=1e-3)
    # the scaled query finds the same atoms as the plain one: matching ignores colour and contrast
    assert torch.equal(built.match(features, "mouth", 1)[1],
                       built.match(built.encode(patches)[1], "mouth", 1)[1])


def test_too_few_faces_and_vgg_encoder(faces, tmp_path):
    crops, landmarks, _ = faces
    with pytest.raises(InputError, match="at least 16"):
        build_dictionaries(crops, landmarks, num_atoms=16, patch_sizes=PATCHES)
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "v.pt")
    encoder = ComponentEncoder.from_vgg16(tmp_path / "v.pt")
    x = images(1, 16)
    normalised = ((x + 1) / 2 - encoder.mean) / encoder.std
    torch.testing.assert_close(encoder(x)[1], features[:9](normalised))
    built = build_dictionaries(crops, landmarks, encoder=encoder, num_atoms=2, scales=(2,),
                               patch_sizes=PATCHES, components=("nose",))
    assert built.atoms("nose", 2).shape == (2, 128, 8, 8)
    assert torch.equal(built.encoder.convs[0].weight, features[0].weight)


def test_build_dictionaries_command(shard_dir, tmp_path, capsys):
    parser = add_build_dictionaries_arguments(argparse.ArgumentParser())
    out = tmp_path / "d"
    args = parser.parse_args([str(shard_dir), str(out), "--num-atoms", "3", "--scales", "2",
                              "--eye-size", "8", "--nose-size", "8", "--mouth-size", "16"])
    assert run_build_dictionaries(args) == 0
    assert "3 atoms x 4 components x 1 scale(s) from 9 faces" in capsys.readouterr().out
    loaded = ComponentDictionary.from_pretrained(out)
    assert loaded.atoms("mouth", 2).shape == (3, 128, 8, 8) and loaded.config.scales == [2]
    with pytest.raises(OutputError, match="--force"):
        run_build_dictionaries(args)
    args = parser.parse_args([str(shard_dir), str(tmp_path / "e"), "--num-atoms", "10"])
    with pytest.raises(InputError, match="9 usable faces"):
        run_build_dictionaries(args)


def test_fusion_changes_only_the_component_regions(dictionary, faces):
    built, _ = dictionary
    crops, landmarks, _ = faces
    torch.manual_seed(0)
    net = randomise(JRNet(**TINY), scale=0.1)
    swap, residual, identity, _ = jr_inputs(2, 64)
    args = (crops[:2], residual, identity, crops[2:4])
    plain = net(*args)
    fused = net(*args, landmarks[:2], built)
    changed = (plain - fused).abs().amax(dim=(0, 1))  # [128,128]
    assert changed.max() > 1e-3
    assert changed[:24].eq(0).all() and changed[:, :16].eq(0).all()  # far from every box
    fused.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.sft.parameters())


# ------------------------------------------------------------------------------------- losses
def test_contextual_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    shuffled = x.flatten(2)[:, :, torch.randperm(64, generator=g)].view_as(x)
    other = torch.randn(2, 16, 8, 8, generator=g)
    same = contextual_loss(x, x)
    assert 0 <= same.item() < 1e-3 and contextual_loss(shuffled, x).item() < 1e-3
    assert contextual_loss(other, x).item() > 0.5
    y = x.clone().requires_grad_(True)
    contextual_loss(y + 0.3 * other, x).backward()
    assert y.grad.abs().sum() > 0
    big = torch.randn(1, 4, 64, 64, generator=g)  # pooled to <= 1024 positions
    assert contextual_loss(big, big, max_positions=256).item() < 1e-3


def test_reconstruction_counts_only_self_swaps():
    out = images(3, 64).requires_grad_(True)
    target = images(3, 32, seed=5)
    none = reconstruction_loss(out, target, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad
    one = reconstruction_loss(out, target, torch.tensor([False, True, False]))
    expected = (F.avg_pool2d(out[1:2], 2) - target[1:2]).abs().mean()
    torch.testing.assert_close(one, expected)


def test_adversarial_losses_and_r1(tmp_path):
    high, low = torch.full((2, 1, 4, 4), 3.0), torch.full((2, 1, 4, 4), -3.0)
    for kind in ("hinge", "non_saturating"):
        good = discriminator_loss(high, low, kind)  # D is right about both
        bad = discriminator_loss(low, high, kind)
        assert good.item() < 0.1 and bad.item() > 2 * good.item() + 1
        assert generator_adversarial_loss(high, kind) < generator_adversarial_loss(low, kind)
    assert discriminator_loss(high, low).item() == 0.0
    assert generator_adversarial_loss(high).item() == -3.0
    with pytest.raises(ConfigError):
        discriminator_loss(high, low, "wgan")

    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8, num_layers=3)
    real = images(2, 64)
    assert disc(real).shape == (2, 1, 6, 6)
    penalty = r1_penalty(disc, real)
    assert penalty.item() > 0
    penalty.backward()  # every weight gets a gradient (the last bias cannot: D' ignores it)
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if "weight" in n)
    disc.save_pretrained(tmp_path / "d")
    assert_same_maths(PatchDiscriminator.from_pretrained(tmp_path / "d")(real), disc(real))


def test_generator_loss_combines_the_terms(faces, tmp_path):
    import torchvision

    crops, _, kps = faces
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:9]
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "v.pt")
    perceptual = PerceptualLoss(tmp_path / "v.pt", layers=("relu1_2", "relu2_2"))
    id_loss = IdentityLoss(ArcFaceEncoderModel(layers=(1, 1, 1, 1), width=8))
    loss_fn = JRGeneratorLoss(identity=id_loss, perceptual=perceptual,
                              contextual=ContextualLoss(PerceptualLoss(tmp_path / "v.pt",
                                                                       layers=("relu2_2",))))
    net = randomise(JRNet(**TINY, use_dictionary=False), scale=0.05)
    identity = F.normalize(torch.randn(2, 512))
    out = net(crops[:2], torch.zeros_like(crops[:2]), identity, crops[:2])
    disc = PatchDiscriminator(base_channels=8)
    total, terms = loss_fn(out, crops[:2], same=torch.tensor([True, False]), kps=kps[:2],
                           source_embeds=identity, fake_logits=disc(out))
    assert set(terms) == {"reconstruction", "identity", "perceptual", "contextual", "adversarial"}
    assert torch.isfinite(total) and 0 <= terms["identity"] <= 2
    total.backward()
    assert net.to_rgb.weight.grad.abs().sum() > 0
    # keypoints follow the upscaling: a 2x image scores as its source
    up = F.interpolate(crops[:2], scale_factor=2, mode="bilinear", align_corners=False)
    embeds = id_loss.encoder.embed_aligned(crops[:2], kps[:2])
    assert jr_identity_loss(id_loss, up, kps[:2], embeds, input_size=64).item() < 0.02

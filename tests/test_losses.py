"""SFI training losses: schedule algebra, midpoint estimation, identity and perceptual losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line
from diffusers import DDIMScheduler, DDPMScheduler

from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.iresnet import IResNet
from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.errors import ConfigError, ModelNotFoundError
from diffswap_igfi.faces.align import template_points
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.losses import IdentityLoss, PerceptualLoss
from diffswap_igfi.sfi.build import tiny_vae
from diffswap_igfi.sfi.losses import (diffusion_loss, diffusion_target, midpoint_estimate,
                                      midpoint_identity_loss, predicted_eps, predicted_x0)
from diffswap_igfi.sfi.unet import tiny_sfi_unet

TIMESTEPS = torch.tensor([0, 1, 250, 501, 998, 999])


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized ops: one thread is as fast, and immune to OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sd_scheduler(prediction_type: str = "epsilon", cls=DDIMScheduler):
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear", prediction_type=prediction_type)


def sample(dtype=torch.float64, batch: int = len(TIMESTEPS)):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    return x0, torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)


def abar(scheduler, t):
    return scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------ schedule algebra
def test_diffusion_target_matches_formulas():
    x0, noise = sample()
    assert diffusion_target(sd_scheduler("epsilon"), x0, noise, TIMESTEPS) is noise
    assert diffusion_target(sd_scheduler("sample"), x0, noise, TIMESTEPS) is x0
    for cls in (DDIMScheduler, DDPMScheduler):
        sched = sd_scheduler("v_prediction", cls)
        v = diffusion_target(sched, x0, noise, TIMESTEPS)
        a = abar(sched, TIMESTEPS)
        torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0, rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(v, sched.get_velocity(x0, noise, TIMESTEPS), rtol=0, atol=0)


def test_unknown_prediction_type_is_a_config_error():
    x0, noise = sample()
    with pytest.raises(ConfigError, match="prediction_type"):
        diffusion_target(sd_scheduler("flow"), x0, noise, TIMESTEPS)
    with pytest.raises(ConfigError):
        predicted_x0(sd_scheduler("flow"), x0, noise, TIMESTEPS)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predicted_x0_and_eps_invert_add_noise(kind, dtype):
    sched = sd_scheduler(kind)
    x0, noise = sample(dtype)
    noisy = sched.add_noise(x0, noise, TIMESTEPS)
    truth = diffusion_target(sched, x0, noise, TIMESTEPS)
    # float32 rounding of z_t is amplified by 1/sqrt(abar) (~15 at t = 999) or 1/sqrt(1-abar)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    x0_hat = predicted_x0(sched, noisy, truth, TIMESTEPS)
    assert x0_hat.dtype == dtype
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=tol)
    if kind != "sample":  # sample prediction divides by sqrt(1 - abar_0) = 0.03 at t = 0
        torch.testing.assert_close(predicted_eps(sched, noisy, truth, TIMESTEPS), noise,
                                   rtol=1e-5, atol=tol)
    else:
        torch.testing.assert_close(predicted_eps(sched, noisy[2:], truth[2:], TIMESTEPS[2:]),
                                   noise[2:], rtol=1e-5, atol=tol)


def test_diffusion_loss_weights_the_mask():
    out, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1  # half of every latent
    out[..., :4, :] = 2.0  # error 4 inside the mask only
    assert diffusion_loss(out, target).item() == 2.0
    assert diffusion_loss(out, target, mask, mask_weight=1.0).item() == 2.0
    assert diffusion_loss(out, target, mask).item() == 2.0  # no weight: the plain MSE
    # weight 3 inside: (3 * 4 * n) / (3 * n + n)
    assert diffusion_loss(out, target, mask, mask_weight=3.0).item() == 3.0


# --------------------------------------------------------------------------- midpoint estimation
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_midpoint_estimate_with_an_oracle_recovers_x0(kind):
    sched = sd_scheduler(kind)
    x0, noise = sample()
    noisy = sched.add_noise(x0, noise, TIMESTEPS)
    seen = []

    def oracle(z, t):  # the exact prediction for the known x0, whatever z it is given
        seen.append(t.clone())
        a = abar(sched, t)
        eps = (z - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    first = diffusion_target(sched, x0, noise, TIMESTEPS)
    x0_hat = midpoint_estimate(oracle, sched, noisy, first, TIMESTEPS)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-8)
    assert len(seen) == 1
    assert seen[0].tolist() == [0, 0, 125, 250, 499, 499]


def test_midpoint_estimate_is_a_ddim_jump_to_half_t():
    sched = sd_scheduler()
    x0, noise = sample()
    noisy = sched.add_noise(x0, noise, TIMESTEPS)
    got = {}

    def record(z, t):
        got["z"] = z
        return torch.zeros_like(z)

    midpoint_estimate(record, sched, noisy, noise, TIMESTEPS)
    torch.testing.assert_close(got["z"], sched.add_noise(x0, noise, TIMESTEPS // 2))


# --------------------------------------------------------------------------------- identity loss
@pytest.fixture(scope="module")
def face64():
    """A real photo at 64 px with the ArcFace template's keypoints: [1,3,64,64], [1,5,2]."""
    rgb = load_image(sample_path("grace_hopper")).rgb
    image = F.interpolate(to_tensor(rgb[None]), size=(64, 64), mode="bilinear",
                          align_corners=False, antialias=True)
    kps = torch.as_tensor(template_points(64, "arcface"), dtype=torch.float32)[None]
    return image, kps


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ArcFaceEncoderModel(layers=(1, 1, 1, 1), width=8)


def test_identity_loss_is_zero_for_the_own_embedding(face64, encoder):
    image, kps = face64
    images = torch.cat([image, image.flip(-1)]).requires_grad_(True)
    kps = kps.expand(2, 5, 2)
    loss_fn = IdentityLoss(encoder)
    own = encoder.embed_aligned(images, kps).detach()
    loss = loss_fn(images, kps, own)
    assert abs(loss.item()) < 1e-6
    other = torch.roll(own, 1, 0)  # the other image's identity: positive loss
    assert loss_fn(images, kps, other).item() > 1e-4
    # an unfrozen encoder around a plain iresnet works too, and is frozen by IdentityLoss
    arc = IdentityLoss(ArcFaceEncoderModel.from_backbone(IResNet((1, 1, 1, 1), width=8),
                                                         frozen=False))
    assert not any(p.requires_grad for p in arc.parameters())
    assert torch.isfinite(arc(images, kps, own))


def test_identity_loss_selection(face64, encoder):
    image, kps = face64
    images = torch.cat([image, image.flip(-1)]).requires_grad_(True)
    kps = kps.expand(2, 5, 2)
    source = F.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    loss_fn = IdentityLoss(encoder)
    first = loss_fn(images[:1], kps[:1], source[:1])
    torch.testing.assert_close(loss_fn(images, kps, source, torch.tensor([True, False])), first)
    torch.testing.assert_close(loss_fn(images, kps, source, torch.tensor([2.0, 0.0])), first)
    none = loss_fn(images, kps, source, torch.tensor([False, False]))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.equal(images.grad, torch.zeros_like(images))


@pytest.fixture(scope="module")
def tiny_models(encoder):
    torch.manual_seed(0)
    unet = tiny_sfi_unet(cross_attention_dim=32, sample_size=8)
    vae = tiny_vae().requires_grad_(False)  # as the trainer does
    return unet, vae, IdentityLoss(encoder), sd_scheduler()


def midpoint_inputs(models, face64, timesteps, rows=slice(None)):
    """Inputs for a batch of len(timesteps), then sliced to ``rows`` (closure included)."""
    unet, vae, _, sched = models
    g = torch.Generator().manual_seed(2)
    image, kps = face64
    batch = len(timesteps)
    target = image.expand(batch, -1, -1, -1)
    with torch.no_grad():
        latents = vae.encode(target).latent_dist.mode() * vae.config.scaling_factor
    mask = torch.zeros(batch, 1, 64, 64)
    mask[..., 12:56, 8:56] = 1.0
    conds = torch.cat([F.max_pool2d(mask, 8), latents * (1 - F.max_pool2d(mask, 8)),
                       torch.randn(batch, 7, 8, 8, generator=g)], 1)[rows]
    context = torch.randn(batch, 6, 32, generator=g)[rows]
    calls = []

    def denoise(z, t):
        calls.append(t)
        return unet(torch.cat([z, conds], 1), t, encoder_hidden_states=context).sample

    noise = torch.randn(latents.shape, generator=g)
    noisy = sched.add_noise(latents, noise, timesteps)
    source = F.normalize(torch.randn(batch, 512, generator=g), dim=-1)
    return dict(denoise=denoise, noisy=noisy[rows], kps=kps.expand(batch, 5, 2)[rows],
                source=source[rows], mask=mask[rows], target=target[rows], calls=calls)


def run_midpoint(models, inp, timesteps, **kw):
    unet, vae, id_loss, sched = models
    unet.zero_grad(set_to_none=True)
    out = inp["denoise"](inp["noisy"], timesteps)
    return out, midpoint_identity_loss(
        inp["denoise"], sched, vae, inp["noisy"], out, timesteps, kps=inp["kps"],
        source_embeds=inp["source"], id_loss=id_loss, **kw)


def test_midpoint_identity_loss_trains_the_unet_only(tiny_models, face64):
    unet, vae, id_loss, _ = tiny_models
    t = torch.tensor([150, 700])
    inp = midpoint_inputs(tiny_models, face64, t)
    _, loss = run_midpoint(tiny_models, inp, t, mask=inp["mask"], target=inp["target"])
    assert loss.ndim == 0 and torch.isfinite(loss) and 0.0 < loss.item() < 2.0
    assert [c.tolist() for c in inp["calls"]] == [[150, 700], [75, 350]]
    loss.backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is None for p in id_loss.parameters())


def test_midpoint_identity_loss_outside_t_range_is_zero(tiny_models, face64):
    unet, *_ = tiny_models
    t = torch.tensor([600, 999])
    inp = midpoint_inputs(tiny_models, face64, t)
    _, loss = run_midpoint(tiny_models, inp, t, t_range=(0, 500))
    assert loss.item() == 0.0 and loss.requires_grad
    assert len(inp["calls"]) == 1  # no second UNet call, no decode
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in unet.parameters())


def test_midpoint_identity_loss_counts_only_samples_in_range(tiny_models, face64):
    t = torch.tensor([100, 900])
    inp = midpoint_inputs(tiny_models, face64, t)
    _, mixed = run_midpoint(tiny_models, inp, t, t_range=(0, 500))
    one = midpoint_inputs(tiny_models, face64, t, rows=slice(0, 1))
    _, alone = run_midpoint(tiny_models, one, t[:1])
    assert mixed.item() > 0
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="mask and target"):
        run_midpoint(tiny_models, inp, t, mask=inp["mask"])


# ------------------------------------------------------------------------------- perceptual loss
@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory):
    """The state dict of a randomly initialised torchvision vgg16 (nothing is downloaded)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(model.state_dict(), path)
    return path, model.features.eval()


def test_perceptual_loss(vgg16_weights):
    path, reference = vgg16_weights
    loss_fn = PerceptualLoss(path)
    assert not any(p.requires_grad for p in loss_fn.parameters())
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert loss_fn(a, a).item() == 0.0
    a.requires_grad_(True)
    loss = loss_fn(a, b)
    assert loss.item() > 0
    loss.backward()
    assert a.grad.abs().sum() > 0
    # the same network as torchvision's: relu4_3 equals features[:23] of the saved model
    x = (((a.detach() + 1) / 2) - loss_fn.mean) / loss_fn.std
    torch.testing.assert_close(loss_fn._taps(a.detach())[-1], reference[:23](x))
    l2 = PerceptualLoss(path, ["relu2_2", "relu1_2"], distance="l2", layer_weights=[0.0, 1.0])
    only_first = PerceptualLoss(path, ["relu1_2"], distance="l2")
    torch.testing.assert_close(l2(a, b), only_first(a, b))


def test_perceptual_loss_missing_weights(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        PerceptualLoss(tmp_path / "vgg16.pth")
    assert_one_line(str(err.value))
    assert "vgg16" in str(err.value)
    bad = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelNotFoundError, match="not a torchvision vgg16"):
        PerceptualLoss(bad)
    with pytest.raises(ConfigError):
        PerceptualLoss(bad, ["conv9"])

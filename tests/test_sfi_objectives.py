"""The SFI trainer's image-space objectives (issue 18: MFIM's 3DMM supervision, GHOST's eye loss,
the perceptual loss, all on one decoded midpoint estimate) and blurred-face conditioning, with
tiny random judges built here (3DDFA_V2 MobileNet, VGG16): nothing is downloaded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.errors import ConfigError
from diffswap_igfi.faces.align import template_points
from diffswap_igfi.geometry.tddfa_torch import (EyeLoss, TDDFAParams, ThreeDMMLoss,
                                                roi_boxes_from_kps, save_regressor)
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.losses import PerceptualLoss
from diffswap_igfi.sfi.blurred import blur_face, condition_image
from diffswap_igfi.sfi.losses import MidpointJudges
from diffswap_igfi.training.config import SFIConfig, from_dict
from test_train_sfi import _config, _records, _train, data_dir  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------ tiny judges
def write_tiny_tddfa(folder, fmt: str = "safetensors"):
    """A converted 3DDFA_V2 folder at toy width: the random regressor of test_tddfa_torch (head
    scaled down so params stay near the mean, as ``basis_model`` does) and the random BFM
    basis of test_tddfa whose mean pose is a frontal face filling the roi (so the 68 points land
    in the crop), as mb1_120x120.{onnx,safetensors} + bfm_68.safetensors."""
    from test_tddfa import make_arrays, pose_params
    from test_tddfa_torch import random_net, write_onnx

    folder.mkdir(parents=True, exist_ok=True)
    net = random_net(5)
    with torch.no_grad():
        net.head.weight.mul_(0.01)
        net.head.bias.zero_()
    if fmt == "onnx":
        write_onnx(net, folder / "mb1_120x120.onnx", unfused=False)
    else:
        save_regressor(net, folder / "mb1_120x120.safetensors")
    arrays = make_arrays()
    arrays["param_mean"][:12] = pose_params(0, 0, 0)
    save_file({k: torch.from_numpy(v) for k, v in arrays.items()},
              str(folder / "bfm_68.safetensors"))
    return folder


def write_tiny_vgg(path):
    """torchvision vgg16's ``features`` up to relu4_3 (what PerceptualLoss reads), random."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features[:23]
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()},
              str(path))
    return path


@pytest.fixture(scope="module")
def tddfa_dir(tmp_path_factory):
    return write_tiny_tddfa(tmp_path_factory.mktemp("tddfa"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    return write_tiny_vgg(tmp_path_factory.mktemp("vgg") / "vgg16.safetensors")


@pytest.fixture(scope="module")
def faces64():
    """Two real photos at 64 px with the ArcFace template's keypoints: [2,3,64,64], [2,5,2]."""
    rgb = [load_image(sample_path(n)).rgb for n in ("grace_hopper", "astronaut")]
    images = torch.cat([F.interpolate(to_tensor(x[None]), size=(64, 64), mode="bilinear",
                                      align_corners=False, antialias=True) for x in rgb])
    kps = torch.as_tensor(template_points(64, "arcface"), dtype=torch.float32)
    return images, kps.expand(2, 5, 2).clone()


def judges_of(tddfa_dir, vgg_file=None):
    params = TDDFAParams.from_path(tddfa_dir)
    return MidpointJudges(tddfa=ThreeDMMLoss(params), eye=EyeLoss(params, sigma=2.0),
                          perceptual=PerceptualLoss(vgg_file) if vgg_file else None).eval()


# ------------------------------------------------------------------------ loading and the roi
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_tddfa_params_load_from_a_folder_or_the_regressor_file(tmp_path, fmt, faces64):
    folder = write_tiny_tddfa(tmp_path / fmt, fmt)
    images, kps = faces64
    boxes = roi_boxes_from_kps(kps)
    by_folder = TDDFAParams.from_path(folder)
    by_file = TDDFAParams.from_path(folder / f"mb1_120x120.{fmt}")
    with torch.no_grad():
        a, b = by_folder(images, boxes), by_file(images, boxes)
    assert a.shape == (2, 62)
    assert torch.equal(a, b)  # the same file read twice, the same call


def test_roi_boxes_from_kps_match_3ddfa_landmark_rois(faces):
    """On the detected faces of the shipped photos the five-point box overlaps 3DDFA_V2's
    68-point landmark roi well (the constants were fitted on these faces: a consistency check
    of the rule and its units, not an independent accuracy claim)."""
    from diffswap_igfi.geometry.tddfa import MESH_TO_68, roi_box_from_landmarks

    ious = []
    for records in faces.values():
        for face in records:
            want = roi_box_from_landmarks(face.points[list(MESH_TO_68)][:, :2])
            kps = torch.as_tensor(face.points[[468, 473, 1, 61, 291], :2], dtype=torch.float32)
            got = roi_boxes_from_kps(kps[None])[0].numpy()
            lo, hi = np.maximum(got[:2], want[:2]), np.minimum(got[2:], want[2:])
            inter = np.prod(np.clip(hi - lo, 0, None))
            area = lambda b: np.prod(b[2:] - b[:2])  # noqa: E731
            ious.append(inter / (area(got) + area(want) - inter))
    assert len(ious) >= 8 and min(ious) > 0.6 and np.mean(ious) > 0.75, ious


# -------------------------------------------------------------------- the judges of one decode
def test_judges_vanish_on_the_target_and_pull_the_swap_toward_it(tddfa_dir, vgg_file,
                                                                 faces64):
    images, kps = faces64
    target, other = images[:1], images[1:]
    kps = kps[:1]
    judges = judges_of(tddfa_dir, vgg_file)
    assert judges.names == ["tddfa", "eye", "perceptual"]
    embeds = torch.zeros(1, 512)
    same = judges(target.clone(), target, kps, embeds)
    for name in ("tddfa", "eye", "perceptual"):
        assert same[name].item() == 0.0, name  # the same image through the same networks
    swap = other.clone().requires_grad_(True)
    first = judges(swap, target, kps, embeds)
    assert {"tddfa_shape", "tddfa_pose", "tddfa_expression"} <= set(first)
    for name in ("tddfa", "eye", "perceptual"):
        assert first[name].item() > 0, name
    # each term, descended on alone, moves the image toward the target's reading of it (VGG
    # to relu2_2 here: the same code path, a quarter of the cost)
    shallow = PerceptualLoss(vgg_file, layers=("relu1_2", "relu2_2"))
    for name, module in (("tddfa", judges.tddfa), ("eye", judges.eye), ("perceptual", shallow)):
        alone = MidpointJudges(**{name: module})
        x = other.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=0.03)
        values = []
        for _ in range(6):
            optimizer.zero_grad()
            value = alone(x, target, kps, embeds)[name]
            value.backward()
            optimizer.step()
            values.append(value.item())
        assert values[-1] < 0.9 * values[0], (name, values)
    assert all(p.grad is None for p in judges.parameters())  # frozen judges


def test_3dmm_and_eye_share_one_regressor_pass(tddfa_dir, faces64):
    images, kps = faces64
    judges = judges_of(tddfa_dir)
    calls = []
    hook = judges.tddfa.params.regressor.register_forward_hook(
        lambda module, inputs, output: calls.append(torch.is_grad_enabled()))
    try:
        judges(images[1:].clone().requires_grad_(True), images[:1], kps[:1], torch.zeros(1, 512))
    finally:
        hook.remove()
    assert calls == [False, True]  # the target once without gradients, the swap once with


def tiny_batch(faces64, batch: int = 4) -> dict:
    """An SFIDataset-shaped batch of the two photos (no data folder needed)."""
    images, kps = faces64
    target = images.repeat(batch // 2, 1, 1, 1)
    mask = torch.zeros(batch, 1, 64, 64)
    mask[..., 14:56, 12:52] = 1.0
    return {"target": target, "source_id": F.interpolate(target, size=(112, 112)),
            "mask": mask, "geometry": torch.rand(batch, 7, 8, 8, generator=torch.Generator()
                                                 .manual_seed(0)),
            "kps": kps.repeat(batch // 2, 1, 1), "identity": torch.zeros(batch, 512),
            "has_identity": torch.zeros(batch, dtype=torch.bool),
            "drop_identity": torch.zeros(batch, dtype=torch.bool),
            "drop_clip": torch.zeros(batch, dtype=torch.bool)}


def test_trainer_decodes_once_for_all_terms_and_weighs_them(tddfa_dir, vgg_file, faces64):
    from diffswap_igfi.sfi.training import (SFITrainable, build_sfi_pipeline, midpoint_judges,
                                            training_scheduler)

    config = from_dict(SFIConfig, {
        "model": {"tddfa": str(tddfa_dir), "condition": "blurred"},
        "loss": {"id_weight": 0.1, "tddfa_weight": 0.5, "eye_weight": 2.0,
                 "perceptual_weight": 0.3, "perceptual_weights": str(vgg_file),
                 "id_t_min": 0, "id_t_max": 1000, "id_fraction": 0.5}})
    config.validate()
    pipe = build_sfi_pipeline(config)
    assert pipe.config.condition == "blurred"
    judges = midpoint_judges(config, pipe)
    assert judges.names == ["identity", "tddfa", "eye", "perceptual"]
    model = SFITrainable(pipe, training_scheduler(pipe), config, judges=judges)
    decodes, unet_rows = [], []
    vae = model.frozen.vae
    original = vae.decode
    vae.decode = lambda z, *a, **k: (decodes.append(len(z)), original(z, *a, **k))[1]
    hook = model.unet.register_forward_hook(lambda m, i, o: unet_rows.append(len(i[0])))
    try:
        out = model(tiny_batch(faces64), torch.tensor([3]))
    finally:
        hook.remove()
        del vae.decode
    assert decodes == [2]  # one decode, of the id_fraction sub-batch (2 of 4)
    assert unet_rows == [4, 2]  # the diffusion call, then the midpoint's on the sub-batch
    names = ["identity", "tddfa", "eye", "perceptual"]
    assert set(out) == {"loss", "diffusion", *names, "tddfa_shape", "tddfa_pose",
                        "tddfa_expression"}
    assert all(torch.isfinite(v) for v in out.values())
    assert all(out[n] > 0 for n in names)
    weights = {"identity": 0.1, "tddfa": 0.5, "eye": 2.0, "perceptual": 0.3}
    expected = out["diffusion"] + sum(w * out[n] for n, w in weights.items())
    torch.testing.assert_close(out["loss"].detach(), expected)  # same sum, other order
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())
    assert all(p.grad is None for p in judges.parameters())


def test_config_switches():
    def check(**sections):
        from_dict(SFIConfig, sections).validate()

    check(loss={"perceptual_weight": 0.1, "perceptual_weights": "vgg16.pth"})  # no refusal
    with pytest.raises(ConfigError, match="perceptual_weights"):
        check(loss={"perceptual_weight": 0.1})
    for key in ("tddfa_weight", "eye_weight"):
        with pytest.raises(ConfigError, match="model.tddfa"):
            check(loss={key: 1.0})
    with pytest.raises(ConfigError, match="model.condition"):
        check(model={"condition": "noised"})
    with pytest.raises(ConfigError, match=">= 0"):
        check(loss={"eye_weight": -1.0}, model={"tddfa": "x"})


# ------------------------------------------------------------------- blurred-face conditioning
def test_blurred_condition_keeps_the_surroundings_and_only_a_blur_of_the_face(faces64):
    images, _ = faces64
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 14:56, 12:52] = 1.0
    blurred = condition_image(images, mask, "blurred", 0.125)
    masked = condition_image(images, mask, "masked")
    outside = (mask == 0).expand_as(images)
    assert torch.equal(blurred[outside], images[outside])  # copied pixels
    assert torch.equal(masked[~outside], torch.zeros_like(masked[~outside]))  # the anchors'
    inside = (mask == 1).expand_as(images)
    face, kept = images[inside].view(2, 3, -1), blurred[inside].view(2, 3, -1)
    # tone kept: the face's mean colour (a normalised blur within the mask preserves it to a
    # few levels; the blanked condition is 0 = mid grey there)
    assert (face.mean(-1) - kept.mean(-1)).abs().max() < 0.05
    # detail gone: the horizontal gradient energy inside the face drops to a small share
    def detail(x):
        crop = x[..., 20:50, 18:46]
        return (crop[..., 1:] - crop[..., :-1]).pow(2).mean()
    assert detail(blurred) < 0.1 * detail(images)
    assert torch.equal(blur_face(images, torch.zeros_like(mask)), images)
    # sigma is a share of the face's size: a weaker share keeps more detail
    assert detail(blurred) < detail(condition_image(images, mask, "blurred", 0.02))


def test_blurred_pipeline_conditions_differently_keeps_the_target_outside_and_saves_it(
        photos, faces, tmp_path):
    from diffswap_igfi.conditions.source import Source
    from diffswap_igfi.sfi.build import tiny_pipeline
    from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline, FaceJob

    masked = tiny_pipeline(seed=0)
    blurred = tiny_pipeline(seed=0)
    blurred.register_to_config(condition="blurred")
    pairs = [(faces["astronaut"][0], Source(photos["grace_hopper"], faces["grace_hopper"][0]))]
    target = photos["astronaut"].rgb
    outputs, prepared = {}, {}
    for name, pipe in (("masked", masked), ("blurred", blurred)):
        pipe.set_progress_bar_config(disable=True)
        builder = pipe.condition_builder()
        job = FaceJob(0, pairs[0][0], pairs[0][1].rgb, pairs[0][1].face,
                      builder.build(pairs[0][1].rgb, pairs[0][1].face, target, pairs[0][0]))
        prepared[name] = pipe.prepare_jobs([job])
        outputs[name] = pipe(target, pairs, num_inference_steps=3,
                             generator=torch.Generator().manual_seed(0))
    a, b = prepared["masked"], prepared["blurred"]
    assert torch.equal(a.latents, b.latents) and torch.equal(a.mask, b.mask)
    assert (a.masked_latents - b.masked_latents).abs().max() > 1e-2  # the face differs
    for name, out in outputs.items():
        alpha = out.alphas[0]
        assert np.array_equal(out.images[0][alpha == 0], target[alpha == 0]), name
        assert (alpha > 0).sum() > 1000
    assert not np.array_equal(outputs["masked"].crops, outputs["blurred"].crops)
    blurred.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert config["condition"] == "blurred" and config["condition_blur"] == 0.125
    loaded = DiffSwapIGFIPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.condition == "blurred"
    with pytest.raises(ValueError, match="condition"):
        DiffSwapIGFIPipeline(**{**masked.components, "condition": "noised"})


# ------------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_tiny_training_with_3dmm_eye_perceptual_and_blurred_condition(
        tmp_path, data_dir, tddfa_dir, vgg_file):  # noqa: F811 (data_dir: the fixture)
    """Issue 18's acceptance: a tiny SFI run with items 1, 2, 6 (and the perceptual loss) on:
    every loss finite and logged on every step, the total falling, the condition exported."""
    config = _config(tmp_path, **{
        "model.tddfa": str(tddfa_dir), "model.condition": "blurred",
        "loss.tddfa_weight": 1.0, "loss.eye_weight": 1.0, "loss.perceptual_weight": 0.1,
        "loss.perceptual_weights": str(vgg_file)})
    run = tmp_path / "run"
    steps = 40
    proc = _train(["--config", str(config), "--data", str(data_dir), "--output", str(run),
                   "--max-steps", str(steps)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    terms = ("loss", "diffusion", "identity", "tddfa", "tddfa_shape", "tddfa_pose",
             "tddfa_expression", "eye", "perceptual")
    for r in records:
        assert all(math.isfinite(r[k]) for k in terms), r
    for name in ("tddfa", "eye", "perceptual"):  # the judges ran (0 only on skipped steps)
        assert sum(r[name] > 0 for r in records) > steps // 2, name
    first = sum(r["loss"] for r in records[:10]) / 10
    last = sum(r["loss"] for r in records[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    index = json.loads((run / "pipeline" / "model_index.json").read_text())
    assert index["condition"] == "blurred"

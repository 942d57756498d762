"""TrainLoop's parts without a training run: epochs of small data sets, state devices after
resume (the meta device stands in for a GPU), launcher precision, DeepSpeed settings, the
optional 8-bit optimizer, and the model choices a config makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.training.config import OptimConfig, RunConfig, SFIConfig, load_config
from diffswap_igfi.training.ema import EMA
from diffswap_igfi.training.loop import epoch_repeats
from diffswap_igfi.training.runtime import (check_deepspeed, misplaced_state,
                                            resolve_mixed_precision)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("samples,processes,batch,accumulation,expected", [
    (9, 1, 4, 1, 1),     # two full batches: no repeats
    (9, 2, 4, 1, 1),     # 8 samples per step, 9 in the set
    (9, 2, 8, 1, 2),     # 16 per step
    (6, 2, 4, 1, 2),     # the six photos on two processes
    (3, 2, 4, 1, 3),
    (9, 1, 4, 4, 2),     # accumulation needs more batches than an epoch has
    (9, 8, 4, 1, 4),
    (1, 1, 1, 1, 1),
])
def test_every_process_gets_a_full_accumulation_cycle_per_epoch(samples, processes, batch,
                                                                 accumulation, expected):
    repeats = epoch_repeats(samples, processes, batch, accumulation)
    assert repeats == expected
    # what the sharded, drop_last loader then gives each process
    per_process = (samples * repeats // batch) // processes
    assert per_process >= accumulation


# ------------------------------------------------------------------ resume: state on its device
def _meta_params():
    """Parameters on the meta device: a stand-in for CUDA on this CPU machine (a tensor that is
    not on the CPU), so a state left on the CPU after loading shows up."""
    return [torch.nn.Parameter(torch.zeros(3, 2, device="meta")),
            torch.nn.Parameter(torch.zeros(5, device="meta"))]


def test_ema_loaded_from_a_cpu_checkpoint_stays_on_its_parameters_device_in_fp32():
    cpu = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    saved = EMA(cpu, 0.9)
    saved.step()
    state = saved.state_dict()  # what accelerate writes, and loads back on the CPU
    assert all(t.device.type == "cpu" for t in state["shadow"])

    params = _meta_params()
    ema = EMA(params, 0.9)
    ema.load_state_dict(state)
    assert [s.device.type for s in ema.shadow] == ["meta", "meta"]
    assert ema.misplaced() == []
    assert ema.optimization_step == 1
    ema.step()  # diffusers' EMAModel failed here: CPU copy, parameter elsewhere


def test_ema_kept_on_the_cpu_and_in_fp32_for_low_precision_parameters():
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    ema = EMA(params, 0.5, device="cpu", every=2)
    assert ema.shadow[0].dtype == torch.float32 and ema.misplaced() == []
    first = ema.shadow[0].clone()
    with torch.no_grad():
        params[0].add_(1.0)
    ema.step()  # update 1 copies (warm-up decay 0)
    assert torch.equal(ema.shadow[0], params[0].float())
    with torch.no_grad():
        params[0].add_(1.0)
    ema.step()  # update 2: every=2 -> averaged now
    ema.step()  # update 3: skipped
    assert not torch.equal(ema.shadow[0], first)
    assert ema.optimization_step == 3


def test_misplaced_state_names_optimizer_and_ema_tensors_off_their_device():
    params = _meta_params()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ema = EMA(params, 0.9)
    assert misplaced_state(params, optimizer, ema) == []
    optimizer.state[params[0]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 2)}
    ema.shadow[1] = torch.zeros(5)  # on the CPU
    found = misplaced_state(params, optimizer, ema)
    assert len(found) == 2 and "exp_avg on cpu" in found[0] and "EMA copy 1 on cpu" in found[1]


def test_optimizer_state_loaded_from_the_cpu_lands_on_the_parameters_device():
    cpu = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.AdamW(cpu, lr=1e-3)
    sum(p.sum() for p in cpu).backward()
    optimizer.step()
    params = _meta_params()
    moved = torch.optim.AdamW(params, lr=1e-3)
    moved.load_state_dict(optimizer.state_dict())
    assert misplaced_state(params, moved, None) == []


# ------------------------------------------------------------------- launcher and DeepSpeed
def test_launcher_mixed_precision_is_honoured_and_unknown_ones_refused():
    assert resolve_mixed_precision("no", {}) == ("no", None)
    assert resolve_mixed_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "no"}) == ("bf16", None)
    precision, note = resolve_mixed_precision("no", {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert precision == "bf16" and "from the launcher" in note
    with pytest.raises(ConfigError, match="fp8"):
        resolve_mixed_precision("no", {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_deepspeed_accumulation_or_clipping_that_differ_from_the_config_are_refused():
    train, optim = RunConfig(gradient_accumulation_steps=2), OptimConfig(max_grad_norm=1.0)
    ds = {"ACCELERATE_USE_DEEPSPEED": "true"}
    check_deepspeed(train, optim, ds)  # accumulation left to us: fine
    check_deepspeed(train, optim, {**ds, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
                                   "ACCELERATE_GRADIENT_CLIPPING": "1.0"})
    check_deepspeed(train, optim, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"})  # no DS
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 1, the training config 2"):
        check_deepspeed(train, optim, {**ds, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"})
    with pytest.raises(ConfigError, match="gradient_clipping 0.5"):
        check_deepspeed(train, optim, {**ds, "ACCELERATE_GRADIENT_CLIPPING": "0.5"})
    yaml_text = (ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text()
    assert "\n  gradient_accumulation_steps" not in yaml_text  # taken from the training config


def test_8bit_adamw_without_bitsandbytes_is_refused_when_the_config_loads(tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  optimizer: adamw_8bit\n")
    with pytest.raises(ConfigError, match=r"pip install 'diffswap-igfi\[bnb\]'"):
        load_config(config)


# ---------------------------------------------------------------- model choices of the config
@pytest.mark.slow
def test_prediction_type_defaults_to_the_base_models_and_an_sd_override_is_refused(monkeypatch):
    from diffswap_igfi.sfi import build
    from diffswap_igfi.sfi.training import build_sfi_pipeline

    config = SFIConfig()
    config.model.crop_size = 32
    base = build.tiny_pipeline(seed=0, crop_size=32)
    assert build_sfi_pipeline(config).scheduler.config.prediction_type == \
        base.scheduler.config.prediction_type == "epsilon"
    config.model.prediction_type = "v_prediction"  # a tiny model is trained from scratch
    assert build_sfi_pipeline(config).scheduler.config.prediction_type == "v_prediction"
    monkeypatch.setattr(build, "pipeline_from_sd_inpaint", lambda *a, **k: base)
    config.model.kind, config.model.sd_inpaint = "sd_inpaint", "/sd"
    with pytest.raises(ConfigError, match="differs from the base model's epsilon"):
        build_sfi_pipeline(config)


@pytest.mark.parametrize("force_upcast,expected", [(True, torch.float32),
                                                    (False, torch.bfloat16)])
def test_identity_loss_decodes_in_fp32_under_autocast_when_the_vae_asks(force_upcast,
                                                                        expected):
    from diffusers import AutoencoderKL, DDPMScheduler

    from diffswap_igfi.sfi.losses import midpoint_identity_loss

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        force_upcast=force_upcast).requires_grad_(False)
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    noisy = torch.randn(1, 4, 8, 8)
    weight = torch.nn.Parameter(torch.ones(()))

    def denoise(z, t):
        return z * weight

    def id_loss(images, kps, source):
        return images.float().mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = midpoint_identity_loss(denoise, DDPMScheduler(), vae, noisy, denoise(noisy, 0),
                                      torch.tensor([100]), kps=torch.zeros(1, 5, 2),
                                      source_embeds=torch.zeros(1, 512), id_loss=id_loss)
    loss.backward()
    assert seen == [expected] and weight.grad is not None


# ------------------------------------------------------------- the loop itself, in-process
class _Toy(torch.utils.data.Dataset):
    """3 samples x: [2] float; the TrainLoop dataset protocol."""

    def __init__(self):
        self.repeat, self.epoch = 1, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_repeat(self, times):
        self.repeat = times

    def __len__(self):
        return 3 * self.repeat

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i % 3))}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, batch, seed):
        return {"loss": ((batch["x"] * self.w) ** 2).mean()}


@pytest.fixture
def toy_loop(tmp_path):
    from accelerate.state import AcceleratorState

    from diffswap_igfi.training.config import EMAConfig
    from diffswap_igfi.training.loop import TrainLoop

    def make(max_steps, accumulation):
        train = RunConfig(max_steps=max_steps, batch_size=2,
                          gradient_accumulation_steps=accumulation, checkpoint_every=1000)
        loop = TrainLoop(tmp_path / f"run{max_steps}", train, OptimConfig(), EMAConfig(),
                         project="toy")
        model = _Model()
        return loop, loop.setup(model, list(model.parameters()), _Toy(), None)

    yield make
    AcceleratorState._reset_state(True)


@pytest.mark.slow
def test_accumulation_cycles_span_epochs_and_every_step_is_counted(toy_loop):
    # 3 samples, batch 2, accumulation 2: repeated twice -> 3 batches per epoch; 5 steps
    # take 10 micro-batches, a cycle ending in the middle of epochs 1 and 3
    loop, model = toy_loop(5, 2)
    micro = sum(1 for batch, seed in loop if loop.step(model, batch, seed) or True)
    assert loop.dataset.repeat == 2 and len(loop.loader) == 3
    assert micro == 10 and loop.step_count == 5
    assert [r["step"] for r in loop.metrics.read()] == [1, 2, 3, 4, 5]


def test_an_epoch_without_an_optimizer_step_is_an_error_not_a_spin(toy_loop):
    loop, _model = toy_loop(3, 1)
    with pytest.raises(ConfigError, match="no optimizer step"):
        for _batch, _seed in loop:
            pass  # a trainer that forgot loop.step(...)

"""SFI training end to end on the shipped photos: config errors, loss falls, export swaps,
2-process DDP keeps ranks equal, kill -9 and resume reproduce the uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "train_sfi.py"
TINY = ROOT / "configs" / "sfi" / "tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess

    faces = tmp_path_factory.mktemp("faces")
    assert main(["samples", str(faces)]) == 0
    out = tmp_path_factory.mktemp("data")
    preprocess(faces, out, crop_size=64, max_faces=6, progress=False)
    return out


def _config(tmp_path: Path, **overrides) -> Path:
    config = yaml.safe_load(TINY.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(args: list[str], *, timeout: int = 600, launcher: list[str] | None = None,
           script: Path = SCRIPT, env: dict | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    command = (launcher or [sys.executable]) + [str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(processes: int) -> list[str]:
    """``accelerate launch`` with the 2-process CPU config the README tells users to try, or
    plain python for one process."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--num_processes",
            str(processes), "--main_process_port", str(_free_port())]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.mark.parametrize("problem,expected", [
    ("unknown key", "unknown key 'train.batchsize'"),
    ("missing data", "preprocess"),
    ("empty data", "preprocess"),
    ("missing config", "config file not found"),
    ("sd without weights", "needs model.arcface"),
    ("other crop size", "holds 64px crops but the model works at 128px: preprocess with "
                        "--crop-size 128 or change model.crop_size"),
])
def test_bad_setups_fail_before_training_with_one_line(tmp_path, problem, expected, data_dir):
    config = _config(tmp_path)
    data = data_dir
    if problem == "unknown key":
        config = _config(tmp_path, **{"train.batchsize": 4})
    elif problem == "missing data":
        data = tmp_path / "nope"
    elif problem == "empty data":
        data = tmp_path / "empty"
        data.mkdir()
    elif problem == "missing config":
        config = tmp_path / "missing.yaml"
    elif problem == "sd without weights":
        config = _config(tmp_path, **{"model.kind": "sd_inpaint",
                                      "model.sd_inpaint": str(tmp_path)})
    elif problem == "other crop size":
        config = _config(tmp_path, **{"model.crop_size": 128})
    run = tmp_path / "run"
    proc = _train(["--config", str(config), "--data", str(data), "--output", str(run)],
                  timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert_one_line(proc.stderr)
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_tiny_training_lowers_the_loss_and_exports_a_pipeline_the_cli_swaps_with(
        tmp_path, data_dir):
    run = tmp_path / "run"
    proc = _train(["--config", str(_config(tmp_path)), "--data", str(data_dir), "--output",
                   str(run), "--max-steps", "200"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 201))
    first = sum(losses[s] for s in range(1, 21)) / 20
    last = sum(losses[s] for s in range(181, 201)) / 20
    assert last < 0.6 * first, (first, last)
    assert (run / "pipeline" / "model_index.json").is_file()
    assert list((run / "validation").glob("step-*.png"))
    assert list(run.rglob("events.out.tfevents.*"))
    from diffswap_igfi.cli import main

    out = tmp_path / "swap.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--checkpoint", str(run / "pipeline"), "--steps", "4", "--quiet"]) == 0
    assert out.is_file()


def one_process_learning_rates(config: Path, steps: int) -> list[float]:
    """The rates a single process applies at optimizer steps 1..steps, from the schedule."""
    import torch
    from diffusers.optimization import get_scheduler

    o = yaml.safe_load(config.read_text())["optim"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=o["learning_rate"])
    schedule = get_scheduler(o["lr_scheduler"], optimizer,
                             num_warmup_steps=o["lr_warmup_steps"], num_training_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_data_set_smaller_than_one_optimizer_step_trains_and_says_so(tmp_path, data_dir,
                                                                        processes):
    """9 samples; one optimizer step takes 2 x 8 = 16 (batch 8 with accumulation 2 on one
    process, two processes of 8 on two): it used to spin forever at step 0 (issue 19).
    Also: the learning rate of every step is the one-process schedule's on two processes
    (accelerate stepped it once per process), and the launcher's bf16 is honoured."""
    config = _config(tmp_path, **{"train.batch_size": 8, "train.validation_every": 1000,
                                  "train.gradient_accumulation_steps": 3 - processes,
                                  "optim.lr_scheduler": "cosine", "optim.lr_warmup_steps": 2})
    run = tmp_path / "run"
    if processes == 1:  # what `accelerate launch --mixed_precision bf16` sets
        launch, env = launcher(1), {"ACCELERATE_MIXED_PRECISION": "bf16"}
    else:
        launch, env = launcher(2) + ["--mixed_precision", "bf16"], None
    proc = _train(["--config", str(config), "--data", str(data_dir), "--output", str(run),
                   "--max-steps", "3"], launcher=launch, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every epoch shows each sample 2 times" in proc.stdout
    assert "mixed precision: bf16 from the launcher" in proc.stdout
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    expected = one_process_learning_rates(config, 3)
    assert len(set(expected)) == 3  # warm-up then cosine: a 2x pace would show
    for record, rate in zip(records, expected):
        assert record["lr"] == pytest.approx(rate, rel=1e-12, abs=1e-15), (records, expected)


@pytest.mark.slow
def test_two_process_ddp_keeps_parameters_equal_on_both_ranks(tmp_path, data_dir):
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29517"]
    proc = _train(["--config", str(_config(tmp_path, **{"train.batch_size": 2})), "--data",
                   str(data_dir), "--output", str(run), "--max-steps", "4", "--dump-params"],
                  launcher=launcher, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, data_dir):
    config = _config(tmp_path, **{"train.checkpoint_every": 4, "train.validation_every": 1000})
    common = ["--config", str(config), "--data", str(data_dir), "--max-steps", "12"]
    straight = tmp_path / "straight"
    proc = _train(common + ["--output", str(straight)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(SCRIPT), *common, "--output", str(killed)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (killed / "metrics.jsonl").is_file() and len(_losses(killed)) >= 6:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "pipeline").exists()  # it really died before the end

    proc = _train(common + ["--output", str(killed), "--resume", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = _losses(straight), _losses(killed)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_lora_training_moves_the_geometry_channels_and_checkpoints_the_adapter_only(
        tmp_path, data_dir):
    config = yaml.safe_load((ROOT / "configs" / "sfi" / "tiny_lora.yaml").read_text())
    config["train"].update(validation_every=1000, checkpoint_every=2)
    path = tmp_path / "tiny_lora.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = _train(["--config", str(path), "--data", str(data_dir), "--output", str(run),
                   "--max-steps", "3"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    from diffswap_igfi.sfi.training import build_sfi_pipeline
    from diffswap_igfi.training.config import SFIConfig, load_config

    unet = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in key or "base_layer" in key for key in unet)
    initial = build_sfi_pipeline(load_config(path, SFIConfig)).unet.conv_in.weight
    geometry = unet["conv_in.weight"][:, -7:]  # the last 7 input channels: landmark heatmaps
    assert geometry.abs().sum() > 0
    assert not torch.equal(geometry, initial[:, -7:].detach())  # LoRA used to freeze them
    lora = load_file(run / "pipeline" / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all("lora" in key for key in lora)
    # the checkpoint holds what trains: adapter, conv_in, projectors; not the frozen UNet
    saved = load_file(run / "checkpoints" / "checkpoint-00000002" / "model.safetensors")
    frozen_unet = [k for k in saved if k.startswith("unet.") and "lora_" not in k
                   and not k.startswith("unet.conv_in.")]
    assert not frozen_unet, frozen_unet[:3]
    assert any("lora_" in k for k in saved) and "unet.conv_in.weight" in saved
    from diffswap_igfi.cli import main

    out = tmp_path / "swap.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                 "--checkpoint", str(run / "pipeline"), "--steps", "2", "--quiet"]) == 0
    # resume from that adapter-only checkpoint
    proc = _train(["--config", str(path), "--data", str(data_dir), "--output", str(run),
                   "--max-steps", "4", "--resume", "latest"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_streaming_reader_trains_across_epochs_and_resumes_exactly(tmp_path, data_dir):
    """train.data_reader: stream (9 samples in one shard, batches of 4: 2 per epoch), 5 steps
    straight vs. resumed from the step-3 checkpoint (mid-epoch): the same losses."""
    import shutil

    config = _config(tmp_path, **{"train.data_reader": "stream", "train.shuffle_buffer": 4,
                                  "train.batch_size": 4, "train.checkpoint_every": 3,
                                  "train.validation_every": 1000})
    common = ["--config", str(config), "--data", str(data_dir), "--max-steps", "5"]
    straight = tmp_path / "straight"
    proc = _train(common + ["--output", str(straight)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "checkpoint-00000003",
                    resumed / "checkpoints" / "checkpoint-00000003")
    proc = _train(common + ["--output", str(resumed), "--resume", "latest"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == [1, 2, 3, 4, 5] and sorted(b) == [4, 5]
    for step in (4, 5):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_two_processes_two_workers_stream_disjoint_samples_and_resume_exactly(
        tmp_path, tmp_path_factory):
    """train.data_reader: stream with 2 processes x 2 DataLoader workers (4 readers) over 5
    shards: in every epoch the two processes' samples are disjoint, and a run resumed from the
    step-3 checkpoint (mid-epoch) sees the same samples and losses as the straight run."""
    import shutil

    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess

    faces = tmp_path_factory.mktemp("faces-shards")
    assert main(["samples", str(faces)]) == 0
    data = tmp_path / "data"
    preprocess(faces, data, crop_size=64, max_faces=6, shard_size=1, progress=False)
    config = _config(tmp_path, **{"train.data_reader": "stream", "train.shuffle_buffer": 2,
                                  "train.batch_size": 2, "train.num_workers": 2,
                                  "train.checkpoint_every": 3, "train.validation_every": 1000,
                                  "train.log_samples": True})
    common = ["--config", str(config), "--data", str(data), "--max-steps", "5"]
    straight = tmp_path / "straight"
    proc = _train(common + ["--output", str(straight)], launcher=launcher(2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def seen(run: Path, rank: int) -> list[dict]:
        lines = (run / f"samples-rank{rank}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    logs = [seen(straight, r) for r in (0, 1)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5]
    epochs = {r["epoch"] for r in logs[0]}
    assert len(epochs) >= 2  # the run crossed an epoch boundary
    for epoch in epochs:
        ours, theirs = ({s for r in log if r["epoch"] == epoch for s in r["samples"]}
                        for log in logs)
        assert ours and theirs and not ours & theirs, epoch

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "checkpoint-00000003",
                    resumed / "checkpoints" / "checkpoint-00000003")
    proc = _train(common + ["--output", str(resumed), "--resume", "latest"],
                  launcher=launcher(2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        again = seen(resumed, rank)
        assert [r["step"] for r in again] == [4, 5]
        assert again == [r for r in logs[rank] if r["step"] > 3], rank
    a, b = _losses(straight), _losses(resumed)
    for step in (4, 5):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])

"""DeepSpeed ZeRO-2 on a CPU (optional: runs only where `deepspeed` imports; install the
`deepspeed` extra), with one process and with two (a gloo group: each rank its own rank, its
own samples, equal parameters)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

import test_train_sfi
from test_train_sfi import ROOT, _config, _free_port, _records, _train

data_dir = test_train_sfi.data_dir  # the module-scoped fixture, shared

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (optional extra)")


def _launcher(tmp_path, precision: str, processes: int = 1, **deepspeed) -> list[str]:
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")
                            .read_text())
    config.update(num_processes=processes, mixed_precision=precision)
    config["deepspeed_config"].update(deepspeed)
    path = tmp_path / f"ds-{precision}.yaml"
    path.write_text(yaml.safe_dump(config))
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
            "--main_process_port", str(_free_port())]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_zero2_trains_with_our_accumulation_and_resumes(tmp_path, data_dir, precision):
    config = _config(tmp_path, **{"train.gradient_accumulation_steps": 2,
                                  "train.checkpoint_every": 2, "train.validation_every": 2})
    run = tmp_path / "run"
    args = ["--config", str(config), "--data", str(data_dir), "--output", str(run)]
    proc = _train(args + ["--max-steps", "2"], launcher=_launcher(tmp_path, precision))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Gradient accumulation steps mismatch" not in proc.stderr
    assert list((run / "validation").glob("*.png"))  # inference on the DeepSpeed-cast UNet
    proc = _train(args + ["--max-steps", "3", "--resume", "latest"],
                  launcher=_launcher(tmp_path, precision))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in _records(run)] == [1, 2, 3]


@pytest.mark.slow
def test_an_accumulation_in_the_deepspeed_yaml_that_differs_is_refused(tmp_path, data_dir):
    config = _config(tmp_path, **{"train.gradient_accumulation_steps": 2})
    proc = _train(["--config", str(config), "--data", str(data_dir), "--output",
                   str(tmp_path / "run")],
                  launcher=_launcher(tmp_path, "bf16", gradient_accumulation_steps=1),
                  timeout=300)
    assert proc.returncode != 0  # the launcher reports the script's exit 2 as its own 1
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "gradient_accumulation_steps 1, the training config 2" in ours[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_zero2_with_two_processes_gives_each_rank_its_rank_and_samples_and_equal_weights(
        tmp_path, data_dir):
    """accelerate used to record a world of one under DeepSpeed without CUDA: both ranks read
    every sample, and DeepSpeed refused the batch size (2 != 2 * 1 * 2)."""
    config = _config(tmp_path, **{"train.batch_size": 2, "train.gradient_accumulation_steps": 2,
                                  "train.checkpoint_every": 2, "train.validation_every": 1000,
                                  "train.log_samples": True})
    run = tmp_path / "run"
    args = ["--config", str(config), "--data", str(data_dir), "--output", str(run),
            "--dump-params"]
    proc = _train(args + ["--max-steps", "2"], launcher=_launcher(tmp_path, "bf16", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    seen = [[json.loads(line) for line in (run / f"samples-rank{r}.jsonl").read_text()
             .splitlines()] for r in (0, 1)]
    assert [(r["step"], r["micro"]) for r in seen[0]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for step in (1, 2):  # 9 samples, 8 a step: each step is an epoch, split between the ranks
        ours, theirs = ({s for r in log if r["step"] == step for s in r["samples"]}
                        for log in seen)
        assert len(ours) == len(theirs) == 4 and not ours & theirs, step
    proc = _train(args + ["--max-steps", "3", "--resume", "latest"],
                  launcher=_launcher(tmp_path, "bf16", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in _records(run)] == [1, 2, 3]
    ranks = [json.loads((run / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]

"""DeepSpeed ZeRO-2 on a CPU (optional: runs only where `deepspeed` imports; install the
`deepspeed` extra). One process: DeepSpeed's CPU accelerator does not form a multi-process
group under `accelerate launch` here (every rank saw itself as 0 of 1)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from test_train_sfi import ROOT, _config, _free_port, _records, _train, data_dir  # noqa: F401

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (optional extra)")


def _launcher(tmp_path, precision: str, **deepspeed) -> list[str]:
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml")
                            .read_text())
    config.update(num_processes=1, mixed_precision=precision)
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

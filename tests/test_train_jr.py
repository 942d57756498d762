"""JR training through TrainLoop on a data set smaller than one optimizer step (issue 19),
with one and two processes."""

from __future__ import annotations

import pytest
import yaml
from test_train_sfi import ROOT, _records, _train, data_dir, launcher  # noqa: F401 (fixture)

JR_SCRIPT = ROOT / "train" / "train_jr.py"


@pytest.fixture(scope="module")
def sfi_pipeline(tmp_path_factory):
    from diffswap_igfi.sfi.build import tiny_pipeline

    folder = tmp_path_factory.mktemp("sfi") / "pipeline"
    tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_jr_on_a_data_set_smaller_than_one_optimizer_step_trains(tmp_path, data_dir,  # noqa: F811
                                                                 sfi_pipeline, processes):
    config = yaml.safe_load((ROOT / "configs" / "jr" / "tiny.yaml").read_text())
    config["train"].update(batch_size=8, gradient_accumulation_steps=3 - processes)
    config["sfi_steps"] = 1
    path = tmp_path / "jr.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = _train(["--config", str(path), "--data", str(data_dir), "--sfi-checkpoint",
                   str(sfi_pipeline), "--output", str(run), "--max-steps", "1"],
                  launcher=launcher(processes), script=JR_SCRIPT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every epoch shows each sample 2 times" in proc.stdout
    assert [r["step"] for r in _records(run)] == [1]
    assert (run / "pipeline" / "model_index.json").is_file()

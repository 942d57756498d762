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


@pytest.mark.slow
def test_tiny_jr_with_occlusions_dictionary_and_perceptual_trains(tmp_path, data_dir,  # noqa: F811
                                                                  sfi_pipeline):
    """Issue 18's JR acceptance: items 3 (synthetic occlusions) and 5 (dictionary fusion) on,
    with the perceptual loss: every term logged and finite at every step, the total falling, and
    the exported pipeline carrying the dictionary the run built."""
    import numpy as np
    import torch
    import torchvision

    from diffswap_igfi.jr.dictionary import ComponentDictionary
    from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline

    torch.manual_seed(0)  # VGG16's first two blocks, random: nothing is downloaded
    features = torchvision.models.vgg16(weights=None).features[:9]
    vgg = tmp_path / "vgg16.pt"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    config = yaml.safe_load((ROOT / "configs" / "jr" / "tiny.yaml").read_text())
    config["model"].update(num_res_blocks=2, use_dictionary=True, dictionary_atoms=4,
                           dictionary_fraction=0.5)
    config["loss"].update(perceptual_weight=1.0, perceptual_weights=str(vgg),
                          perceptual_layers=["relu1_2", "relu2_2"])
    config.update(sfi_steps=1, occlusion_p=0.5)
    config["optim"]["learning_rate"] = 3e-3
    config["train"].update(batch_size=2, checkpoint_every=1000)
    path = tmp_path / "jr.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    steps = 24
    proc = _train(["--config", str(path), "--data", str(data_dir), "--sfi-checkpoint",
                   str(sfi_pipeline), "--output", str(run), "--max-steps", str(steps)],
                  script=JR_SCRIPT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    terms = ("loss", "reconstruction", "identity", "perceptual", "occluded",
             "dictionary_distance", "fusion_scale", "fusion_shift")
    for r in records:
        assert all(np.isfinite(r[k]) for k in terms), r
    assert 0 < np.mean([r["occluded"] for r in records]) < 1  # occlusion_p 0.5 of the targets
    assert records[0]["fusion_scale"] == 0 < records[-1]["fusion_scale"]  # the SFT trained
    # two epochs of the 9 faces (batches of 2) at each end: the batches' own spread averages out
    first = np.mean([r["loss"] for r in records[:8]])
    last = np.mean([r["loss"] for r in records[-8:]])
    print(f"loss: first 8 steps {first:.4f}, last 8 {last:.4f}")
    assert last < 0.9 * first, (first, last)
    loaded = DiffSwapIGFIPipeline.from_pretrained(run / "pipeline")
    built = ComponentDictionary.from_pretrained(run / "dictionary")
    assert isinstance(loaded.dictionary, ComponentDictionary)
    assert torch.equal(loaded.dictionary.atoms("mouth", 1), built.atoms("mouth", 1))
    # what a user runs, in a fresh process (nothing of jr imported beforehand)
    import subprocess
    import sys

    out = tmp_path / "swap.png"
    proc = subprocess.run([sys.executable, "-m", "diffswap_igfi", "swap", "-s",
                           "sample:grace_hopper", "-t", "sample:astronaut", "-o", str(out),
                           "--checkpoint", str(run / "pipeline"), "--steps", "1", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]

"""JR's dictionary fusion in training (issue 18, item 5): the SFT fusion trains with JR, the
exported pipeline carries the dictionary and inference fuses it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.jr.dictionary import ComponentDictionary, build_dictionaries_from_shards
from diffswap_igfi.jr.losses import JRGeneratorLoss
from diffswap_igfi.jr.network import JRNet
from diffswap_igfi.jr.training import JRTrainable, export_with_refiner
from diffswap_igfi.sfi.build import tiny_pipeline
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.training.config import JRConfig
from tolerances import assert_same_image

TINY = dict(base_channels=8, num_res_blocks=2, attr_dim=16, style_hidden=32)


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory):
    """(data dir, collated JRDataset batch) of the astronaut and Grace Hopper at 64 px."""
    from torch.utils.data import default_collate

    from diffswap_igfi.data.augment import AugmentConfig
    from diffswap_igfi.data.preprocess import preprocess
    from diffswap_igfi.io.samples import sample_path
    from diffswap_igfi.jr.training import JRDataset

    root = tmp_path_factory.mktemp("jr_fusion")
    (root / "photos").mkdir()
    for name in ("astronaut", "grace_hopper"):
        shutil.copy(sample_path(name), root / "photos" / f"{name}{sample_path(name).suffix}")
    preprocess(root / "photos", root / "data", crop_size=64, progress=False)
    samples = JRDataset(root / "data", seed=0, augment=AugmentConfig.off())
    return root / "data", default_collate([samples[i] for i in range(len(samples))])


@pytest.fixture(scope="module")
def dictionary(two_faces):
    return build_dictionaries_from_shards(two_faces[0], None, num_atoms=2)


def _fused_jr(dictionary: ComponentDictionary) -> JRNet:
    return JRNet(**TINY, **dictionary.fusion_config)


def test_fusion_parameters_train_with_jr_and_the_step_logs_the_match(two_faces, dictionary):
    _, batch = two_faces
    assert batch["landmarks"].shape == (2, 468, 2)
    sfi = tiny_pipeline(seed=0)
    sfi.set_progress_bar_config(disable=True)
    config = JRConfig()
    config.sfi_steps, config.model.dictionary_fraction = 1, 0.5  # 2 of the 4 JR samples
    torch.manual_seed(0)
    jr = _fused_jr(dictionary)
    model = JRTrainable(jr, sfi, config, JRGeneratorLoss(), dictionary=dictionary)
    rows = model.fusion_rows(2, 7)  # one self-swap (rows 0-1), one cross swap (rows 2-3)
    assert torch.equal(rows, model.fusion_rows(2, 7)) and len(rows) == 2
    assert rows[0] < 2 <= rows[1]
    made = model.make_inputs(batch, 0)  # the frozen SFI stage's inputs, made once for speed
    object.__setattr__(model, "make_inputs", lambda b, s: made)
    before = {k: v.detach().clone() for k, v in jr.sft.named_parameters()}
    optimizer = torch.optim.Adam(jr.parameters(), lr=1e-2)
    logs = []
    # the last convolutions start at zero: step 1 moves to_rgb, step 2 the SFT outputs, step 3
    # reaches the SFT bodies
    for step in range(3):
        out = model(batch, torch.tensor(step))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        logs.append({k: float(v.detach()) for k, v in out.items()})
    moved = {k: (v - before[k]).abs().max().item() for k, v in jr.sft.named_parameters()}
    assert all(m > 0 for m in moved.values()), moved
    assert logs[0]["fusion_scale"] == 0.0 and logs[-1]["fusion_scale"] > 0
    assert all(0 <= log["dictionary_distance"] <= 4 for log in logs)
    assert all(np.isfinite(list(log.values())).all() for log in logs)


@pytest.mark.slow
def test_exported_pipeline_carries_the_dictionary_and_fuses_it(dictionary, photos, faces,
                                                                tmp_path):
    sfi = tiny_pipeline(seed=0)
    torch.manual_seed(0)
    jr = _fused_jr(dictionary)
    with torch.no_grad():  # a trained JR: no zero-initialised layer left, fusion visible
        g = torch.Generator().manual_seed(0)
        for p in jr.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    export_with_refiner(sfi, jr, dictionary, tmp_path / "pipeline")
    assert sfi.dictionary is None and sfi.refiner is None  # the SFI pipeline is left as it was
    loaded = DiffSwapIGFIPipeline.from_pretrained(tmp_path / "pipeline")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.dictionary, ComponentDictionary)
    state, again = dictionary.state_dict(), loaded.dictionary.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)

    tgt = photos["astronaut"].rgb
    pairs = [(faces["astronaut"][0], Source(photos["grace_hopper"], faces["grace_hopper"][0]))]

    def swap(pipe):
        return pipe(tgt, pairs, num_inference_steps=1, generator=torch.Generator().manual_seed(0))

    fused = swap(loaded)
    sfi.register_modules(refiner=jr.eval(), dictionary=dictionary)
    sfi.set_progress_bar_config(disable=True)
    in_memory = swap(sfi)
    sfi.register_modules(dictionary=None)
    plain = swap(sfi)
    # the same weights, reloaded: kernels may round differently on a reloaded model's memory
    assert_same_image(fused.images[0], in_memory.images[0])
    changed = np.abs(fused.crops[0].astype(int) - plain.crops[0].astype(int)).max(axis=2)
    assert changed.max() > 2, changed.max()  # the dictionary changes the refined face


def test_dictionary_options_are_checked(tmp_path):
    from diffswap_igfi.errors import ConfigError, ModelNotFoundError
    from diffswap_igfi.jr.training import run_dictionary

    config = JRConfig()
    config.model.dictionary = str(tmp_path)
    with pytest.raises(ConfigError, match="use_dictionary is false"):
        config.validate()
    config.model.use_dictionary = True
    config.validate()
    with pytest.raises(ModelNotFoundError, match="build-dictionaries"):
        run_dictionary(config, tmp_path, tmp_path / "run")
    config.model.dictionary_fraction = 0.0
    with pytest.raises(ConfigError, match="dictionary_fraction"):
        config.validate()
    config.model.use_dictionary = False
    config.model.dictionary = None
    assert run_dictionary(config, tmp_path, tmp_path / "run") is None

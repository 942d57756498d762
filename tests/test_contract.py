"""The engine contract: detection once per process, per-face sources, conditions cached on the
records (a source's identity is computed once however many targets it goes to)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.engines.base import SwapEngine
from diffswap_igfi.engines.factory import EngineOptions, build_engine
from diffswap_igfi.errors import InputError
from diffswap_igfi.faces.landmarker import Landmarker
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.sfi.build import tiny_pipeline


def _fresh(face):
    """A copy of a session FaceRecord with an empty cache, so counts start at zero."""
    return face.transformed(np.array([[1.0, 0, 0], [0, 1.0, 0]]), face.image_size)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def landmarkers(monkeypatch):
    """Counts the MediaPipe landmarker graphs built (every FaceDetector builds one)."""
    built = []
    original = Landmarker.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Landmarker, "__init__", counting)
    return built


class Counting:
    """Wraps a method of an encoder to count its calls."""

    def __init__(self, method):
        self.method, self.calls = method, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.method(*args, **kwargs)


def test_a_sources_identity_is_computed_once_for_a_batch_of_targets(pipe, photos, faces,
                                                                    monkeypatch):
    embed = Counting(pipe.identity_encoder.embed)
    clip = Counting(pipe.clip_encoder.encode_uint8)
    monkeypatch.setattr(pipe.identity_encoder, "embed", embed)
    monkeypatch.setattr(pipe.clip_encoder, "encode_uint8", clip)
    source = Source(photos["grace_hopper"], _fresh(faces["grace_hopper"][0]))
    names = ("astronaut", "group", "tom_hanks")
    targets = {n: [_fresh(f) for f in faces[n]] for n in names}
    n_faces = sum(len(v) for v in targets.values())
    out = pipe([photos[n].rgb for n in names], [[(f, source) for f in targets[n]] for n in names],
               num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator())
    assert len(out.crops) == n_faces == 8
    assert embed.calls == 1  # one source, eight targets
    assert clip.calls == n_faces  # once per target face (its own blanked crop)
    pipe([photos[n].rgb for n in names], [[(f, source) for f in targets[n]] for n in names],
         num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator())
    assert embed.calls == 1 and clip.calls == n_faces  # a second call re-uses the records


def test_each_face_gets_its_own_source(pipe, photos, faces):
    group = [_fresh(f) for f in faces["group"][:2]]
    hopper = Source(photos["grace_hopper"], _fresh(faces["grace_hopper"][0]))
    hanks = Source(photos["tom_hanks"], _fresh(faces["tom_hanks"][0]))

    def run(second):
        return pipe(photos["group"].rgb, [(group[0], hopper), (group[1], second)],
                    num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0)).crops

    same, mixed = run(hopper), run(hanks)
    # the first face's conditions are the same in both runs; rows of a batch do not interact
    # (GroupNorm and attention are per sample), up to float reordering in batched kernels
    assert np.abs(same[0].astype(int) - mixed[0].astype(int)).max() <= 1
    assert np.abs(same[1].astype(int) - mixed[1].astype(int)).max() > 8  # another identity


def test_engines_share_one_contract(pipe, tmp_path, photos, faces):
    pipe.save_pretrained(tmp_path / "ckpt")
    geometric = build_engine(EngineOptions(blend="alpha"))
    diffusion = build_engine(EngineOptions(checkpoint=tmp_path / "ckpt", steps=1, progress=False,
                                           warm_start=0.5, blend="alpha"))
    pairs = [(_fresh(faces["astronaut"][0]),
              Source(photos["grace_hopper"], _fresh(faces["grace_hopper"][0])))]
    target = photos["astronaut"].rgb
    for engine in (geometric, diffusion):
        assert isinstance(engine, SwapEngine)
        image, alpha = engine.swap_pairs(target, pairs)
        assert image.shape == target.shape and np.array_equal(image[alpha == 0],
                                                              target[alpha == 0])
    assert diffusion.warm_engine is not None and diffusion.warm_engine.blend == "alpha"
    # the warm start keeps the target's outline (its masked sampling keeps the surroundings)
    assert diffusion.warm_engine.shape_transfer == 0.0 and geometric.shape_transfer == 1.0
    with pytest.raises(InputError, match="need --engine diffusion"):
        EngineOptions(engine="geometric", warm_start=0.5)
    with pytest.raises(InputError, match="warm-start"):
        EngineOptions(checkpoint=tmp_path / "ckpt", warm_start=1.5)


def test_one_detector_for_a_cli_swap_and_a_batch(tmp_path, landmarkers):
    from diffswap_igfi.cli import main

    out = tmp_path / "out.png"
    assert main(["swap", "-s", "sample:grace_hopper", "sample:tom_hanks", "-t",
                 "sample:astronaut", "-o", str(out), "--quiet"]) == 0
    assert len(landmarkers) == 1
    folder = tmp_path / "targets"
    folder.mkdir()
    for name in ("astronaut", "group"):
        shutil.copy(sample_path(name), folder / sample_path(name).name)
    landmarkers.clear()
    assert main(["swap", "-s", "sample:grace_hopper", "-t", str(folder), "-o",
                 str(tmp_path / "batch"), "--face-selector", "all", "--quiet"]) == 0
    assert len(landmarkers) == 1 and len(list((tmp_path / "batch").iterdir())) == 2


@pytest.mark.slow
def test_one_detector_for_a_diffusion_swap_with_a_mix_source_and_for_eval(pipe, tmp_path,
                                                                          landmarkers):
    from diffswap_igfi.cli import main

    pipe.save_pretrained(tmp_path / "ckpt")
    assert main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o",
                 str(tmp_path / "out.png"), "--checkpoint", str(tmp_path / "ckpt"), "--steps",
                 "1", "--warm-start", "1.0", "--mix-source", "sample:group",
                 "--source-face-index", "0", "--quiet"]) == 0
    assert len(landmarkers) == 1
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as handle:
        csv.writer(handle).writerows([("source", "target"),
                                      ("sample:grace_hopper", "sample:astronaut")])
    landmarkers.clear()
    assert main(["eval", "--pairs", str(pairs), "--out", str(tmp_path / "report"), "--engine",
                 "geometric", "--quiet"]) == 0
    assert len(landmarkers) == 1

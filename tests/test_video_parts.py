"""Video building blocks alone: the one-euro filter, gap bridging, track selection."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from diffswap_igfi.errors import FaceNotFoundError, InputError
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.video.plan import AnalysisChunk, Planner, assign_sources
from diffswap_igfi.video.smoothing import ColourSmoother, OneEuroFilter, OneEuroSettings
from diffswap_igfi.video.tracking import Track


def test_one_euro_steadies_noise_and_follows_motion(rng):
    f = OneEuroFilter(OneEuroSettings(min_cutoff=1.0, beta=1.5))
    still = [f(rng.normal(0, 1.0, 10), t / 25, scale=50.0) for t in range(50)]
    assert np.std(np.diff(still[10:], axis=0)) < 0.5 * np.sqrt(2)  # raw steps: std sqrt(2)
    f = OneEuroFilter(OneEuroSettings(min_cutoff=1.0, beta=1.5))
    ramp = [f(np.full(3, 10.0 * t), t / 25, scale=1.0) for t in range(50)]
    assert abs(ramp[-1][0] - 490.0) < 10.0  # fast motion raises the cut-off: little lag


def test_one_euro_state_round_trip():
    a, b = OneEuroFilter(), OneEuroFilter()
    for t in range(5):
        a(np.array([t, 2.0 * t]), t / 25)
    b.load_state(a.state())
    assert np.array_equal(a(np.array([9.0, 1.0]), 0.3), b(np.array([9.0, 1.0]), 0.3))


def _face(faces, shift: float) -> FaceRecord:
    base = faces["astronaut"][0]
    return base.transformed(np.array([[1.0, 0, shift], [0, 1.0, 0]]), base.image_size)


def test_gap_bridged_by_interpolation_across_chunks(faces):
    # track 0 seen in frames 0-4 and 7-9 (gap 5-6 crosses the chunk boundary at 6)
    obs = [(i, 0, _face(faces, 2.0 * i)) for i in (0, 1, 2, 3, 4, 7, 8, 9)]
    first = AnalysisChunk.build(0, list(range(6)), [o for o in obs if o[0] < 6], {})
    second = AnalysisChunk.build(6, list(range(6, 12)), [o for o in obs if o[0] >= 6], {})
    planner = Planner([0], (512, 512), Fraction(1, 25), max_gap=3,
                      smoothing=OneEuroSettings(min_cutoff=1e6, beta=0.0))  # no smoothing
    plan = {**planner.plan(first, second), **planner.plan(second, None)}
    assert sorted(plan) == list(range(10))  # frames 5 and 6 bridged, 10-11 have no face
    x = {i: plan[i][0][1].points[:, 0].mean() for i in plan}
    base = faces["astronaut"][0].points[:, 0].mean()
    for i in (5, 6):  # linear between frame 4 and frame 7
        assert x[i] - base == pytest.approx(2.0 * i, abs=1e-3)


def test_long_gap_not_bridged(faces):
    obs = [(0, 0, _face(faces, 0)), (9, 0, _face(faces, 0))]
    chunk = AnalysisChunk.build(0, list(range(10)), obs, {})
    plan = Planner([0], (512, 512), Fraction(1, 25), max_gap=3).plan(chunk, None)
    assert sorted(plan) == [0, 9]


def _track(tid, face, area, descriptor=None):
    return Track(tid, face, 0, 0, frames=1, area_sum=area, best=face, descriptor=descriptor)


def test_selection_over_tracks(faces):
    face = faces["astronaut"][0]
    tracks = [_track(0, face, 10.0, np.zeros(3)), _track(1, face, 50.0, np.ones(3)),
              _track(2, face, 30.0, np.full(3, 5.0))]
    src, a, b = (SimpleNamespace(face=face) for _ in range(3))  # choose_source reads .face
    sources = [src]
    pick = lambda **kw: sorted(assign_sources(tracks, sources, **kw).sources)
    assert pick(selector="largest") == [1]
    assert pick(selector="all") == [0, 1, 2]
    assert pick(selector="index", index=2) == [0]
    assert pick(selector="reference", reference=np.full(3, 0.1)) == [0]
    mapped = assign_sources(tracks, sources, selector="largest",
                            face_map=[(np.full(3, 5.0), [b]), (np.ones(3), [a])])
    assert mapped.sources == {1: a, 2: b}
    with pytest.raises(InputError):
        assign_sources(tracks, sources, selector="index", index=3)
    with pytest.raises(FaceNotFoundError):
        assign_sources([], sources, selector="largest")


def test_colour_smoother_keeps_unmasked_pixels(rng):
    smoother = ColourSmoother(rate=0.3)
    target = rng.integers(0, 255, (40, 40, 3), np.uint8)
    alpha = np.zeros((40, 40), np.float32)
    alpha[10:30, 10:30] = 1.0
    alpha[8:10, 10:30] = 0.5
    first = np.clip(target.astype(int) + 20, 0, 255).astype(np.uint8)
    smoother(0, first, target, alpha)
    brighter = np.clip(target.astype(int) + 40, 0, 255).astype(np.uint8)
    out = smoother(0, brighter, target, alpha)
    outside = alpha == 0
    assert np.array_equal(out[outside], brighter[outside])
    # the jump of +20 in the offset is let through at the rate, not at once
    gained = out[alpha == 1].astype(float).mean() - target[alpha == 1].astype(float).mean()
    assert 20 < gained < 35

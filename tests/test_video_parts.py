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


def test_local_fit_follows_quadratic_motion_and_averages_noise(rng):
    """A centred quadratic fit is exact on a steadily accelerating face (no lag, unlike a
    causal filter) and spreads detector noise over the window."""
    from diffswap_igfi.video.smoothing import local_fit

    def at(f):
        return np.array([[3.0 + 2.0 * f + 0.25 * f * f, -1.0 * f]])

    obs = [(f, f / 25, at(f)) for f in range(0, 13, 2)]
    # exact by construction up to float rounding of a 3-term least-squares solve
    assert np.allclose(local_fit(obs, 7, 7 / 25, 6), at(7), atol=1e-3)
    assert np.allclose(local_fit(obs[:1], 0, 0.0, 6), at(0))
    noisy = [(f, f / 25, rng.normal(0.0, 1.0, (50, 2))) for f in range(-6, 7)]
    smoothed = local_fit(noisy, 0, 0.0, 6)
    assert smoothed.std() < 0.75  # one sample: std 1


def test_mark_anchors_follow_the_face_between_detections(monkeypatch):
    """Between re-detections the reader's keypoints are carried in the face's own aligned
    frame: on a face that moves rigidly (zoom, turn, pan) they stay exactly where a reader
    finds them, with one detection every ``every`` frames."""
    from diffswap_igfi.video import anchor

    base = np.array([[40.0, 50.0], [72.0, 50.0], [56.0, 66.0], [44.0, 80.0], [68.0, 80.0]])
    offset = np.array([[1.5, -0.5], [0.5, -1.0], [0.0, 1.0], [-1.0, 0.5], [1.0, 0.0]])
    calls = []
    truth = {}

    def reader_kps(rgb, kps, detector):  # the swapped face sits ``offset`` off, moving along
        calls.append(1)
        return truth["found"]

    monkeypatch.setattr(anchor.face_mark, "reader_kps", reader_kps)
    anchors = anchor.MarkAnchors(detector=None, every=4)
    for i in range(7):
        s, a = 2.0 + 0.1 * i, 0.05 * i
        rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        kps = base @ rot.T + (100.0 + 3 * i, 120.0)
        truth["found"] = (base + offset) @ rot.T + (100.0 + 3 * i, 120.0)
        got = anchors(i, np.zeros((400, 400, 3), np.uint8), 0, kps)
        # float64 round trips through two similarity fits
        assert np.allclose(got, truth["found"], atol=1e-6)
    assert len(calls) == 2  # frames 0 and 4
    restored = anchor.MarkAnchors(detector=None, every=4)
    restored.load_state(anchors.state())
    assert np.array_equal(restored(5, None, 0, kps), anchors(5, None, 0, kps))


def test_pipeline_stages_keep_order_and_raise_errors():
    from diffswap_igfi.video.pipeline import Worker, prefetch

    assert list(prefetch(lambda: iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise InputError("bad frame")

    with pytest.raises(InputError, match="bad frame"):
        list(prefetch(broken))
    seen = []
    worker = Worker(seen.append, depth=2)
    for i in range(20):
        worker.put(i)
    worker.finish()
    assert seen == list(range(20))

    def fail(item):
        raise InputError(f"cannot encode {item}")

    worker = Worker(fail)
    with pytest.raises(InputError, match="cannot encode"):
        for i in range(100):
            worker.put(i)
        worker.finish()


def _moving_face(base: np.ndarray, frames: int, hz: float, amp_iod: float) -> np.ndarray:
    """[frames,478,3] the landmarks ``base`` under a smooth camera-like affine path (pan, zoom,
    rotation), with the mouth opening and closing at ``hz`` (the points below the inner lips'
    midline move down by up to ``amp_iod`` eye distances)."""
    from diffswap_igfi.faces import topology

    iod = np.linalg.norm(base[topology.RIGHT_IRIS_CENTER, :2] - base[topology.LEFT_IRIS_CENTER, :2])
    mouth = (base[topology.UPPER_LIP_INNER, 1] + base[topology.LOWER_LIP_INNER, 1]) / 2
    lower = base[:, 1] > mouth
    centre = base[:, :2].mean(axis=0)
    out = np.empty((frames, *base.shape))
    for f in range(frames):
        t = f / 25
        shape = base.astype(np.float64).copy()
        shape[lower, 1] += amp_iod * iod * (1 - np.cos(2 * np.pi * hz * t)) / 2
        angle, zoom = np.deg2rad(4.0 * np.sin(1.3 * t)), 1.0 + 0.15 * t
        rot = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        xy = (shape[:, :2] - centre) @ rot.T + centre + (30.0 * t, 10.0 * np.sin(2.0 * t))
        out[f] = np.concatenate([xy, shape[:, 2:] * zoom], axis=1)
    return out


def _opening(landmarks: np.ndarray) -> float:
    from diffswap_igfi.faces import topology

    lm = np.asarray(landmarks, np.float64)
    iod = np.linalg.norm(lm[topology.RIGHT_IRIS_CENTER, :2] - lm[topology.LEFT_IRIS_CENTER, :2])
    return float(np.linalg.norm(lm[topology.LOWER_LIP_INNER, :2]
                                - lm[topology.UPPER_LIP_INNER, :2]) / iod)


def _planned_noisy_face(faces, window, expression_window):
    """(truth, planned) [48,478,3] for a face measured every 2nd frame (and the last), as the
    tracker does, with landmarker-like noise: the whole mesh shifted by ~0.4 px and each point
    by ~0.4 px more."""
    truth = _moving_face(faces["astronaut"][0].landmarks, 48, hz=2.0, amp_iod=0.3)
    noise = np.random.default_rng(7)
    seen = truth + noise.normal(0, 0.4, (48, 1, 3)) + noise.normal(0, 0.4, truth.shape)
    seen[..., 2] = truth[..., 2]  # depth: left exact
    obs = [(f, 0, FaceRecord(seen[f].astype(np.float32), (720, 1280)))
           for f in [*range(0, 48, 2), 47]]
    chunk = AnalysisChunk.build(0, list(range(48)), obs, {})
    planner = Planner([0], (720, 1280), Fraction(1, 25), window=window,
                      expression_window=expression_window)
    plan = planner.plan(chunk, None)
    assert sorted(plan) == list(range(48))
    return truth, seen, np.stack([plan[f][0][1].landmarks for f in range(48)]).astype(float)


def _placement_figures(truth, got):
    """(RMS distance to the truth, RMS frame-to-frame motion of the error, both in px, and
    the share of the mouth's opening amplitude kept) over frames 8-39 (fits away from the
    clip's ends)."""
    inner = slice(8, 40)
    error = np.sqrt(np.mean(np.sum((got - truth)[inner, :, :2] ** 2, axis=-1)))
    steps = np.linalg.norm(np.diff(got - truth, axis=0)[inner, :, :2], axis=-1)
    want = np.array([_opening(t) for t in truth[inner]])
    kept = np.array([_opening(g) for g in got[inner]])
    return error, np.sqrt(np.mean(steps ** 2)), np.std(kept) / np.std(want)


def test_landmark_smoothing_steadies_noise_and_keeps_motion_and_expressions(faces):
    """The default smoothing (the head's motion over 8 frames either side, the face's own
    over 4; smoothing.rigid_local_fit) against the observations and against the causal
    one-euro filter, on a face moving like a handheld camera's subject whose mouth opens
    twice a second: nearer the truth than the observations, frame-to-frame noise cut to under
    0.4x, the mouth's amplitude kept within 15%; and better than the one-euro filter on all
    three (which lags the motion and blunts the mouth)."""
    truth, seen, planned = _planned_noisy_face(faces, 8, 4)
    _, _, causal = _planned_noisy_face(faces, 0, None)
    error, steps, amplitude = _placement_figures(truth, planned)
    error_1e, steps_1e, amplitude_1e = _placement_figures(truth, causal)
    observed = seen[8:40:2, :, :2] - truth[8:40:2, :, :2]
    raw_error = np.sqrt(np.mean(np.sum(observed ** 2, axis=-1)))
    raw_steps = np.sqrt(np.mean(np.sum(np.diff(observed, axis=0) ** 2, axis=-1)))
    figures = (f"error {error:.2f} px (observations {raw_error:.2f}, one-euro {error_1e:.2f}), "
               f"frame-to-frame {steps:.2f} px (observations {raw_steps:.2f}, one-euro "
               f"{steps_1e:.2f}), mouth amplitude {amplitude:.2f} (one-euro {amplitude_1e:.2f})")
    assert error < raw_error, figures
    assert steps < 0.4 * raw_steps, figures
    assert 0.85 < amplitude < 1.15, figures
    assert error < error_1e and steps < steps_1e and amplitude > amplitude_1e, figures

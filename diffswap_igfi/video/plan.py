"""From tracked observations to the faces each frame swaps: track selection, one source per
track, short gaps bridged, landmarks smoothed.

Analysis chunks (one ``.npz`` per chunk of frames, written by the tracking pass) hold every
observation: frame index, track id, landmarks, transform, blendshapes. :class:`Planner` walks
them in order with one chunk of look-ahead (enough to bridge any gap up to ``max_gap`` frames,
which never exceeds a chunk), so memory stays bounded whatever the video's length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import FaceNotFoundError, InputError
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.swapper import Source, choose_source
from diffswap_igfi.video.smoothing import (
    OneEuroFilter,
    OneEuroSettings,
    expression_points,
    local_fit,
    rigid_local_fit,
    split_motion,
)
from diffswap_igfi.video.tracking import Track


@dataclass
class AnalysisChunk:
    """Observations of one chunk. pts: [F] int64 of its frames (input time base), first: kept
    index of its first frame; obs_*: [M] per observation (frame is a kept index)."""

    first: int
    pts: np.ndarray
    obs_frame: np.ndarray
    obs_track: np.ndarray
    obs_landmarks: np.ndarray  # [M,478,3] float32
    obs_transform: np.ndarray  # [M,4,4] float32, NaN when absent
    obs_blendshapes: np.ndarray  # [M,52] float32, NaN when absent
    names: tuple[str, ...] = ()
    tracker_state: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, first=self.first, pts=self.pts, obs_frame=self.obs_frame,
                 obs_track=self.obs_track, obs_landmarks=self.obs_landmarks,
                 obs_transform=self.obs_transform, obs_blendshapes=self.obs_blendshapes,
                 names=np.array(json.dumps(list(self.names))),
                 tracker_state=np.array(json.dumps(self.tracker_state)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> AnalysisChunk:
        with np.load(path, allow_pickle=False) as z:
            return cls(int(z["first"]), z["pts"], z["obs_frame"], z["obs_track"],
                       z["obs_landmarks"], z["obs_transform"], z["obs_blendshapes"],
                       tuple(json.loads(str(z["names"]))),
                       json.loads(str(z["tracker_state"])))

    @classmethod
    def build(cls, first: int, pts: Sequence[int], observations, tracker_state: dict
              ) -> AnalysisChunk:
        """observations: (kept frame index, track id, FaceRecord) triples."""
        m = len(observations)
        lm = np.zeros((m, 478, 3), np.float32)
        tf = np.full((m, 4, 4), np.nan, np.float32)
        bs = np.full((m, 52), np.nan, np.float32)
        names: tuple[str, ...] = ()
        for k, (_, _, face) in enumerate(observations):
            lm[k] = face.landmarks
            if face.transform is not None:
                tf[k] = face.transform
            if face.blendshapes is not None and len(face.blendshapes) == 52:
                bs[k] = face.blendshapes
                names = face.blendshape_names
        return cls(first, np.asarray(pts, np.int64),
                   np.array([o[0] for o in observations], np.int64),
                   np.array([o[1] for o in observations], np.int64), lm, tf, bs, names,
                   tracker_state)

    def face(self, k: int, size: tuple[int, int], landmarks: np.ndarray | None = None
             ) -> FaceRecord:
        tf = self.obs_transform[k]
        bs = self.obs_blendshapes[k]
        return FaceRecord(self.obs_landmarks[k] if landmarks is None else landmarks, size,
                          None if np.isnan(bs).any() else bs, self.names if self.names else (),
                          None if np.isnan(tf).any() else tf)


@dataclass
class Assignment:
    """The tracks to swap and the source of each."""

    sources: dict[int, Source]

    def describe(self) -> str:
        return ", ".join(f"track {t}" for t in sorted(self.sources)) or "none"


def assign_sources(tracks: Sequence[Track], sources: Sequence[Source], *, selector: str,
                   index: int = 0, reference: np.ndarray | None = None,
                   reference_distance: float = 0.6,
                   face_map: Sequence[tuple[np.ndarray, Sequence[Source]]] = (),
                   what: str = "the video") -> Assignment:
    """Face selection over the whole video, on tracks instead of faces.

    largest: the most prominent track (largest summed face area over the frames it appears
    in); index: tracks numbered by that prominence, 0 first; all; reference: every track whose
    descriptor lies within ``reference_distance`` of ``reference`` ([D]). face_map: (reference
    descriptor, sources) pairs: each track takes the sources of its nearest reference within
    ``reference_distance`` (several people, several sources); tracks near none are left alone.
    Each chosen track's source is picked once, by ``choose_source`` on its largest face.
    """
    if not tracks:
        raise FaceNotFoundError(f"no face found in any frame of {what}: use a video with a "
                                f"clearly visible face")
    ranked = sorted(tracks, key=lambda t: t.area_sum, reverse=True)
    chosen: dict[int, Source] = {}
    if face_map:
        for track in ranked:
            if track.descriptor is None:
                continue
            dists = [float(np.linalg.norm(track.descriptor - ref)) for ref, _ in face_map]
            best = int(np.argmin(dists))
            if dists[best] < reference_distance:
                chosen[track.id] = choose_source(track.best, face_map[best][1])
        if not chosen:
            raise FaceNotFoundError(f"no person in {what} matches any --map-faces reference "
                                    f"(threshold {reference_distance}): use other reference "
                                    f"photos or raise --reference-distance")
        return Assignment(chosen)
    if selector == "largest":
        picked = ranked[:1]
    elif selector == "all":
        picked = ranked
    elif selector == "index":
        if not 0 <= index < len(ranked):
            raise InputError(f"--face-index {index} is out of range: {what} has {len(ranked)} "
                             f"tracked person(s), numbered 0..{len(ranked) - 1} by prominence")
        picked = [ranked[index]]
    elif selector == "reference":
        if reference is None:
            raise ValueError("reference selection needs a reference descriptor")
        dists = {t.id: float(np.linalg.norm(t.descriptor - reference)) for t in ranked
                 if t.descriptor is not None}
        picked = [t for t in ranked if dists.get(t.id, np.inf) < reference_distance]
        if not picked:
            closest = min(dists.values(), default=float("nan"))
            raise FaceNotFoundError(f"no person in {what} matches the reference face (closest "
                                    f"distance {closest:.2f}, threshold {reference_distance}): "
                                    f"use another reference photo or raise "
                                    f"--reference-distance")
    else:
        raise ValueError(f"unknown face selector {selector!r}")
    return Assignment({t.id: choose_source(t.best, sources) for t in picked})


class Planner:
    """Turns analysis chunks into per-frame (track, smoothed face) lists for selected tracks.

    Call :meth:`plan` on chunks in order (each with the next one, or None at the end). A track
    missing for at most ``max_gap`` frames between two observations gets linearly interpolated
    landmarks in the gap (bridged, not flickered); longer gaps are left unswapped.

    Smoothing: with ``window`` > 0 (at most a chunk), each frame's landmarks are a local
    quadratic fit in time (LOESS: tricube weights) over the track's observations within
    ``window`` frames on either side, evaluated at the frame's time (smoothing.local_fit):
    the video is known in advance, so the smoother can look both ways, and a centred fit
    follows a moving face without the lag any causal filter has (lag against a moving camera
    is itself jitter once the motion changes). With ``expression_window`` too (the video
    job's default), the head's motion and the face's own are fitted apart, the latter over
    that shorter window for the points expressions move (smoothing.rigid_local_fit). With
    ``window`` 0, the causal one-euro filter (``smoothing``).
    """

    def __init__(self, selected: Sequence[int], size: tuple[int, int], time_base: Fraction, *,
                 max_gap: int = 8, smoothing: OneEuroSettings | None = None,
                 window: int = 0, expression_window: int | None = None) -> None:
        self.selected = set(selected)
        self.size = size
        self.time_base = time_base
        self.max_gap = max_gap
        self.window = window
        self.expression_window = expression_window
        # per point, the frames either side its own motion is fitted over (rigid_local_fit)
        self.part_window = None if expression_window is None else np.where(
            expression_points(), min(expression_window, window), window)
        self.splits: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.filters = {t: OneEuroFilter(smoothing) for t in self.selected}
        self.last_seen: dict[int, tuple[int, np.ndarray, int, AnalysisChunk]] = {}
        # per track: (frame, seconds, [478,3] landmarks) observed in the previous chunk's last
        # ``window`` frames (the part of the past a fit still reaches)
        self.history: dict[int, list[tuple[int, float, np.ndarray]]] = {}

    def plan(self, chunk: AnalysisChunk, following: AnalysisChunk | None
             ) -> dict[int, list[tuple[int, FaceRecord]]]:
        """{kept frame index: [(track id, smoothed face), ...]} for the frames of ``chunk``."""
        out: dict[int, list[tuple[int, FaceRecord]]] = {}
        by_frame: dict[int, dict[int, int]] = {}
        for k, (f, t) in enumerate(zip(chunk.obs_frame, chunk.obs_track)):
            if int(t) in self.selected:
                by_frame.setdefault(int(f), {})[int(t)] = k
        nearby = self._nearby(chunk, following) if self.window > 0 else {}
        # observations a fit for this chunk may use start at most ``window`` frames back
        self.splits = {key: v for key, v in self.splits.items()
                       if key[1] >= chunk.first - self.window}
        for offset, pts in enumerate(chunk.pts):
            frame = chunk.first + offset
            when = float(int(pts) * self.time_base)
            faces = []
            seen = by_frame.get(frame, {})
            for track in sorted(self.selected):
                if track in seen:
                    k = seen[track]
                    raw = chunk.obs_landmarks[k]
                    self.last_seen[track] = (frame, raw, k, chunk)
                    faces.append((track, self._smooth(track, raw, when, chunk, k, frame,
                                                      nearby)))
                    continue
                bridged = self._bridge(track, frame, chunk, following)
                if bridged is not None:
                    raw, k, src = bridged
                    faces.append((track, self._smooth(track, raw, when, src, k, frame,
                                                      nearby)))
            if faces:
                out[frame] = faces
        if self.window > 0:
            end = chunk.first + len(chunk.pts)
            self.history = {t: [o for o in obs if end - self.window <= o[0] < end]
                            for t, obs in nearby.items()}
        return out

    def _nearby(self, chunk: AnalysisChunk, following: AnalysisChunk | None
                ) -> dict[int, list[tuple[int, float, np.ndarray]]]:
        """Per selected track, its observations a fit for this chunk's frames may use: the
        previous chunk's tail, this chunk, and the following chunk's first ``window`` frames,
        in frame order."""
        out = {t: list(self.history.get(t, [])) for t in self.selected}
        end = chunk.first + len(chunk.pts) + self.window
        for c in (chunk, following):
            if c is None:
                continue
            for k, (f, t) in enumerate(zip(c.obs_frame, c.obs_track)):
                f, t = int(f), int(t)
                if t in out and f < end:
                    when = float(int(c.pts[f - c.first]) * self.time_base)
                    out[t].append((f, when, c.obs_landmarks[k]))
        return out

    def _smooth(self, track: int, raw: np.ndarray, when: float, chunk: AnalysisChunk, k: int,
                frame: int, nearby: dict) -> FaceRecord:
        if self.window > 0:
            near = [o for o in nearby.get(track, ()) if abs(o[0] - frame) <= self.window]
            if near and self.part_window is not None:
                splits = [(f, t, *self._split(track, f, lm)) for f, t, lm in near]
                return chunk.face(k, self.size, rigid_local_fit(splits, frame, when,
                                                                self.window, self.part_window))
            if near:
                return chunk.face(k, self.size, local_fit(near, frame, when, self.window))
            return chunk.face(k, self.size, raw)
        face = chunk.face(k, self.size, raw)
        smoothed = self.filters[track](raw, when, scale=max(face.interocular, 1.0))
        return chunk.face(k, self.size, smoothed)

    def _split(self, track: int, frame: int, landmarks: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """split_motion of one observation, computed once (each is used by every frame within
        ``window`` of it)."""
        key = (track, frame)
        if key not in self.splits:
            self.splits[key] = split_motion(landmarks)
        return self.splits[key]

    def _bridge(self, track: int, frame: int, chunk: AnalysisChunk,
                following: AnalysisChunk | None) -> tuple[np.ndarray, int, AnalysisChunk] | None:
        last = self.last_seen.get(track)
        if last is None or frame - last[0] > self.max_gap:
            return None
        nxt = _next_observation(track, frame, chunk, following)
        if nxt is None or nxt[0] - last[0] > self.max_gap + 1:
            return None
        f0, lm0, k0, c0 = last
        f1, lm1 = nxt[0], nxt[1]
        w = (frame - f0) / (f1 - f0)
        return ((1 - w) * lm0 + w * lm1).astype(np.float32), k0, c0


def _next_observation(track: int, frame: int, chunk: AnalysisChunk,
                      following: AnalysisChunk | None) -> tuple[int, np.ndarray] | None:
    for c in (chunk, following):
        if c is None:
            continue
        hits = np.nonzero((c.obs_track == track) & (c.obs_frame > frame))[0]
        if len(hits):
            k = hits[np.argmin(c.obs_frame[hits])]
            return int(c.obs_frame[k]), c.obs_landmarks[k]
    return None

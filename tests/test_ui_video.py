"""The web UI's Video tab without a server: limits, the frame preview, people numbered as the
swap numbers them, the swap through the video module (frames, audio, provenance) and progress.

Clips are made here from shipped photos (video/synthetic.py): 12 frames, an AAC sine track.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_one_line

from diffswap_igfi.errors import InputError
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.io.video import iter_frames, probe_video
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
from diffswap_igfi.provenance.verify_video import VideoVerifyReport
from diffswap_igfi.ui.service import SwapOptions, SwapService, verify
from diffswap_igfi.ui.video import (
    FrameRate,
    VideoOptions,
    check_video,
    find_people,
    preview_frame,
    swap_video_file,
)
from diffswap_igfi.video.synthetic import camera_path, render_frames, write_test_video

HOPPER = str(sample_path("grace_hopper"))
N = 12


@pytest.fixture(scope="module")
def two_people(tmp_path_factory, photos):
    """256x192 clip, 12 frames: the astronaut (left, smaller face) beside Grace Hopper (right,
    larger face), each under its own moving camera; an AAC tone."""
    a, g = photos["astronaut"].rgb, photos["grace_hopper"].rgb
    left = render_frames(a, camera_path(N, a.shape[:2], (192, 128), center=(230.0, 150.0),
                                        cover=1.2), (192, 128))
    right = render_frames(g, camera_path(N, g.shape[:2], (192, 128), center=(270.0, 250.0),
                                         cover=1.6), (192, 128))
    frames = [np.concatenate([x, y], 1) for x, y in zip(left, right)]
    return write_test_video(tmp_path_factory.mktemp("clip") / "two.mp4", frames)


def _audio_packets(path) -> list[bytes]:
    import av

    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.size]


def _frames(path) -> list[np.ndarray]:
    return [f.rgb for f in iter_frames(probe_video(path))]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * math.log10(255**2 / max(err, 1e-9))


def _region(box, shape):
    x0, y0, x1, y1 = (round(v) for v in box)
    return slice(max(0, y0), min(shape[0], y1)), slice(max(0, x0), min(shape[1], x1))


@pytest.fixture(scope="module")
def people(service, two_people):
    return find_people(service, str(two_people))


def test_people_are_numbered_by_prominence_and_shown_on_the_preview(service, two_people,
                                                                    people):
    assert sorted(people.rank.values()) == [0, 1]
    assert len(people.seen) == N and len(people.thumbnails) == 2
    assert all(t.shape == (160, 160, 3) and t.dtype == np.uint8 for t in people.thumbnails)
    first = next(iter(people.seen.values()))
    boxes = dict(first)
    assert boxes[0][0] > 128 > boxes[1][2]  # #0 is Grace Hopper (right), #1 the astronaut
    shown, caption = preview_frame(service, str(two_people), 0.2, people)
    plain = _frames(two_people)[5]  # 0.2 s at 25 fps
    assert shown.shape == plain.shape and "2 of the video's 2 people" in caption
    boxed = np.any(shown != plain, axis=2)
    for _, box in people.seen[sorted(people.seen)[5]]:  # a box around each person there
        rows, cols = _region(box, plain.shape)
        assert boxed[rows, cols].any() and not boxed[rows, cols].all()
    _, caption = preview_frame(service, str(two_people), 0.2)
    assert caption.startswith("0.20 s: 2 face(s) on this frame")


def test_index_swaps_the_person_the_preview_numbers(service, session, two_people, people):
    """The preview's numbers come from the swap's own tracker: #1 (the astronaut) changes,
    #0 stays as it was (up to the re-encoding)."""
    calls = []
    done = swap_video_file(service, session, [HOPPER], str(two_people),
                           VideoOptions(face_selector="index", face_index=1),
                           report=lambda f, text: calls.append((f, text)))
    assert done.path.parent == session.folder and done.path.suffix == ".mp4"
    assert done.run.frames == N and done.run.tracks == 2 and len(done.run.swapped_tracks) == 1
    before, after = _frames(two_people), _frames(done.path)
    assert len(after) == len(before) == N
    for i, pts in enumerate(sorted(people.seen)):
        boxes = dict(people.seen[pts])
        kept = _region(boxes[0], before[i].shape)
        changed = _region(boxes[1], before[i].shape)
        # H.264 at crf 12 in, crf 18 out: only encoder noise on the face not swapped
        # (measured 31.6-34.6 dB on this detailed face), a new face on the other (14.6-16.4)
        assert _psnr(before[i][kept], after[i][kept]) > 28, i
        assert _psnr(before[i][changed], after[i][changed]) < 22, i
    assert _audio_packets(done.path) == _audio_packets(two_people)  # copied bit for bit
    report = done.report
    assert report.path.name == done.path.name and report.synthetic
    # (the watermark of a face this small, ~55 px wide, is not detectable after H.264: the
    # server test checks it on a larger face)
    assert report.metadata.synthetic
    assert report.lines()[0].endswith("SYNTHETIC (marked as made or altered by a generator)")
    assert any("C2PA manifest: signature valid" in line for line in report.lines())
    assert report.metadata.digital_source_type == COMPOSITE_SYNTHETIC
    # progress: both passes, with a frame rate and the time left, ending at the last frame
    stages = [text.split(":")[0] for _, text in calls]
    assert "tracking" in stages and "swapping" in stages
    assert any(f == 1.0 and text.startswith(f"swapping: frame {N} of {N}, ")
               and " fps, " in text and text.endswith(" left") for f, text in calls)


def test_frame_rate_and_time_left_from_progress_calls():
    now = [0.0]
    seen = []
    rate = FrameRate(lambda f, text: seen.append((f, text)), every=0.0, clock=lambda: now[0])
    rate("tracking", 0, 100)
    now[0] = 2.0
    rate("tracking", 50, 100)
    now[0] = 3.0
    rate("swapping", 10, 100)  # a resumed pass: counts from where it starts
    now[0] = 8.0
    rate("swapping", 30, 100)
    assert seen[0] == (0.0, "tracking: frame 0 of 100, 0.0 fps, ? left")
    assert seen[1] == (0.5, "tracking: frame 50 of 100, 25.0 fps, 0:02 left")
    assert seen[3] == (0.3, "swapping: frame 30 of 100, 4.0 fps, 0:17 left")
    quiet = []
    throttled = FrameRate(lambda f, text: quiet.append(f), every=1.0, clock=lambda: now[0])
    for done in range(1, 11):  # within one second: the first call and the last frame only
        throttled("swapping", done, 10)
    assert quiet == [0.1, 1.0]


def test_limits_and_bad_options_are_one_line_errors(tmp_path, two_people, session):
    small = SwapService(tmp_path, max_video_frames=N - 1, max_video_seconds=100)
    short = SwapService(tmp_path, max_video_seconds=0.2)
    tiny = SwapService(tmp_path, max_pixels=256 * 191)
    try:
        for svc, words in ((small, "--max-video-frames"), (short, "--max-video-seconds"),
                           (tiny, "--max-pixels")):
            with pytest.raises(InputError) as err:
                check_video(svc, str(two_people))
            assert words in str(err.value) and "two.mp4" in str(err.value)
            assert_one_line(str(err.value))
        with pytest.raises(InputError, match="--max-video-frames"):  # before any swap work
            swap_video_file(small, session, [HOPPER], str(two_people), VideoOptions())
        cases = [
            (VideoOptions(face_selector="picked"), [HOPPER], None, "unknown face selector"),
            (VideoOptions(trim_start=1.0, trim_end=0.5), [HOPPER], None, "must be after"),
            (VideoOptions(crf=60), [HOPPER], None, "crf"),
            (VideoOptions(engine=SwapOptions(engine="magic")), [HOPPER], None, "unknown engine"),
            (VideoOptions(face_selector="reference"), [HOPPER], None, "reference photo"),
            (VideoOptions(), [], None, "no source photo"),
            (VideoOptions(), [HOPPER], "", "no video given"),
        ]
        for options, sources, video, words in cases:
            with pytest.raises(InputError) as err:
                swap_video_file(small, session, sources,
                                str(two_people) if video is None else video, options)
            assert words in str(err.value)
            assert_one_line(str(err.value))
        assert not list(session.folder.iterdir())  # nothing written by a refused request
    finally:
        for svc in (small, short, tiny):
            svc.close()


def test_verify_of_a_video_reads_its_marks_under_its_own_name(two_people):
    report = verify(two_people, "clip.mp4")
    assert isinstance(report, VideoVerifyReport) and report.path.name == "clip.mp4"
    assert not report.synthetic and report.total_frames == N

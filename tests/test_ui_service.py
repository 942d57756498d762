"""The web UI's work without a server: face picking, options, errors, session clean-up, and the
host guard of ``diffswap-igfi ui``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line

from diffswap_igfi.errors import AmbiguousFaceError, DiffSwapError, InputError, ModelNotFoundError
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
from diffswap_igfi.ui.server import (
    PID_FILE,
    ROOT_PREFIX,
    add_ui_arguments,
    check_host,
    is_loopback,
    remove_stale_roots,
)
from diffswap_igfi.ui.service import Session, SwapOptions, SwapService, parse_indices, thumbnail


HOPPER, ASTRONAUT, GROUP = (str(sample_path(n)) for n in ("grace_hopper", "astronaut", "group"))


def _inside(box, shape):
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return slice(max(0, y0), min(shape[0], y1)), slice(max(0, x0), min(shape[1], x1))


def test_picked_faces_are_swapped_and_the_others_are_left_bit_for_bit(service, session):
    found, thumbs = service.detect(GROUP)
    assert len(found.faces) == len(thumbs) >= 4
    assert all(t.shape == (160, 160, 3) and t.dtype == np.uint8 for t, _ in thumbs)
    assert thumbs[0][1] == "0 (largest)"
    done = service.swap(session, [HOPPER], GROUP,
                        SwapOptions(face_selector="picked", face_indices=(3, 1)),
                        detected=found)
    assert done.faces == 2 and done.path.parent == session.folder
    assert done.report.synthetic and done.report.watermark.found
    assert done.report.metadata.digital_source_type == COMPOSITE_SYNTHETIC
    written, target = load_image(done.path).rgb, load_image(GROUP).rgb
    for i, face in enumerate(found.faces[:4]):
        region = _inside(face.box, target.shape)
        same = np.array_equal(written[region], target[region])
        # PNG is lossless and the engine leaves pixels outside its mask exactly as they were
        assert same == (i not in (1, 3)), f"face {i}"


def test_a_face_number_out_of_range_is_one_line_naming_the_count(service, session):
    found, _ = service.detect(ASTRONAUT)
    with pytest.raises(AmbiguousFaceError) as err:
        service.swap(session, [HOPPER], ASTRONAUT,
                     SwapOptions(face_selector="picked", face_indices=(5,)), detected=found)
    assert_one_line(str(err.value))
    assert "1 face(s)" in str(err.value)


@pytest.mark.parametrize("options, sources, message", [
    (SwapOptions(), [], "no source photo"),
    (SwapOptions(face_selector="picked"), [HOPPER], "no face picked"),
    (SwapOptions(face_selector="reference"), [HOPPER], "reference photo"),
    (SwapOptions(engine="diffusion", warm_start=1.5), [HOPPER], "warm start"),
    (SwapOptions(output_format="gif"), [HOPPER], "output format"),
])
def test_bad_requests_fail_before_any_work_with_one_line(service, session, options, sources,
                                                         message):
    with pytest.raises(InputError, match=message) as err:
        service.swap(session, sources, ASTRONAUT, options)
    assert_one_line(str(err.value))
    assert not any(session.folder.iterdir())


def test_diffusion_without_a_checkpoint_says_how_to_get_one(service, session):
    with pytest.raises(ModelNotFoundError, match="checkpoint") as err:
        service.swap(session, [HOPPER], ASTRONAUT, SwapOptions(engine="diffusion"))
    assert_one_line(str(err.value))


def test_a_file_that_is_not_an_image_is_refused_in_one_line(service, session, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a photo")
    with pytest.raises(DiffSwapError, match="not an image") as err:
        service.swap(session, [HOPPER], str(bad), SwapOptions())
    assert_one_line(str(err.value))


def test_ui_sliders_arrive_as_floats_and_are_normalised():
    options = SwapOptions(steps=12.0, seed=3.0, warm_start=0.0)
    assert options.steps == 12 and isinstance(options.steps, int) and options.seed == 3
    assert options.warm_start is None  # 0 on the slider means off
    assert parse_indices("3, 1;2") == (3, 1, 2) and parse_indices(None) == ()
    with pytest.raises(InputError):
        parse_indices("one")


def test_closing_a_session_removes_its_results_and_uploads_but_nothing_else(tmp_path):
    upload_dir = tmp_path / "gradio" / "0123abcd"
    upload_dir.mkdir(parents=True)
    upload = upload_dir / "photo.png"
    upload.write_bytes(b"x")
    users_own = tmp_path / "mine.png"  # an in-process caller's photo, outside the upload folder
    users_own.write_bytes(b"z")
    session = Session(tmp_path / "session", upload_root=tmp_path / "gradio")
    session.folder.mkdir()
    (session.next_path("my photo!", "png")).write_bytes(b"y")
    assert [p.name for p in session.folder.iterdir()] == ["my_photo__swapped_1.png"]
    session.uploads.update({str(upload), str(users_own)})
    session.close()
    assert not session.folder.exists() and not upload.exists() and not upload_dir.exists()
    assert users_own.read_bytes() == b"z"


def test_an_upload_another_live_session_uses_is_kept_until_that_one_ends(tmp_path):
    uploads = tmp_path / "gradio"
    service = SwapService(tmp_path / "sessions", upload_root=uploads)
    (tmp_path / "sessions").mkdir()
    shared = uploads / "same-content-hash" / "photo.png"  # Gradio stores equal uploads once
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"x")
    a, b = service.new_session("tab-a"), service.new_session("tab-b")
    a.uploads.add(str(shared))
    b.uploads.add(str(shared))
    service.end_session("tab-a")
    assert not a.folder.exists() and shared.exists() and b.folder.exists()
    service.end_session("tab-b")
    assert not b.folder.exists() and not shared.exists()
    service.end_session("tab-b")  # ending twice is harmless


def test_a_session_without_an_upload_folder_deletes_no_input(service, session):
    service.swap(session, [HOPPER], ASTRONAUT, SwapOptions())
    assert session.uploads == {HOPPER, ASTRONAUT}
    session.close()
    assert sample_path("grace_hopper").is_file() and sample_path("astronaut").is_file()


def test_thumbnail_is_a_square_crop_of_the_face(faces, photos):
    face = faces["astronaut"][0]
    thumb = thumbnail(photos["astronaut"].rgb, face, side=64)
    assert thumb.shape == (64, 64, 3) and thumb.dtype == np.uint8


@pytest.mark.slow  # importing gradio takes ~8 s here
def test_one_line_errors_turn_library_errors_and_bugs_into_one_gradio_line():
    gr = pytest.importorskip("gradio")
    from diffswap_igfi.ui.app import one_line_errors

    @one_line_errors
    def user_mistake():
        raise InputError("no such file: x.png: check the path")

    @one_line_errors
    def bug():
        raise KeyError("boom\nsecond line")

    with pytest.raises(gr.Error, match="no such file: x.png"):
        user_mistake()
    with pytest.raises(gr.Error) as err:
        bug()
    assert_one_line(err.value.message)
    assert "internal error (KeyError" in err.value.message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_flag(host, capsys):
    assert is_loopback(host)
    check_host(host, allow_remote=False)
    assert capsys.readouterr().err == ""


def test_other_hosts_need_allow_remote_and_print_a_warning(capsys):
    with pytest.raises(InputError, match="--allow-remote") as err:
        check_host("0.0.0.0", allow_remote=False)
    assert_one_line(str(err.value))
    check_host("0.0.0.0", allow_remote=True)
    assert capsys.readouterr().err.startswith("warning: listening on 0.0.0.0")


def test_ui_defaults_are_local_without_a_share_link_and_video_limits_are_options():
    parser = argparse.ArgumentParser()
    add_ui_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.share, args.allow_remote) == ("127.0.0.1", 7860, False,
                                                                     False)
    assert args.max_pixels == 40_000_000
    assert (args.max_video_seconds, args.max_video_frames) == (300.0, 9000)
    args = parser.parse_args(["--max-video-seconds", "12.5", "--max-video-frames", "200"])
    assert (args.max_video_seconds, args.max_video_frames) == (12.5, 200)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-video-seconds", "0"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from diffswap_igfi.sfi.build import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.mark.slow  # builds, saves and loads a tiny pipeline (~30 s on 2 loaded cores)
def test_diffusion_options_reach_the_engine_and_the_pipeline_is_loaded_once(service, session,
                                                                          checkpoint):
    from diffswap_igfi.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA

    def run(**options):
        done = service.swap(session, [HOPPER], ASTRONAUT, SwapOptions(
            engine="diffusion", checkpoint=checkpoint, steps=2, **options))
        return done, load_image(done.path).rgb

    first, a = run(seed=1)
    engine = next(iter(service._diffusion.values()))
    _, b = run(seed=2, warm_start=0.5, guidance=1.0)
    assert list(service._diffusion.values()) == [engine]  # loaded once, kept for the next
    # untouched by the requests: the checkpoint's own step count, seed 0, no warm start
    assert (engine.steps, engine.seed, engine.warm_start_strength) == (None, 0, None)
    assert first.report.metadata.digital_source_type == COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_photos_over_the_pixel_limit_are_refused_in_one_line(tmp_path):
    small = SwapService(tmp_path, max_pixels=100_000)  # astronaut is 512x512 = 262144 pixels
    with pytest.raises(InputError, match="over the limit of 100000 pixels") as err:
        small.swap(small.new_session(), [HOPPER], ASTRONAUT, SwapOptions())
    assert_one_line(str(err.value))
    small.close()


def test_the_reference_selector_swaps_matching_faces_and_names_a_miss(service, session):
    done = service.swap(session, [HOPPER], ASTRONAUT,
                        SwapOptions(face_selector="reference"), reference_path=ASTRONAUT)
    assert done.faces == 1
    with pytest.raises(InputError, match="matches the reference") as err:
        service.swap(session, [HOPPER], ASTRONAUT,
                     SwapOptions(face_selector="reference"), reference_path=HOPPER)
    assert_one_line(str(err.value))


def test_folders_of_dead_servers_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    dead, live, starting = (tmp_path / f"{ROOT_PREFIX}{n}" for n in ("a", "b", "c"))
    other = tmp_path / "something-else"
    for folder in (dead, live, starting, other):
        folder.mkdir()
    (dead / PID_FILE).write_text(str(gone.pid))
    (live / PID_FILE).write_text(str(os.getpid()))
    (other / PID_FILE).write_text(str(gone.pid))
    assert remove_stale_roots(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and starting.exists() and other.exists()


def test_results_carry_the_face_mark_and_the_target_as_c2pa_parent(service, session):
    """The UI writes as the CLI does: the face watermark anchored on the swapped face, the
    target opened as the C2PA parent ingredient."""
    done = service.swap(session, [HOPPER], ASTRONAUT, SwapOptions())
    report = done.report
    assert report.face_mark.found, report.lines()
    assert report.c2pa.actions == ["c2pa.opened", "c2pa.edited"]
    assert report.c2pa.parent == Path(ASTRONAUT).name

"""The command line as a user meets it: outputs, provenance, bad input, batches."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line, file_bytes
from diffswap_igfi.cli import EXIT_BATCH_FAILURES, main
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.verify import verify_image
from diffswap_igfi.swapper import Swapper


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(sample_path("astronaut"), tmp_path / "astronaut.png")
    shutil.copy(sample_path("grace_hopper"), tmp_path / "hopper.jpg")
    return tmp_path


def test_swap_writes_a_marked_image_identical_to_the_target_outside_the_mask(workdir, capsys):
    out = workdir / "out.png"
    code = main(["swap", "-s", str(workdir / "hopper.jpg"), "-t", str(workdir / "astronaut.png"),
                 "-o", str(out)])
    assert code == 0 and out.is_file()
    assert "wrote" in capsys.readouterr().out
    written = np.array(Image.open(out))
    target = load_image(workdir / "astronaut.png")
    # recompute the mask the CLI used: same photos, same deterministic engine
    with Swapper() as swapper:
        result = swapper.swap([swapper.source(load_image(workdir / "hopper.jpg"))], target)
    outside = result.alpha == 0
    assert np.array_equal(written[outside], target.rgb[outside])
    assert not np.array_equal(written, target.rgb)
    report = verify_image(out)
    assert report.metadata is not None and report.metadata.synthetic
    assert report.watermark.found


def test_watermark_survives_a_jpeg_quality_75_reencode(workdir):
    out = workdir / "out.png"
    assert main(["swap", "-s", "sample:grace_hopper", "-t", str(workdir / "astronaut.png"),
                 "-o", str(out), "--quiet"]) == 0
    reencoded = workdir / "reencoded.jpg"
    Image.open(out).convert("RGB").save(reencoded, quality=75)
    assert main(["verify", str(reencoded)]) == 0
    assert verify_image(reencoded).watermark.found
    assert main(["verify", str(workdir / "astronaut.png")]) == 1  # the untouched photo


def _bad_inputs(workdir):
    (workdir / "text.jpg").write_text("this is not an image")
    data = file_bytes(workdir / "hopper.jpg")
    (workdir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(workdir / "tiny.png")
    Image.new("RGB", (320, 240), (128, 140, 150)).save(workdir / "noface.png")
    target = str(workdir / "astronaut.png")
    return {
        "no face": (["-s", str(workdir / "noface.png"), "-t", target], "no face"),
        "truncated": (["-s", str(workdir / "truncated.jpg"), "-t", target], "truncated"),
        "text file": (["-s", str(workdir / "text.jpg"), "-t", target], "not an image"),
        "1x1": (["-s", str(workdir / "tiny.png"), "-t", target], "1x1"),
        "missing": (["-s", str(workdir / "missing.png"), "-t", target], "no such file"),
        "several faces": (["-s", "sample:group", "-t", target], "--source-face-index"),
    }


def test_bad_inputs_fail_with_one_line_and_touch_nothing(workdir, capsys):
    cases = _bad_inputs(workdir)
    before = {p.name: file_bytes(p) for p in workdir.iterdir()}
    for name, (args, expected) in cases.items():
        out = workdir / f"out_{name.replace(' ', '_')}.png"
        code = main(["swap", *args, "-o", str(out)])
        err = capsys.readouterr().err
        assert code != 0, name
        assert expected in err, (name, err)
        assert err.startswith("error: "), name
        assert_one_line(err)
        assert not out.exists(), name
    assert {p.name: file_bytes(p) for p in workdir.iterdir()} == before


@pytest.mark.parametrize("force", [False, True])
def test_output_equal_to_an_input_is_always_refused(workdir, capsys, force):
    target = workdir / "astronaut.png"
    before = file_bytes(target)
    args = ["swap", "-s", "sample:grace_hopper", "-t", str(target), "-o", str(target)]
    code = main(args + (["--force"] if force else []))
    err = capsys.readouterr().err
    assert code != 0 and "input" in err
    assert_one_line(err)
    assert file_bytes(target) == before


def test_existing_output_needs_force(workdir, capsys):
    out = workdir / "existing.png"
    out.write_bytes(b"precious")
    args = ["swap", "-s", "sample:grace_hopper", "-t", str(workdir / "astronaut.png"), "-o",
            str(out), "--quiet"]
    assert main(args) != 0
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force"]) == 0
    assert verify_image(out).synthetic


def test_batch_writes_what_it_can_and_lists_what_failed(workdir, capsys):
    targets = workdir / "targets"
    targets.mkdir()
    shutil.copy(workdir / "astronaut.png", targets / "a.png")
    shutil.copy(sample_path("group"), targets / "b.jpg")
    (targets / "c.jpg").write_text("not an image")
    out = workdir / "results"
    code = main(["swap", "-s", "sample:grace_hopper", "-t", str(targets), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_BATCH_FAILURES == 5
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "c.jpg" in errors[0]
    assert "wrote 2 of 3" in captured.out
    assert (targets / "c.jpg").read_text() == "not an image"


def test_reference_selector_swaps_only_the_matching_face(workdir, capsys, faces, photos):
    group = workdir / "group.jpg"
    shutil.copy(sample_path("group"), group)
    # the reference is a crop of the group's third-largest face
    x0, y0, x1, y1 = faces["group"][2].box.astype(int)
    w, h = x1 - x0, y1 - y0
    ref = photos["group"].rgb[max(0, y0 - h // 2):y1 + h // 2, max(0, x0 - w // 2):x1 + w // 2]
    Image.fromarray(ref).save(workdir / "ref.png")
    out = workdir / "out.png"
    code = main(["swap", "-s", "sample:grace_hopper", "-t", str(group), "-o", str(out),
                 "--face-selector", "reference", "--reference-face", str(workdir / "ref.png")])
    assert code == 0, capsys.readouterr().err
    assert "1 face(s) swapped" in capsys.readouterr().out
    changed = np.any(np.asarray(Image.open(out).convert("RGB")) != photos["group"].rgb, axis=2)
    ys, xs = np.nonzero(changed)
    cx, cy = faces["group"][2].center
    assert abs(xs.mean() - cx) < w / 2 and abs(ys.mean() - cy) < h / 2


def test_the_installed_entry_point_prints_one_clean_line(workdir):
    """A real process: MediaPipe's C++ logging must not leak onto stderr."""
    (workdir / "noface.png").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "diffswap_igfi", "swap", "-s", "sample:grace_hopper", "-t",
         str(workdir / "noface.png"), "-o", str(workdir / "o.png")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line(proc.stderr)
    assert "noface.png" in proc.stderr


def test_debug_shows_the_traceback(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "diffswap_igfi", "--debug", "swap", "-s", "missing.png", "-t",
         str(workdir / "astronaut.png"), "-o", str(workdir / "o.png")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr

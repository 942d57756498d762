"""The CLI's error contract: one ``error:`` line, the documented exit code, nothing written.

Option values argparse rejects, options that mean nothing in the chosen mode, pickled
checkpoints, batches with failures, ``--debug``, and temporaries left by a killed write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import assert_one_line
from diffswap_igfi.cli import main
from diffswap_igfi.io.atomic import temporary_path

SWAP = ["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut"]


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "abc"], "positive whole number"),
    (["--engine", "nonsense"], "--engine"),
    (["--blend", "x"], "--blend"),
    (["--jpeg-quality", "0"], "from 1 to 100"),
    (["--jpeg-quality", "101"], "from 1 to 100"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--face-sel", "all"], "unrecognized"),  # no abbreviations
])
def test_rejected_values_are_one_line_without_usage(tmp_path, capsys, extra, needle):
    out = tmp_path / "o.png"
    code = main([*SWAP, "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line(err)
    assert err.startswith("error: ") and needle in err and "usage:" not in err
    assert "_positive_int" not in err and "choose from 1, 2" not in err
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--concurrency", "abc"], "--concurrency: expected a positive whole number, got 'abc'"),
    (["--queue-size", "0"], "--queue-size: must be positive, got 0"),
    (["--max-video-seconds", "x"], "--max-video-seconds: expected a positive number, got 'x'"),
])
def test_ui_server_options_share_the_cli_value_checks(capsys, extra, needle):
    code = main(["ui", *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert_one_line(err)


def test_missing_arguments_and_unknown_command_are_one_line(capsys):
    assert main(["swap", "-s", "a.png"]) == 2
    err = capsys.readouterr().err
    assert_one_line(err)
    assert "-t/--target" in err
    assert main(["no-such-command"]) == 2
    assert_one_line(capsys.readouterr().err)


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as done:
        main(["swap", "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("extra,needle", [
    (["--face-index", "1"], "--face-index has no effect"),
    (["--reference-distance", "0.5"], "--reference-distance has no effect"),
    (["--steps", "5"], "--steps has no effect"),
    (["--seed", "3"], "--seed has no effect"),
    (["--guidance", "2"], "--guidance has no effect"),
    (["--device", "cpu"], "--device has no effect"),
    (["--mix-mode", "weighted"], "--mix-mode has no effect"),
    (["--engine", "diffusion", "--blend", "poisson"], "--blend has no effect"),
    (["--region", "head"], "cannot carry hair or ears"),
])
def test_options_without_effect_are_refused(tmp_path, capsys, extra, needle):
    out = tmp_path / "o.png"
    assert main([*SWAP, "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert_one_line(err)
    assert needle in err
    assert not out.exists()


def test_source_face_index_errors_name_that_option(tmp_path, capsys):
    code = main(["swap", "-s", "sample:grace_hopper", "-t", "sample:astronaut", "-o",
                 str(tmp_path / "o.png"), "--source-face-index", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--source-face-index 3 is out of range" in err


def test_a_pickle_only_checkpoint_is_one_line_naming_the_fix(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "model_index.json").write_text(json.dumps({"_class_name": "DiffSwapIGFIPipeline"}))
    (ckpt / "unet" / "config.json").write_text("{}")
    (ckpt / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    out = tmp_path / "o.png"
    code = main([*SWAP, "-o", str(out), "--checkpoint", str(ckpt)])
    captured = capsys.readouterr()
    assert code == 4
    assert_one_line(captured.err)
    assert "pickled weights only" in captured.err and "safetensors" in captured.err
    assert captured.out == "" and not out.exists()


def test_debug_adds_the_traceback_and_keeps_the_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffswap_igfi", "--debug", "swap", "-s", "missing.png", "-t",
         "sample:astronaut", "-o", str(tmp_path / "o.png")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no such file")


@pytest.mark.slow  # one swap
def test_stale_temporaries_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out.png"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that no longer runs
    stale = out.with_name(f".{out.name}.{dead.pid}-{'0' * 16}.tmp")
    stale.write_bytes(b"half a png")
    legacy = out.with_name(f".{out.name}.{'a' * 16}.tmp")  # the old name format, an hour old
    legacy.write_bytes(b"half a png")
    os.utime(legacy, (0, 0))
    busy = temporary_path(out)  # this process: a write in progress, not stale
    busy.write_bytes(b"being written")
    unrelated = tmp_path / ".other.png.123-0000000000000000.tmp"
    unrelated.write_bytes(b"not ours")
    assert main([*SWAP, "-o", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert not stale.exists() and not legacy.exists()
    assert busy.exists() and unrelated.exists()


def test_diffusion_steps_and_guidance_default_to_the_checkpoints_own():
    """Without --steps/--guidance each pipeline samples with its own defaults (REFace's 50 at
    3.5, ours 30 at 3.0); given ones are passed on."""
    from types import SimpleNamespace

    import numpy as np

    from diffswap_igfi.engines.diffusion import DiffusionEngine

    calls = []

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, target, pairs, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(images=[target], alphas=[np.zeros(target.shape[:2])])

    target = np.zeros((8, 8, 3), np.uint8)
    DiffusionEngine(Pipe()).swap_pairs(target, [])
    DiffusionEngine(Pipe(), steps=5, guidance=2.0).swap_pairs(target, [])
    assert "num_inference_steps" not in calls[0] and "guidance_scale" not in calls[0]
    assert calls[1]["num_inference_steps"] == 5 and calls[1]["guidance_scale"] == 2.0

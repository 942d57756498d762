"""Evaluation: the metrics tell real swaps from fakes, the CLI path writes the fixed report, and
bad inputs fail per pair (faceless photos) or as one line (bad CSV)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line
from diffswap_igfi.errors import InputError, ModelNotFoundError, OutputError
from diffswap_igfi.eval import metrics as M
from diffswap_igfi.eval.fid import (INCEPTION_ENV, frechet_distance, inception_weights_path,
                                    kernel_inception_distance, load_inception)
from diffswap_igfi.eval.report import summarise
from diffswap_igfi.eval.run import add_eval_arguments, evaluate_pairs, read_pairs, run_eval
from diffswap_igfi.io.images import save_image
from diffswap_igfi.provenance.verify import verify_image

MAIN_KEYS = {"id_cosine", "id_top1", "id_top5", "pose_error_deg", "expression_error", "fid",
             "pairs", "n_pairs", "n_failed", "n_identities", "recognizer", "notes"}
IDENTITIES = (["sample:astronaut", "sample:grace_hopper", "sample:tom_hanks"]
              + [f"group{i}.png" for i in range(6)])


def write_csv(path, rows, header="source,target,swap"):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def eval_cli(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args([str(a) for a in argv] + ["--quiet"])
    code = run_eval(args)
    return code, json.loads((Path(args.out) / "report.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory, photos, faces):
    """The six group faces cropped into their own files (twice the box around each face), a
    faceless photo, and nine distinct identities in all with the three single-face samples."""
    root = tmp_path_factory.mktemp("eval_data")
    group = photos["group"].rgb
    assert len(faces["group"]) == 6
    for i, face in enumerate(faces["group"]):
        side = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
        cx, cy = face.center
        x0, y0 = int(max(0, cx - side)), int(max(0, cy - side))
        x1, y1 = int(min(group.shape[1], cx + side)), int(min(group.shape[0], cy + side))
        save_image(root / f"group{i}.png", np.ascontiguousarray(group[y0:y1, x0:x1]))
    noise = np.random.default_rng(0).integers(90, 110, (256, 256, 3), dtype=np.uint8)
    save_image(root / "faceless.png", noise)
    return root


@pytest.fixture(scope="module")
def meter(recognizer):
    return M.FaceMeter(recognizer)


def ring(shift_swap):
    """Pair i: source i, target i+1, swap = the target (0) or the source (-1)."""
    n = len(IDENTITIES)
    return [(IDENTITIES[i], IDENTITIES[(i + 1) % n], IDENTITIES[(i + 1 + shift_swap) % n])
            for i in range(n)]


# ------------------------------------------------------------------------- pure functions
def test_pose_differences_wrap_around():
    d = M.pose_differences((179.0, 10.0, -170.0), (-179.0, 4.0, 175.0))
    np.testing.assert_allclose(d, [2.0, 6.0, 15.0])


def test_retrieval_ranks_count_ties_as_misses():
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    queries = np.array([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [0.0, 1.9]])
    ranks = M.retrieval_ranks(queries, gallery, np.array([0, 0, 1, 2]))
    assert ranks.tolist() == [0, 1, 1, 0]  # query 2 is equidistant from 0 and 1: a miss
    assert M.topk_accuracy(ranks, 1) == 0.5 and M.topk_accuracy(ranks, 2) == 1.0


def test_frechet_distance_and_kid_on_known_gaussians():
    a = np.random.default_rng(1).normal(size=(400, 8))
    shift = np.arange(8) / 4.0
    assert abs(frechet_distance(a, a)) < 1e-8
    # equal covariances: FID is exactly the squared distance of the means
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    same, _ = kernel_inception_distance(a, a, subsets=5, subset_size=100)
    moved, _ = kernel_inception_distance(a, a + shift, subsets=5, subset_size=100)
    assert abs(same) < 0.01 * moved  # unbiased: near 0 for one distribution


# ------------------------------------------------------------------------- discrimination
def test_metrics_tell_a_real_swap_from_an_unchanged_target(data, detector, meter):
    unchanged = evaluate_pairs(read_pairs(write_csv(data / "unchanged.csv", ring(0))),
                               detector=detector, meter=meter)
    own = evaluate_pairs(read_pairs(write_csv(data / "own.csv", ring(-1))),
                         detector=detector, meter=meter)
    a, b = summarise(unchanged), summarise(own)
    assert a["n_failed"] == b["n_failed"] == 0 and a["n_identities"] == 9
    assert a["id_top1"] <= 0.2  # measured: 0.0
    assert b["id_top1"] == 1.0 and b["id_top5"] == 1.0 and b["id_cosine"] > 0.999
    # the unchanged target keeps the target's pose and expression exactly; the source does not
    assert a["pose_error_deg"] == 0.0 and a["expression_error"] == 0.0
    assert b["pose_error_deg"] > 5.0 and b["expression_error"] > 0.1
    assert a["id_distance_target"] == 0.0 and b["id_distance_source"] == 0.0


def test_a_self_swap_scores_perfectly(data, detector, meter):
    ev = evaluate_pairs(read_pairs(write_csv(data / "self.csv", [("group0.png",) * 3])),
                        detector=detector, meter=meter)
    row = ev.rows[0]
    assert row["status"] == "ok" and row["self_swap"]
    assert row["id_cosine"] > 0.95 and row["ssim"] == 1.0 and row["psnr"] == M.PSNR_CAP_DB
    assert row["lpips"] is None
    assert any("LPIPS skipped" in n for n in summarise(ev)["notes"])


# ------------------------------------------------------------------------- the CLI path
def test_geometric_engine_writes_the_fixed_report(data, tmp_path):
    pairs = write_csv(data / "geo.csv", [r[:2] for r in ring(0)], header="source,target")
    code, report = eval_cli("--pairs", pairs, "--out", tmp_path, "--engine", "geometric")
    assert code == 0 and MAIN_KEYS <= set(report) and report["engine"] == "geometric"
    assert report["n_pairs"] == 9 and report["n_failed"] == 0 and report["n_identities"] == 9
    assert report["fid"] is None and any("FID skipped" in n for n in report["notes"])
    # measured: top-1 5/9, top-5 9/9; the warp moves identity towards the source
    assert report["id_top1"] >= 0.4 and report["id_top5"] == 1.0
    assert report["id_distance_source"] < report["id_distance_target"]
    assert report["pose_error_deg"] < 10.0
    swaps = sorted((tmp_path / "swaps").glob("*.png"))
    assert len(swaps) == 9 and verify_image(swaps[0]).synthetic
    # written with the face-anchored mark, as the CLI writes (scored before the marks, in
    # memory); measured 7 of 9 read back: the mark lives only in the swapped pixels, and the
    # 112 px Tom Hanks and a small group face leave too few of them (the CLI alike)
    found = sum(bool(verify_image(s).face_mark.found) for s in swaps)
    assert found >= 5
    assert verify_image(tmp_path / "grid.png").synthetic
    for name in ("report.md", "id_distances.png", "pose_errors.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| ID retrieval top-1 |" in (tmp_path / "report.md").read_text()
    with pytest.raises(OutputError, match="--force"):  # an existing report is never overwritten
        eval_cli("--pairs", pairs, "--out", tmp_path, "--engine", "geometric")


def test_faceless_images_fail_their_pair_only(data, tmp_path):
    pairs = write_csv(data / "faceless.csv", [
        ("sample:astronaut", "group1.png", "group1.png"),
        ("sample:grace_hopper", "group2.png", "faceless.png"),  # no face in the swap
        ("faceless.png", "group3.png", "group3.png"),  # no face in the source
        ("group4.png", "group5.png", "missing.png")])  # no file at all
    code, report = eval_cli("--pairs", pairs, "--out", tmp_path)
    assert code == 0 and report["n_pairs"] == 4 and report["n_failed"] == 3
    status = [(r["status"], r["reason"]) for r in report["pairs"]]
    assert status[0] == ("ok", None)
    assert "swap: no face found" in status[1][1] and "source: no face found" in status[2][1]
    assert "no such file" in status[3][1]
    assert report["n_identities"] == 3  # astronaut, grace_hopper, group4 measured as sources
    assert "Failed pairs" in (tmp_path / "report.md").read_text()


def test_nothing_evaluable_is_an_error_after_the_report(data, tmp_path):
    pairs = write_csv(data / "none.csv", [("faceless.png", "group1.png", "group1.png")])
    with pytest.raises(InputError, match="no pair could be evaluated"):
        eval_cli("--pairs", pairs, "--out", tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["id_cosine"] is None


@pytest.mark.slow
def test_diffusion_checkpoint_path(data, tmp_path):
    from diffswap_igfi.sfi.build import tiny_pipeline

    tiny_pipeline(seed=0).save_pretrained(tmp_path / "ckpt")
    pairs = write_csv(data / "diffusion.csv", [r[:2] for r in ring(0)[:2]], header="source,target")
    out = tmp_path / "out"
    try:
        eval_cli("--pairs", pairs, "--out", out, "--checkpoint", tmp_path / "ckpt", "--steps", "2")
    except InputError as err:  # a random tiny model need not paint a detectable face
        assert "no pair could be evaluated" in str(err)
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "diffusion" and MAIN_KEYS <= set(report)
    assert report["n_pairs"] == 2
    for row in report["pairs"]:
        assert row["status"] == "ok" or row["reason"] == "swap: no face found", row
    swaps = sorted((out / "swaps").glob("*.png"))
    assert len(swaps) == 2 and all(verify_image(s).synthetic for s in swaps)


@pytest.mark.parametrize("header, engine, expected", [
    ("src,tgt,out", [], "source,target,swap"),
    ("source,target", [], "source,target,swap"),
    ("source,target,swap", ["--engine", "geometric"], "drop the swap column")])
def test_bad_header_is_one_line_naming_the_expected_one(tmp_path, header, engine, expected):
    pairs = write_csv(tmp_path / "p.csv", [("a.png", "b.png", "c.png")[:len(header.split(","))]],
                      header=header)
    with pytest.raises(InputError) as info:
        eval_cli("--pairs", pairs, "--out", tmp_path / "out", *engine)
    assert_one_line(str(info.value))
    assert expected in str(info.value)


# ------------------------------------------------------------------------- optional models
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict()
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


@pytest.mark.slow
def test_fid_and_kid_with_local_random_inception(data, detector, meter, inception_file,
                                                 monkeypatch):
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))
    assert inception_weights_path() == inception_file
    pairs = read_pairs(write_csv(data / "fid.csv", ring(-1)[:2]))
    ev = evaluate_pairs(pairs, detector=detector, meter=meter,
                        inception=load_inception(inception_weights_path()))
    assert ev.fid["fid_n"] == 2
    assert np.isfinite(ev.fid["fid"]) and ev.fid["fid"] > 0
    assert np.isfinite(ev.fid["kid"]) and not any("FID skipped" in n for n in ev.notes)


def test_unusable_weight_files_name_the_problem(tmp_path):
    bad = tmp_path / "inception.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelNotFoundError, match="not a torchvision inception_v3"):
        load_inception(bad)
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_inception(tmp_path / "nowhere.pt")
    with pytest.raises(ModelNotFoundError, match="not an LPIPS"):
        M.load_lpips(bad)


def test_lpips_from_local_weights(tmp_path, photos):
    torch.manual_seed(0)
    path = tmp_path / "lpips_alex.pt"
    torch.save(M.LPIPS().state_dict(), path)
    lpips = M.load_lpips(path)
    a = photos["astronaut"].rgb[:256, :256]
    b = photos["grace_hopper"].rgb[:256, :256]
    assert lpips.distance(a, a) == 0.0
    assert lpips.distance(a, b) != 0.0


def test_arcface_is_a_labelled_second_opinion(data, detector, recognizer, tmp_path):
    from test_identity import export_onnx, tiny_iresnet

    from diffswap_igfi.conditions.identity import ArcFaceONNX

    export_onnx(tiny_iresnet(), tmp_path / "w600k_r50.onnx")
    arc = ArcFaceONNX(tmp_path / "w600k_r50.onnx")
    ev = evaluate_pairs(read_pairs(write_csv(data / "arc.csv", ring(-1)[:3])),
                        detector=detector, meter=M.FaceMeter(recognizer, arcface=arc))
    ev.arcface = str(arc.path)
    report = summarise(ev)
    assert report["arcface_id_top1"] == 1.0 and report["arcface_id_cosine"] > 0.999
    assert report["id_top1"] == 1.0  # the main numbers stay dlib's
    assert any(n.startswith("arcface_*") and "not independent" in n for n in report["notes"])

"""SFI training data: preprocessing real photos into shards, random-access reading, augmentations
and the deterministic dataset."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import zipfile

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_one_line, file_bytes

from diffswap_igfi.data.augment import (AugmentConfig, condition_dropout, reference_augment,
                                        shape_augment_mask, shuffle_region_mask)
from diffswap_igfi.data.dataset import SFIDataset
from diffswap_igfi.data.preprocess import add_preprocess_arguments, preprocess, run_preprocess
from diffswap_igfi.data.shards import TEMP_SUFFIX, ShardIndex, ShardWriter, decode, encode
from diffswap_igfi.errors import ConfigError, InputError
from diffswap_igfi.faces import masks
from diffswap_igfi.faces.align import template_points
from diffswap_igfi.io.samples import sample_path

CROP = 256
SHARDS = ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar")
GOOD = {"a_astronaut.png", "d_grace_hopper.jpg", "people/group.jpg", "people/tom_hanks.png"}
BAD = {"b_corrupt.jpg", "c_faceless.png", "text.png"}
FIELDS = {"crop.png", "landmarks.npy", "kps.npy", "mask.png", "geometry.npz", "meta.json"}


def make_inputs(folder):
    """The four shipped photos (two in a subfolder) and three bad files: 7 files, 3 shards of 3."""
    (folder / "people").mkdir(parents=True)
    for name, target in [("astronaut", "a_astronaut.png"), ("grace_hopper", "d_grace_hopper.jpg"),
                         ("group", "people/group.jpg"), ("tom_hanks", "people/tom_hanks.png")]:
        shutil.copy(sample_path(name), folder / target)
    jpeg = file_bytes(sample_path("grace_hopper"))
    (folder / "b_corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("this is not a picture\n")
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "c_faceless.png"), cv2.GaussianBlur(noise, (0, 0), 3))
    return folder


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (file_bytes(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(input folder, its snapshot before, output folder, report) of one preprocess run."""
    root = tmp_path_factory.mktemp("data")
    in_dir = make_inputs(root / "in")
    before = snapshot(in_dir)
    report = preprocess(in_dir, root / "out", crop_size=CROP, shard_size=3, progress=False)
    return in_dir, before, root / "out", report


@pytest.fixture
def fresh_copy(prepared, tmp_path):
    """A private copy of the preprocessed folder, for tests that change it."""
    in_dir, _, out_dir, _ = prepared
    return in_dir, shutil.copytree(out_dir, tmp_path / "out")


# ------------------------------------------------------------------------------- preprocessing
def test_preprocess_writes_shards_index_and_bad_files(prepared):
    in_dir, before, out_dir, report = prepared
    assert (report.files, report.faces, report.samples, report.bad_files) == (7, 4, 4, 3)
    assert (report.shards_written, report.shards_skipped) == (3, 0)
    assert snapshot(in_dir) == before  # inputs read only: same bytes, same mtimes, none gone
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*SHARDS, "index.json", "bad_files.tsv"])
    index = json.loads((out_dir / "index.json").read_text())
    assert index["crop_size"] == CROP and [e["samples"] for e in index["shards"]] == [1, 3, 0]
    rows = [line.split("\t") for line in (out_dir / "bad_files.tsv").read_text().splitlines()]
    assert {r[0] for r in rows} == BAD and all(len(r) == 2 for r in rows)
    reasons = dict(rows)
    assert "truncated or corrupt" in reasons["b_corrupt.jpg"]
    assert "not an image" in reasons["text.png"]
    assert reasons["c_faceless.png"] == "no face found"
    assert str(in_dir) not in "".join(reasons.values())  # paths relative to IN_DIR


def test_several_faces_per_photo_and_the_size_floor(prepared, tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    for name in ("a_astronaut.png", "people/group.jpg", "people/tom_hanks.png"):
        shutil.copy(prepared[0] / name, in_dir)
    report = preprocess(in_dir, tmp_path / "out", max_faces=5, min_interocular=41,
                        progress=False)
    index = ShardIndex(tmp_path / "out")
    metas = [index[i]["meta"] for i in range(len(index))]
    # group: 6 faces, 3 with eyes >= 41 px apart; the astronaut's are 42.6 px, Hanks's 36 px
    assert [(m["source"], m["face"]) for m in metas] == [
        ("a_astronaut.png", 0), ("group.jpg", 0), ("group.jpg", 1), ("group.jpg", 2)]
    assert len({index[i]["__key__"] for i in range(4)}) == 4
    assert report.bad_files == 1
    line = (tmp_path / "out" / "bad_files.tsv").read_text()
    assert line.startswith("tom_hanks.png\tfaces too small") and "41 px" in line


def test_shards_follow_the_webdataset_convention(prepared):
    out_dir = prepared[2]
    with tarfile.open(out_dir / SHARDS[1]) as tar:
        members = tar.getmembers()
    keys = {m.name.split(".", 1)[0] for m in members}
    assert len(keys) == 3 and all(m.isfile() and m.mtime == 0 and m.uid == 0 for m in members)
    for key in keys:  # webdataset groups members by the name up to the first dot
        assert {m.name.split(".", 1)[1] for m in members if m.name.startswith(key)} == FIELDS


def test_shard_index_reads_samples_by_random_access(prepared):
    index = ShardIndex(prepared[2])
    assert len(index) == 4 and index.crop_size == CROP
    sources = set()
    for i in (3, 0, 2, 1, -1):
        s = index[i]
        assert s["crop"].shape == (CROP, CROP, 3) and s["crop"].dtype == np.uint8
        assert s["landmarks"].shape == (468, 2) and s["landmarks"].dtype == np.float32
        assert s["kps"].shape == (5, 2) and s["kps"].dtype == np.float32
        assert set(np.unique(s["mask"])) == {0, 255} and s["mask"].shape == (CROP, CROP)
        assert set(s["geometry"]) == {"shape", "expression", "rotation", "scale", "translation"}
        assert s["geometry"]["shape"].shape == (1404,) and "identity" not in s
        # aligned to the FFHQ template, in crop pixels
        assert np.abs(s["kps"] - template_points(CROP, "ffhq")).max() < CROP * 0.06
        # the geometry was fitted in crop coordinates: its translation is near the crop centre
        assert np.all(np.abs(s["geometry"]["translation"] - CROP / 2) < CROP * 0.25)
        assert s["meta"]["face"] == 0 and s["meta"]["image_size"][0] >= 112
        sources.add(s["meta"]["source"])
    assert sources == GOOD
    with pytest.raises(IndexError):
        index[4]


def test_rerun_skips_complete_shards_and_keeps_bytes(fresh_copy):
    in_dir, out_dir = fresh_copy
    old = {name: file_bytes(out_dir / name) for name in (*SHARDS, "index.json", "bad_files.tsv")}
    report = preprocess(in_dir, out_dir, crop_size=CROP, shard_size=3, progress=False)
    assert (report.shards_written, report.shards_skipped, report.faces) == (0, 3, 0)
    assert (report.samples, report.bad_files) == (4, 3) and "3 complete shard(s) skipped" in (
        report.summary())
    assert {name: file_bytes(out_dir / name) for name in old} == old


def test_crash_leftover_is_ignored_then_replaced(fresh_copy):
    in_dir, out_dir = fresh_copy
    original = file_bytes(out_dir / SHARDS[1])
    # A crash while shard 1 was written: half a tar under the temporary name, no final file,
    # and no entry in the index (entries are added only after the rename).
    (out_dir / SHARDS[1]).unlink()
    (out_dir / (SHARDS[1] + TEMP_SUFFIX)).write_bytes(original[: len(original) // 2])
    index = json.loads((out_dir / "index.json").read_text())
    index["shards"] = [e for e in index["shards"] if e["name"] != SHARDS[1]]
    (out_dir / "index.json").write_text(json.dumps(index))
    assert len(ShardIndex(out_dir)) == 1
    report = preprocess(in_dir, out_dir, crop_size=CROP, shard_size=3, progress=False)
    assert (report.shards_written, report.shards_skipped, report.faces) == (1, 2, 3)
    assert file_bytes(out_dir / SHARDS[1]) == original
    assert not (out_dir / (SHARDS[1] + TEMP_SUFFIX)).exists() and len(ShardIndex(out_dir)) == 4


def test_shard_writer_is_atomic(tmp_path):
    path = tmp_path / "s.tar"
    with pytest.raises(RuntimeError), ShardWriter(path) as writer:
        writer.write("k0", {"a.npy": np.arange(3), "b.json": {"x": 1}})
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    arrays = {"z": np.eye(2), "a": np.float64(2.5)}
    assert encode("g.npz", arrays) == encode("g.npz", dict(arrays))  # no time stamp inside
    assert decode("g.npz", encode("g.npz", arrays))["a"] == 2.5
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "t.tar").write("a.b", {})


def test_workers_give_the_same_bytes(prepared, tmp_path):
    in_dir, _, out_dir, _ = prepared
    report = preprocess(in_dir, tmp_path / "out", crop_size=CROP, shard_size=3, workers=2,
                        progress=False)
    assert report.samples == 4
    for name in (*SHARDS, "index.json", "bad_files.tsv"):
        assert file_bytes(tmp_path / "out" / name) == file_bytes(out_dir / name), name


def test_a_worker_that_cannot_start_fails_the_run(prepared, tmp_path, monkeypatch):
    # A zip that is not a landmarker bundle passes the up-front path check but fails in each
    # worker: the run must end with the worker's error (as with workers=1), not hang.
    bundle = tmp_path / "broken.task"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("readme.txt", "no models here")
    monkeypatch.setenv("DIFFSWAP_IGFI_LANDMARKER", str(bundle))
    errors = []
    for workers in (1, 2):
        with pytest.raises(Exception) as err:
            preprocess(prepared[0], tmp_path / f"o{workers}", shard_size=3, workers=workers,
                       progress=False)
        errors.append((type(err.value), str(err.value)))
        assert not list((tmp_path / f"o{workers}").glob("shard-*"))
    assert errors[0] == errors[1]


def test_preprocess_errors(tmp_path, prepared):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images") as err:
        preprocess(tmp_path / "empty", tmp_path / "o1", progress=False)
    assert_one_line(str(err.value))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(InputError, match="no usable face") as err:
        preprocess(bad, tmp_path / "o2", progress=False)
    assert_one_line(str(err.value))
    assert (tmp_path / "o2" / "bad_files.tsv").read_text().startswith("x.jpg\t")
    with pytest.raises(InputError, match="other settings") as err:  # resume needs same options
        preprocess(prepared[0], prepared[2], crop_size=128, shard_size=3, progress=False)
    assert_one_line(str(err.value))
    with pytest.raises(InputError, match="crop-size"):
        preprocess(prepared[0], tmp_path / "o3", crop_size=100, progress=False)


def test_cli_helpers(prepared, capsys):
    parser = add_preprocess_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(prepared[0]), str(prepared[2]), "--shard-size", "3", "--quiet"])
    assert (args.crop_size, args.workers, args.arcface) == (256, 1, None)
    assert run_preprocess(args) == 0
    assert "3 complete shard(s) skipped" in capsys.readouterr().out


def test_identity_from_an_arcface_onnx(prepared, tmp_path):
    from test_identity import export_onnx, tiny_iresnet

    export_onnx(tiny_iresnet(), tmp_path / "w600k_r50.onnx")
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    shutil.copy(prepared[0] / "a_astronaut.png", in_dir)
    preprocess(in_dir, tmp_path / "out", arcface=tmp_path, progress=False)
    sample = SFIDataset(tmp_path / "out")[0]
    assert sample["has_identity"] and sample["identity"].shape == (512,)
    assert torch.linalg.norm(sample["identity"]).item() == pytest.approx(1.0, abs=1e-4)


# ------------------------------------------------------------------------------------ dataset
def test_dataset_shapes_and_ranges(prepared):
    ds = SFIDataset(prepared[2], seed=3)
    assert len(ds) == 4
    for i in range(len(ds)):
        x = ds[i]
        for key in ("target", "source"):
            assert x[key].shape == (3, CROP, CROP) and x[key].dtype == torch.float32
            assert x[key].min() >= -1 and x[key].max() <= 1
        assert x["source_id"].shape == (3, 112, 112) and x["source_id"].abs().max() <= 1
        assert x["mask"].shape == (1, CROP, CROP) and set(x["mask"].unique().tolist()) <= {0, 1}
        assert x["geometry"].shape == (7, CROP // 8, CROP // 8) and x["geometry"].max() > 0.5
        assert x["kps"].shape == (5, 2) and x["kps"].dtype == torch.float32
        assert x["identity"].shape == (512,) and not x["identity"].any()
        assert not x["has_identity"] and x["index"].item() == i
        assert x["drop_identity"].dtype == torch.bool and x["drop_clip"].dtype == torch.bool


def test_dataset_is_a_pure_function_of_seed_epoch_index(prepared):
    a, b = SFIDataset(prepared[2], seed=1), SFIDataset(prepared[2], seed=1)
    b[2], b[0]  # consuming other samples first must not matter
    for i in range(4):
        xa, xb = a[i], b[i]
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    b.set_epoch(1)
    assert not torch.equal(a[1]["source"], b[1]["source"])
    a.set_epoch(1)
    assert torch.equal(a[1]["source"], b[1]["source"])
    assert not torch.equal(SFIDataset(prepared[2], seed=2)[1]["source"], SFIDataset(
        prepared[2], seed=1)[1]["source"])


def test_dataset_same_batches_with_dataloader_workers(prepared):
    ds = SFIDataset(prepared[2], seed=5)
    ds.set_epoch(7)
    one = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    two = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    for x, y in zip(one, two, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_dataset_without_augmentation_and_mask_coverage(prepared):
    ds = SFIDataset(prepared[2], augment=AugmentConfig.off())
    for e in range(3):
        ds.set_epoch(e)
        for i in range(len(ds)):
            x = ds[i]
            assert torch.equal(x["source"], x["target"])
            assert not x["drop_identity"] and not x["drop_clip"]
    shaped = SFIDataset(prepared[2], augment={"mask_shape": 1.0, "mask_shuffle": 0.0})
    for e in range(4):
        shaped.set_epoch(e)
        for i in range(len(shaped)):
            x = shaped[i]
            m = x["mask"][0]
            nose = x["kps"][2].round().long()
            assert m[nose[1], nose[0]] == 1  # covers the face centre
            border = torch.cat([m[0], m[-1], m[:, 0], m[:, -1]])
            assert not border.any() and 0.15 < m.mean() < 0.6  # inside the crop, face-sized


def test_dataset_errors(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(InputError, match="diffswap-igfi preprocess") as err:
            SFIDataset(folder)
        assert_one_line(str(err.value))
    with pytest.raises(ConfigError, match="unknown augmentation"):
        AugmentConfig.from_value({"flipp": 0.5})


# ------------------------------------------------------------------------------ augmentations
@pytest.fixture(scope="module")
def sample(prepared):
    return ShardIndex(prepared[2])[0]  # the astronaut


def test_flip_swaps_left_and_right_keypoints(sample):
    crop, kps = sample["crop"], sample["kps"]
    out, out_kps = reference_augment(crop, kps, np.random.default_rng(0), flip=1.0, rotate_deg=0,
                                     scale=0, blur=0, color=0, elastic=0)
    assert np.array_equal(out, crop[:, ::-1])
    assert out_kps[0, 0] < out_kps[1, 0] and out_kps[3, 0] < out_kps[4, 0]  # order kept
    np.testing.assert_allclose(out_kps[[1, 0, 2, 4, 3], 0], CROP - 1 - kps[:, 0], atol=1e-4)
    np.testing.assert_allclose(out_kps[[1, 0, 2, 4, 3], 1], kps[:, 1], atol=1e-4)


def test_augmented_keypoints_match_the_augmented_image(sample, detector):
    crop, kps = sample["crop"], sample["kps"]
    for seed in range(3):
        out, out_kps = reference_augment(crop, kps, np.random.default_rng(seed), flip=0.5,
                                         rotate_deg=10, blur=0, color=1.0, elastic=1.0)
        found = detector.detect(out)[0].kps  # measured on the augmented image itself
        assert np.abs(found - out_kps).max() < 4.0, seed


def test_mask_augmentations(sample):
    face, landmarks = sample["mask"], sample["landmarks"]
    rng = np.random.default_rng(0)
    grown = masks.dilate(face, CROP // 12)
    changed = 0
    for _ in range(12):
        m = shape_augment_mask(face, landmarks, rng, p=1.0)
        assert m.shape == face.shape and set(np.unique(m)) <= {0, 255}
        inter = np.logical_and(m, face).sum() / np.logical_or(m, face).sum()
        assert inter > 0.75 and not (m & ~grown).any()
        changed += not np.array_equal(m, face)
    assert changed == 12
    assert shape_augment_mask(face, landmarks, rng, p=0.0) is face
    covered_nose = 0
    for _ in range(20):
        m = shuffle_region_mask(face, landmarks, rng, p=1.0)
        assert 0 < (m > 0).sum() < (face > 0).sum() and not (m & ~grown).any()
        covered_nose += m[int(sample["kps"][2, 1]), int(sample["kps"][2, 0])] > 0
    assert 0 < covered_nose < 20  # random subsets: sometimes the nose, sometimes not


def test_condition_dropout_frequencies():
    rng = np.random.default_rng(0)
    draws = np.array([condition_dropout(rng, p_identity=0.1, p_clip=0.05, p_both=0.05)
                      for _ in range(20000)])
    both = (draws[:, 0] & draws[:, 1]).mean()
    assert abs(both - 0.05) < 0.01
    assert abs(draws[:, 0].mean() - 0.15) < 0.01 and abs(draws[:, 1].mean() - 0.10) < 0.01
    with pytest.raises(ConfigError):
        condition_dropout(rng, p_identity=0.8, p_clip=0.3, p_both=0.0)


# ------------------------------------------------------------------------- streaming reader
@pytest.fixture(scope="module")
def many(prepared, tmp_path_factory):
    """24 jittered copies of the preprocessed faces in 8 shards of 3."""
    from diffswap_igfi.data.synthetic import augmented_shards

    return augmented_shards(prepared[2], tmp_path_factory.mktemp("many"), samples=24,
                            shard_size=3)


def _keys(stream) -> list[str]:
    return [s["__key__"] for s in stream]


def test_stream_splits_shards_across_processes_and_workers(many):
    from diffswap_igfi.data.stream import ShardStream

    per_rank = [_keys(ShardStream(many, rank=r, world_size=4, shuffle_buffer=4))
                for r in range(4)]
    assert [len(k) for k in per_rank] == [6, 6, 6, 6]
    everything = [k for keys in per_rank for k in keys]
    assert sorted(everything) == [f"s{j:08d}" for j in range(24)]  # disjoint, complete
    # two processes with two DataLoader workers each: the same four-way split
    for rank in range(2):
        stream = ShardStream(many, rank=rank, world_size=2, shuffle_buffer=4)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        keys = _keys(loader)
        assert len(keys) == len(set(keys)) == 12
        shard_of = {int(k[1:]) // 3 for k in keys}
        assert len(shard_of) == 4  # whole shards: 2 per worker


def test_stream_shuffles_reproducibly_and_resumes_without_repeats(many):
    from diffswap_igfi.data.stream import ShardStream, reader_position

    stream = ShardStream(many, seed=3, shuffle_buffer=5)
    first = _keys(stream)
    assert first == _keys(ShardStream(many, seed=3, shuffle_buffer=5))
    assert first != sorted(first) and sorted(first) == [f"s{j:08d}" for j in range(24)]
    stream.set_epoch(1)
    assert _keys(stream) != first  # another epoch, another order
    stream.set_position(0, 10)
    assert _keys(stream) == first[10:]
    # DataLoader workers take batches in turn: after 5 batches of 2 with 2 workers, worker 0
    # gave 3 batches, worker 1 gave 2
    assert [reader_position(5, 2, w, 2) for w in (0, 1)] == [6, 4]


def test_stream_memory_is_bounded_by_the_shuffle_buffer(many, monkeypatch):
    from diffswap_igfi.data import stream as module

    read = []
    original = module.read_tar

    def counting(path):
        for item in original(path):
            read.append(item[0])
            yield item

    monkeypatch.setattr(module, "read_tar", counting)
    it = iter(module.ShardStream(many, shuffle_buffer=4))
    next(it)
    assert len(read) == 5  # the buffer, plus the sample that pushed one out


def test_stream_wraps_round_its_shards_to_give_every_reader_the_same_count(many):
    from diffswap_igfi.data.stream import ShardStream

    keys = _keys(ShardStream(many, rank=0, world_size=8, samples_per_reader=5,
                             shuffle_buffer=2))
    assert len(keys) == 5 and len(set(keys)) == 3  # one shard of 3, read again


def test_stream_refuses_more_readers_than_shards_and_feeds_the_sfi_dataset(many):
    from diffswap_igfi.data.stream import ShardStream

    with pytest.raises(InputError, match="8 shards for 9 readers"):
        next(iter(ShardStream(many, rank=0, world_size=9)))
    dataset = SFIDataset(many, augment=AugmentConfig.off())
    stream = ShardStream(many, transform=dataset.make_sample)
    sample = next(iter(stream))
    assert sample["target"].shape == (3, CROP, CROP) and sample["geometry"].shape[0] == 7

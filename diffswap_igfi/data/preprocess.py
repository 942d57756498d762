"""``diffswap-igfi preprocess IN_DIR OUT_DIR``: photos -> aligned-face shards for SFI training.

Per photo: detect faces (largest first), keep the largest ``max_faces`` whose eyes are at least
``crop_size / 16`` px apart (smaller faces make blurry, useless crops), align each to the FFHQ
template, fit MediaPipe geometry to the face in crop coordinates, draw its face-oval mask and,
with an ArcFace model, embed its identity. Each face becomes one sample of a shard (see
``data.shards``).

The sorted file list is cut into fixed shards of ``shard_size`` files, so a shard's content
depends only on its files: a rerun skips every shard already complete with the same files and
settings, and a rebuilt shard is byte-identical. Photos that cannot be used are skipped and
listed in ``OUT_DIR/bad_files.tsv``; inputs are only ever read.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffswap_igfi.data.shards import (INDEX_FORMAT, INDEX_VERSION, TEMP_SUFFIX, ShardWriter,
                                       encode, read_index, shard_name, write_index)
from diffswap_igfi.errors import DiffSwapError, FaceNotFoundError, InputError
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.faces.landmarker import landmarker_model_path
from diffswap_igfi.faces.masks import region_mask
from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend
from diffswap_igfi.io.images import INPUT_EXTENSIONS, load_image

BAD_FILES_NAME = "bad_files.tsv"
NUM_MESH_POINTS = 468


@dataclass
class PreprocessReport:
    """What a run did. ``faces``: samples written by this run; ``samples``: in the dataset."""

    out_dir: Path
    files: int
    faces: int
    samples: int
    bad_files: int
    shards_written: int
    shards_skipped: int
    seconds: float

    def summary(self) -> str:
        return (f"{self.files} photo(s): {self.faces} face(s) written in {self.shards_written} "
                f"shard(s), {self.shards_skipped} complete shard(s) skipped, {self.bad_files} bad "
                f"file(s) (see {self.out_dir / BAD_FILES_NAME}); {self.samples} sample(s) in "
                f"{self.out_dir} ({self.seconds:.1f} s)")


def find_images(in_dir: Path) -> list[Path]:
    """Image files under ``in_dir`` (recursively, by extension), sorted by relative path;
    hidden files and folders are skipped."""
    found = []
    for root, dirs, names in os.walk(in_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in INPUT_EXTENSIONS:
                found.append(Path(root, name))
    return sorted(found, key=lambda p: p.relative_to(in_dir).as_posix())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class FaceProcessor:
    """Turns one photo into encoded shard samples. Builds its models once (one per process)."""

    def __init__(self, crop_size: int, max_faces: int, min_interocular: float,
                 arcface: str | None = None, encoder: Any = None) -> None:
        self.crop_size, self.max_faces, self.min_interocular = crop_size, max_faces, min_interocular
        self.detector = FaceDetector()
        self.backend = MediaPipeBackend()
        self.encoder = encoder if encoder is not None else load_identity_encoder(arcface)

    def __call__(self, job: tuple[int, str, str]) -> tuple[str, list[tuple[str, dict]], str]:
        """job: (file number, path, path relative to IN_DIR) -> (relative path,
        [(key, {field: bytes})], reason it was skipped or '')."""
        number, path, relative = job
        try:
            return relative, self._samples(number, Path(path), relative), ""
        except DiffSwapError as e:
            return relative, [], _one_line(str(e).replace(path, relative))
        except Exception as e:  # noqa: BLE001 - one odd photo must not end a long run
            return relative, [], _one_line(f"internal error ({type(e).__name__}: {e})")

    def _samples(self, number: int, path: Path, relative: str) -> list[tuple[str, dict]]:
        image = load_image(path)
        # The whole-photo pass finds the large faces training wants; the slow tile pass (for
        # small faces in photos over 640 px) runs only when that pass found too few.
        faces = self.detector.detect(image.rgb, tiles=False)
        if len(self._usable(faces)) < self.max_faces:
            faces = self.detector.detect(image.rgb)
        if not faces:
            raise FaceNotFoundError("no face found")
        usable = self._usable(faces)
        if not usable:
            biggest = max(f.interocular for f in faces)
            raise FaceNotFoundError(
                f"faces too small: the largest has {biggest:.1f} px between the eyes, under the "
                f"{self.min_interocular:g} px a {self.crop_size} px crop needs")
        size = self.crop_size
        samples = []
        for j, face in enumerate(usable):
            aligned = align_face(image.rgb, face.kps, size, "ffhq")
            in_crop = face.transformed(aligned.affine, (size, size))
            fit = self.backend.fit(None, in_crop)
            yaw, pitch, roll = face.pose
            sample = {
                "crop.png": aligned.crop,
                "landmarks.npy": in_crop.points[:NUM_MESH_POINTS].astype(np.float32),
                "kps.npy": in_crop.kps.astype(np.float32),
                "mask.png": region_mask(in_crop.points, (size, size), ("face",)),
                "geometry.npz": {"shape": fit.shape, "expression": fit.expression,
                                 "rotation": fit.rotation, "scale": np.float64(fit.scale),
                                 "translation": fit.translation},
                "meta.json": {"source": relative, "face": j,
                              "image_size": list(image.rgb.shape[:2]),
                              "pose": {"yaw": round(yaw, 4), "pitch": round(pitch, 4),
                                       "roll": round(roll, 4)},
                              "affine": np.asarray(aligned.affine).tolist()},
            }
            if self.encoder is not None:
                sample["identity.npy"] = np.asarray(self.encoder.embed(image.rgb, face), np.float32)
            samples.append((f"{number:08d}_{j:02d}", {k: encode(k, v) for k, v in sample.items()}))
        return samples

    def _usable(self, faces: list) -> list:
        """The largest ``max_faces`` faces big enough for a sharp crop."""
        return [f for f in faces if f.interocular >= self.min_interocular][: self.max_faces]

    def close(self) -> None:
        self.detector.close()


def load_identity_encoder(arcface: str | os.PathLike | None):
    """An ``embed(rgb, face) -> [512]`` encoder for ``arcface`` (an .onnx file or an insightface
    model-pack folder), or None without one."""
    if arcface is None:
        return None
    from diffswap_igfi.conditions.identity import ArcFaceONNX

    return ArcFaceONNX(arcface)


# A pool worker's own FaceProcessor, or why it could not be built (set once by the
# initializer, in that worker process only).
_WORKER: FaceProcessor | Exception | None = None


def _init_worker(settings: dict) -> None:
    global _WORKER
    try:
        _WORKER = FaceProcessor(**settings)
    except Exception as e:  # noqa: BLE001 - raised with the first job, as with workers=1
        _WORKER = e


def _run_in_worker(job: tuple[int, str, str]):
    if isinstance(_WORKER, Exception):
        raise _WORKER
    return _WORKER(job)


def _sources_digest(in_dir: Path, files: list[Path]) -> str:
    digest = hashlib.sha1()
    for path in files:
        digest.update(f"{path.relative_to(in_dir).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def preprocess(in_dir: str | os.PathLike, out_dir: str | os.PathLike, *, crop_size: int = 256,
               shard_size: int = 500, workers: int = 1, arcface: str | os.PathLike | None = None,
               max_faces: int = 1, min_interocular: float | None = None,
               progress: bool = True) -> PreprocessReport:
    """Build (or complete) the shards of OUT_DIR from the photos under IN_DIR (see the module
    doc); ``min_interocular`` defaults to crop_size / 16 px."""
    from tqdm import tqdm

    started = time.perf_counter()
    in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
    _check_positive(shard_size=shard_size, workers=workers, max_faces=max_faces)
    if crop_size < 64 or crop_size % 8:
        raise InputError(f"--crop-size must be a multiple of 8 and at least 64, got {crop_size}")
    if not in_dir.is_dir():
        raise InputError(f"no such folder: {in_dir}: check the path")
    files = find_images(in_dir)
    if not files:
        raise InputError(f"no images under {in_dir} (looked for "
                         f"{' '.join(sorted(INPUT_EXTENSIONS))}): check the folder")
    min_interocular = crop_size / 16 if min_interocular is None else float(min_interocular)
    settings = {"crop_size": crop_size, "shard_size": shard_size, "max_faces": max_faces,
                "min_interocular": min_interocular, "identity": arcface is not None}
    index = _open_index(out_dir, settings)
    chunks = [files[k:k + shard_size] for k in range(0, len(files), shard_size)]
    digests = [_sources_digest(in_dir, chunk) for chunk in chunks]
    entries = {e["name"]: e for e in index["shards"]}
    done = {k for k in range(len(chunks))
            if entries.get(shard_name(k), {}).get("sources") == digests[k]
            and (out_dir / shard_name(k)).is_file()}
    # Entries for shards that are redone or no longer exist (the input shrank) go first, so
    # the index never lists a shard that is being rewritten.
    index["shards"] = [entries[shard_name(k)] for k in sorted(done)]
    for stale in set(entries) - {shard_name(k) for k in range(len(chunks))}:
        (out_dir / stale).unlink(missing_ok=True)
    write_index(out_dir, index)

    todo = [k for k in range(len(chunks)) if k not in done]
    jobs = [(k * shard_size + n, str(path), path.relative_to(in_dir).as_posix())
            for k in todo for n, path in enumerate(chunks[k])]
    faces_written = 0
    if jobs:
        landmarker_model_path()  # fail fast, before any worker starts
        encoder = load_identity_encoder(arcface)
        worker_settings = {"crop_size": crop_size, "max_faces": max_faces,
                           "min_interocular": min_interocular,
                           "arcface": None if arcface is None else str(arcface)}
        bar = tqdm(total=len(jobs), desc="preprocess", unit="photo", disable=not progress,
                   file=sys.stderr)
        with bar:
            for k, entry in _write_shards(out_dir, todo, chunks, jobs, worker_settings, encoder,
                                          workers, bar):
                entry["sources"] = digests[k]
                faces_written += entry["samples"]
                index["shards"] = sorted(index["shards"] + [entry], key=lambda e: e["name"])
                write_index(out_dir, index)

    bad = sorted(item for e in index["shards"] for item in e["bad"])
    _write_bad_files(out_dir / BAD_FILES_NAME, bad)
    samples = sum(e["samples"] for e in index["shards"])
    if samples == 0:
        raise InputError(f"no usable face in any of the {len(files)} image(s) under {in_dir} "
                         f"(reasons in {out_dir / BAD_FILES_NAME}): use photos with clearly "
                         f"visible faces")
    return PreprocessReport(out_dir, len(files), faces_written, samples, len(bad), len(todo),
                            len(done), time.perf_counter() - started)


def _open_index(out_dir: Path, settings: dict) -> dict:
    """The existing index of OUT_DIR when made with the same settings, else a new one."""
    if not (out_dir / "index.json").exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shards": [], **settings}
    index = read_index(out_dir)
    differ = [f"{k} {index.get(k)} vs {v}" for k, v in settings.items() if index.get(k) != v]
    if differ:
        raise InputError(f"{out_dir} was preprocessed with other settings ({', '.join(differ)}): "
                         f"use the same options to resume, or a new output folder")
    return index


def _ordered(executor, function, jobs, window: int):
    """``map`` over a process pool, in order, with at most ``window`` jobs in flight."""
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(executor.submit(function, job))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # stopped early (an error, Ctrl-C): do not wait for work nobody will read
        for future in pending:
            future.cancel()


def _write_shards(out_dir, todo, chunks, jobs, worker_settings, encoder, workers, bar):
    """Process ``jobs`` in order (in a spawn pool when workers > 1) and write each shard of
    ``todo`` as its files come back. Yields (shard number, index entry) per finished shard."""
    with ExitStack() as stack:
        if workers > 1:
            # A worker that cannot start (or dies) breaks the executor, which then raises,
            # where multiprocessing.Pool would silently respawn it forever.
            pool = stack.enter_context(ProcessPoolExecutor(
                min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(worker_settings,)))
            results = _ordered(pool, _run_in_worker, jobs, 4 * workers)
            stack.callback(results.close)
        else:
            processor = FaceProcessor(**{**worker_settings, "arcface": None}, encoder=encoder)
            stack.callback(processor.close)
            results = map(processor, jobs)
        for k in todo:
            writer, bad = ShardWriter(out_dir / shard_name(k)), []
            try:
                for _ in chunks[k]:
                    relative, samples, reason = next(results)
                    for key, sample in samples:
                        writer.write(key, sample)
                    if reason:
                        bad.append([relative, reason])
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            count = writer.count
            writer.close()
            yield k, {"name": shard_name(k), "samples": count, "files": len(chunks[k]),
                      "bad": bad}


def _write_bad_files(path: Path, bad: list[list[str]]) -> None:
    temporary = path.with_name(path.name + TEMP_SUFFIX)
    lines = [f"{_one_line(p).replace(chr(9), ' ')}\t{reason}\n" for p, reason in bad]
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------ CLI
def add_preprocess_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``diffswap-igfi preprocess`` on ``parser`` (a subcommand's parser)."""
    parser.add_argument("in_dir", metavar="IN_DIR", help="folder of photos (searched recursively)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the shards (resumable)")
    parser.add_argument("--crop-size", type=int, default=256,
                        help="aligned crop side (default 256)")
    parser.add_argument("--shard-size", type=int, default=500,
                        help="photos per shard (default 500)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--arcface", metavar="PATH",
                        help="ArcFace ONNX file or insightface model-pack folder: store identities")
    parser.add_argument("--max-faces", type=int, default=1,
                        help="faces per photo, largest first (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_preprocess(args: argparse.Namespace) -> int:
    """Run ``preprocess`` from parsed arguments; prints one summary line. DiffSwapErrors pass
    through for the CLI to print."""
    report = preprocess(args.in_dir, args.out_dir, crop_size=args.crop_size,
                        shard_size=args.shard_size, workers=args.workers, arcface=args.arcface,
                        max_faces=args.max_faces, progress=not args.quiet)
    print(report.summary())
    return 0

"""Training data readers: samples/s per worker and memory per process, on a 5,000-sample set.

Run: python bench/bench_data.py [--samples 5000] [--crop-size 128] [--measure 300] [--workers 2]
    [--shuffle-buffer 256]

The data set is made here, from the photos that ship with our dependencies: they are
preprocessed (``diffswap-igfi preprocess``, 9 faces), then jittered into ``--samples`` samples in
shards of 500 (``data.synthetic.augmented_shards``). Each reader then runs in a fresh process
that reports its samples/s over ``--measure`` samples (after 20 of warm-up) and its peak RSS
above what the imports take (``ru_maxrss``; with DataLoader workers, the largest worker's):

- index raw / index sfi: ``ShardIndex`` random access (raw decoded samples) and ``SFIDataset``
  (the full training sample: reference augmentation, ArcFace crop, masks, heatmaps);
- stream raw / stream sfi: ``ShardStream`` (sequential tar reads through the shuffle buffer)
  without and with the same SFI transform;
- stream sfi xW: the same through a DataLoader with W workers (samples/s given per worker).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path

WARMUP = 20


def make_data(root: Path, samples: int, crop_size: int) -> Path:
    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess
    from diffswap_igfi.data.synthetic import augmented_shards

    main(["samples", str(root / "photos")])
    preprocess(root / "photos", root / "faces", crop_size=crop_size, max_faces=6,
               progress=False)
    return augmented_shards(root / "faces", root / "data", samples=samples, shard_size=500)


def _imports():
    import numpy as np
    import torch

    from diffswap_igfi.data.dataset import SFIDataset
    from diffswap_igfi.data.shards import ShardIndex
    from diffswap_igfi.data.stream import ShardStream

    return np, torch, SFIDataset, ShardIndex, ShardStream


def _iterate(kind: str, data: Path, buffer: int, workers: int):
    np, torch, SFIDataset, ShardIndex, ShardStream = _imports()
    torch.set_num_threads(1)
    if kind.startswith("index"):
        reader = ShardIndex(data) if kind == "index raw" else SFIDataset(data)
        order = np.random.default_rng(0).permutation(len(reader))
        return (reader[int(i)] for i in order)
    transform = SFIDataset(data).make_sample if "sfi" in kind else None
    stream = ShardStream(data, shuffle_buffer=buffer, transform=transform)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return iter(loader)


def _child(kind: str, data: str, measure: int, buffer: int, workers: int, out) -> None:
    _imports()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    it = _iterate(kind, Path(data), buffer, workers)
    for _ in range(WARMUP):
        next(it)
    start = time.perf_counter()
    for _ in range(measure):
        next(it)
    seconds = time.perf_counter() - start
    del it  # ends the DataLoader workers, so their peak RSS is counted below
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.send((measure / seconds, own - base, children - base))


def run(kind: str, data: Path, measure: int, buffer: int, workers: int = 0
        ) -> tuple[float, float, float]:
    """(samples/s, peak RSS MB above the imports of the process, of its largest worker) in
    a fresh process."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(kind, str(data), measure, buffer, workers,
                                               send))
    process.start()
    result = receive.recv()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--measure", type=int, default=300, help="samples timed per reader")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep the data set here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        start = time.perf_counter()
        data = make_data(root, args.samples, args.crop_size)
        size = sum(p.stat().st_size for p in data.glob("*.tar")) / 2**20
        print(f"data set: {args.samples} samples at {args.crop_size}px in "
              f"{len(list(data.glob('*.tar')))} shards, {size:.0f} MB, made in "
              f"{time.perf_counter() - start:.0f} s")
        print(f"shuffle buffer {args.shuffle_buffer}; RSS: peak MB above the imports (torch, "
              f"cv2, ...), measured in a fresh process per reader")
        print(f"{'reader':<16} {'samples/s':>10} {'per worker':>11} {'RSS MB':>8} "
              f"{'worker RSS MB':>14}")
        rows = [("index raw", 0), ("stream raw", 0), ("index sfi", 0), ("stream sfi", 0)]
        if args.workers:
            rows.append((f"stream sfi x{args.workers}", args.workers))
        for kind, workers in rows:
            rate, own, child = run(kind.split(" x")[0], data, args.measure,
                                   args.shuffle_buffer, workers)
            per = rate / max(1, workers)
            print(f"{kind:<16} {rate:>10.1f} {per:>11.1f} {own:>8.0f} "
                  f"{child if workers else float('nan'):>14.0f}")
        if args.keep:
            shutil.copytree(data, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

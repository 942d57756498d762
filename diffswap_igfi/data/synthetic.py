"""Large synthetic shard sets from a small preprocessed one, for benchmarks and reader tests.

``augmented_shards`` writes ``samples`` samples to ``out_dir`` in the layout of
``diffswap-igfi preprocess``: sample ``j`` is source sample ``j % n`` with its crop
colour-jittered, brightness-shifted and noised (seeded by ``j``); landmarks, keypoints, mask
and geometry are the source's, so every sample stays consistent. Used on the photos that ship
with our dependencies, it gives a data set of realistic size and bytes without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffswap_igfi.data.shards import (INDEX_FORMAT, INDEX_VERSION, ShardIndex, ShardWriter,
                                       shard_name, write_index)


def jitter(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[H,W,3] uint8 -> the same face with other colours, brightness and sensor noise."""
    image = crop.astype(np.float32)
    image = image * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-25, 25)
    image += rng.normal(0.0, 4.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def augmented_shards(source_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     samples: int, shard_size: int = 500, seed: int = 0) -> Path:
    """Write ``samples`` jittered copies of ``source_dir``'s samples to ``out_dir``."""
    source = ShardIndex(source_dir)
    originals = [source[i] for i in range(len(source))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, samples, shard_size):
        name = shard_name(len(shards))
        count = min(shard_size, samples - first)
        with ShardWriter(out / name) as writer:
            for j in range(first, first + count):
                original = originals[j % len(originals)]
                rng = np.random.default_rng([seed, j])
                writer.write(f"s{j:08d}", {
                    "crop.png": jitter(original["crop"], rng),
                    "landmarks.npy": original["landmarks"],
                    "kps.npy": original["kps"],
                    "mask.png": original["mask"],
                    "geometry.npz": original["geometry"],
                    "meta.json": {**original["meta"], "synthetic_of": original["__key__"]},
                })
        shards.append({"name": name, "samples": count, "bad": [], "files": 0,
                       "sources": "synthetic"})
    write_index(out, {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                      "crop_size": source.crop_size, "identity": False,
                      "shard_size": shard_size, "shards": shards})
    return out

"""JR-Net forward time on this machine, full-size config, with and without component dictionaries.

Run: python bench/bench_jr.py [--sizes 256 512] [--repeats 3] [--device cpu]
- JRNet(): base 64 channels, 8 AdaIN residual blocks, upscale 2 (256 -> 512, 512 -> 1024).
- Dictionary: the default ComponentDictionary (64 atoms per component and scale, patches 32/48,
  seeded random encoder 64/128 channels) with random atoms: matching costs the same as with built
  ones. Landmarks come from a real shipped face (astronaut) preprocessed at 512 px.
Prints the median (and min) of ``repeats`` timed forwards after one warm-up, batch 1, no
gradients; the variants are interleaved so that other load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffswap_igfi.data.dataset import to_tensor_image
from diffswap_igfi.data.preprocess import preprocess
from diffswap_igfi.data.shards import ShardIndex
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.jr import ComponentDictionary, JRNet


def real_face(size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(crop [1,3,size,size] in [-1,1], landmarks [1,468,2]) of the astronaut."""
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "in"
        photos.mkdir()
        (photos / "astronaut.png").write_bytes(sample_path("astronaut").read_bytes())
        preprocess(photos, Path(tmp) / "data", crop_size=size, progress=False)
        sample = ShardIndex(Path(tmp) / "data")[0]
    return to_tensor_image(sample["crop"])[None], torch.from_numpy(sample["landmarks"])[None]


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median, min) seconds over ``repeats`` calls after one warm-up each. The calls
    are interleaved, so load from other processes hits every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = JRNet().to(args.device).eval()
    dictionary = ComponentDictionary()
    for name, buffer in dictionary.named_buffers():
        if name.startswith("atoms_"):
            buffer.normal_()
    dictionary.to(args.device).eval()
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"JRNet default config: {params:.1f} M parameters, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    crop, landmarks = real_face(512)
    for size in args.sizes:
        swap = F.interpolate(crop, size=(size, size), mode="area").to(args.device)
        points = (landmarks * size / 512).to(args.device)
        identity = F.normalize(torch.randn(1, 512, device=args.device))
        residual = torch.zeros_like(swap)
        with torch.no_grad():
            t = timed({"plain": lambda: net(swap, residual, identity, swap),
                       "fused": lambda: net(swap, residual, identity, swap, points, dictionary),
                       "match": lambda: dictionary.match_faces(swap, points)}, args.repeats)
        print(f"{size:4d} -> {size * net.config.upscale:4d} px: without dictionary "
              f"{t['plain'][0]:7.3f} s (min {t['plain'][1]:.3f}), with dictionary "
              f"{t['fused'][0]:7.3f} s (min {t['fused'][1]:.3f}); matching alone "
              f"{t['match'][0]:.3f} s; median of {args.repeats}")

if __name__ == "__main__":
    main()

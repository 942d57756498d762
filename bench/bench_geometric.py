"""Median seconds per geometric swap of a 512x512 pair, models loaded, by stage.

Run: python bench/bench_geometric.py [--repeats 20]
Target (issue 3): 0.3 s or less per swap on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
from diffswap_igfi.provenance.write import write_synthetic_image


def square_512(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = (h - 512) // 2, (w - 512) // 2
    return np.ascontiguousarray(rgb[top:top + 512, left:left + 512])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    target = square_512(load_image(sample_path("astronaut")).rgb)
    source = square_512(load_image(sample_path("grace_hopper")).rgb)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("detect x2", "engine", "swap total", "write (wm+meta+png)")}
    with FaceDetector() as detector, tempfile.TemporaryDirectory() as tmp:
        for blend in ("laplacian", "poisson", "alpha"):
            engine = GeometricSwapper(blend=blend)
            detector.detect(target)  # warm-up: graph start
            per = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                tf = detector.detect(target)[0]
                sf = detector.detect(source)[0]
                t1 = time.perf_counter()
                out, alpha = engine.swap_one(target, tf, source, sf)
                t2 = time.perf_counter()
                per.append(t2 - t0)
                if blend == "laplacian":
                    times["detect x2"].append(t1 - t0)
                    times["engine"].append(t2 - t1)
                    times["swap total"].append(t2 - t0)
                    t3 = time.perf_counter()
                    write_synthetic_image(Path(tmp) / f"o{i}.png", out, alpha > 0,
                                          digital_source_type=COMPOSITE_SYNTHETIC,
                                          engine="geometric")
                    times["write (wm+meta+png)"].append(time.perf_counter() - t3)
            print(f"blend={blend:9s} median swap {statistics.median(per):.3f} s "
                  f"(min {min(per):.3f}, max {max(per):.3f}, n={len(per)})")
    print("\nlaplacian blend, by stage (median seconds):")
    for stage, values in times.items():
        print(f"  {stage:22s} {statistics.median(values):.4f}")
    total = statistics.median(times["swap total"])
    print(f"\nmedian seconds per 512x512 swap (detect both + engine): {total:.3f} "
          f"(target <= 0.3: {'met' if total <= 0.3 else 'NOT met'})")


if __name__ == "__main__":
    main()

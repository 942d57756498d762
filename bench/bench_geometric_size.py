"""Does the geometric engine's cost depend on the size of the face? Seconds per swap of the same
face in 1000x1000, 2000x2000 and 3000x3000 photos, in one run.

The astronaut's face is cut out square and upscaled to N x N px (the face's mesh box is then about
0.6 N); its landmarks are scaled with it (no re-detection, so every size swaps the same face).
Grace Hopper is the source, prepared once. Times the engine (``swap_one``) and, with --detect,
the detector on the same photo.

Run: python bench/bench_geometric_size.py [--repeats 3] [--detect]
Target (issue 13): the 3000x3000 face under 3x the time of the 1000x1000 one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path


def scaled_face_photo(rgb: np.ndarray, face, side: int):
    """A square around the face (its box is 0.6 of the side), scaled to ``side`` x ``side`` px:
    (photo, face)."""
    x0, y0, x1, y1 = face.box
    cx, cy = face.center
    half = max(x1 - x0, y1 - y0) / 0.6 / 2
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = int(min(rgb.shape[1], cx + half)), int(min(rgb.shape[0], cy + half))
    size = (side, side)
    photo = cv2.resize(rgb[top:bottom, left:right], size, interpolation=cv2.INTER_CUBIC)
    affine = np.array([[size[0] / (right - left), 0, -left * size[0] / (right - left)],
                       [0, size[1] / (bottom - top), -top * size[1] / (bottom - top)]])
    return photo, face.transformed(affine, photo.shape[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--detect", action="store_true", help="also time detection")
    args = parser.parse_args()
    target = load_image(sample_path("astronaut")).rgb
    source = load_image(sample_path("grace_hopper")).rgb
    with FaceDetector() as detector:
        t_face, s_face = detector.detect(target)[0], detector.detect(source)[0]
        engine = GeometricSwapper()
        prepared = engine.prepare_source(source, s_face)
        medians = {}
        for side in (1000, 2000, 3000):
            photo, face = scaled_face_photo(target, t_face, side)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out, alpha = engine.swap_one(photo, face, prepared)
                times.append(time.perf_counter() - t0)
            assert np.array_equal(out[alpha == 0], photo[alpha == 0])
            medians[side] = statistics.median(times)
            line = (f"photo {photo.shape[1]}x{photo.shape[0]}: engine "
                    f"{medians[side]:.3f} s")
            if args.detect:
                t0 = time.perf_counter()
                found = detector.detect(photo)
                line += f", detect {time.perf_counter() - t0:.2f} s ({len(found)} face(s))"
            print(line)
    ratio = medians[3000] / medians[1000]
    print(f"3000x3000 / 1000x1000 engine time: {ratio:.2f}x (target < 3x: "
          f"{'met' if ratio < 3 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Watermark robustness on real swaps of the shipped photos, false alarms on untouched ones.

Run ``python bench/bench_watermark.py [--quick]``. It swaps (geometric engine) every source
photo onto every target photo (all faces of the group photo), writes each through
``write_synthetic_image`` (face mark + block mark + metadata + C2PA), and reports, for each
transformation, the share of swapped images in which the face mark, the block mark, and either
of them is detected; then the PSNR of the marked faces (both marks, and the face mark alone);
then false positives of both marks on the untouched photos and all their transformed versions;
then a short video: a pan/zoom over a target, every frame swapped and marked, H.264 CRF 28,
read back frame by frame (clip verdict), and the same for the untouched clip (every frame).
The tables are printed; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path
from diffswap_igfi.provenance import face_mark
from diffswap_igfi.provenance.attacks import ATTACKS, h264, jpeg, pan_zoom, png, resize
from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
from diffswap_igfi.provenance.verify import detect_faces_for_mark
from diffswap_igfi.provenance.video_mark import clip_payload, detect_clip, mark_frame
from diffswap_igfi.provenance.watermark import detect_watermark, embed_watermark
from diffswap_igfi.provenance.write import write_synthetic_image
from diffswap_igfi.swapper import FaceSelection, Swapper

SOURCES = ("grace_hopper", "astronaut", "tom_hanks")
TARGETS = ("astronaut", "grace_hopper", "group")


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    mse = np.mean((a[region].astype(np.float64) - b[region].astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def make_swaps(folder: Path, quick: bool) -> list[dict]:
    """Swap every source onto every target; returns dicts with the written file and facts."""
    swaps = []
    with Swapper() as swapper:
        sources = {n: swapper.source(load_image(sample_path(n))) for n in SOURCES}
        for target_name in TARGETS[:2] if quick else TARGETS:
            target = load_image(sample_path(target_name))
            selector = "all" if target_name == "group" else "largest"
            for source_name in SOURCES:
                if source_name == target_name:
                    continue
                result = swapper.swap([sources[source_name]], target, FaceSelection(selector))
                region = result.alpha > 0
                out = folder / f"{source_name}_on_{target_name}.png"
                write_synthetic_image(out, result.image, region,
                                      digital_source_type=COMPOSITE_SYNTHETIC,
                                      engine="geometric", faces=result.faces,
                                      parent_path=sample_path(target_name),
                                      detector=swapper.detector)
                kps = [face_mark.reader_kps(result.image, f.kps, swapper.detector)
                       for f in result.faces]
                face_only = face_mark.embed_face_mark(
                    result.image, kps, region, key=face_mark_key(),
                    payload=face_mark.payload_for(result.image))
                swaps.append({"name": out.stem, "path": out, "unmarked": result.image,
                              "region": region, "faces": result.faces,
                              "face_only": face_only})
    return swaps


def face_mark_key() -> int:
    from diffswap_igfi.provenance.keys import watermark_key

    return watermark_key()


def robustness(swaps: list[dict], detector: FaceDetector, verbose: bool = False) -> None:
    print(f"\nDetection on {len(swaps)} swapped images (geometric engine; "
          f"faces {', '.join(str(round(min(f.interocular for f in s['faces']))) for s in swaps)}"
          " px between the eyes, smallest face per image)")
    header = f"{'transformation':14} {'face mark':>10} {'block mark':>11} {'either':>8}  face z (min/median)"
    print(header)
    print("-" * len(header))
    for label, attack in ATTACKS.items():
        face_hits = block_hits = either = 0
        scores = []
        for swap in swaps:
            written = np.asarray(Image.open(swap["path"]).convert("RGB"))
            image = attack(written)
            fm = detect_faces_for_mark(image, detector=detector)
            bm = detect_watermark(image)
            face_hits += fm.found
            block_hits += bm.found
            either += fm.found or bm.found
            scores.append(fm.score if fm.faces else 0.0)
        n = len(swaps)
        print(f"{label:14} {100 * face_hits / n:9.0f}% {100 * block_hits / n:10.0f}% "
              f"{100 * either / n:7.0f}%  {min(scores):5.1f} / {np.median(scores):5.1f}"
              + ("  [" + " ".join(f"{z:.1f}" for z in scores) + "]" if verbose else ""))
    print(f"(face-mark threshold {face_mark.threshold():.2f}, a false alarm <= 1e-6 per face)")


def face_size_sweep(swaps: list[dict], detector: FaceDetector) -> None:
    """Shrink the swaps with the largest faces until the face mark is lost: the smallest face
    (eye distance in the file being checked) it can be read from, lossless and after JPEG."""
    big = sorted(swaps, key=lambda s: -min(f.interocular for f in s["faces"]))[:2]
    sizes = (16, 20, 24, 28, 32, 36, 40, 48, 64)
    print(f"\nFace mark vs face size in the checked file (eye distance, px), "
          f"{' and '.join(s['name'] for s in big)}: z per image (+ = found)")
    print(f"{'eye distance':12}" + "".join(f"{d:>12}" for d in sizes))
    for label, codec in (("PNG", png), ("JPEG q90", lambda x: jpeg(x, 90)),
                         ("JPEG q75", lambda x: jpeg(x, 75))):
        cells = []
        for size in sizes:
            zs = []
            for swap in big:
                written = np.asarray(Image.open(swap["path"]).convert("RGB"))
                scale = size / max(f.interocular for f in swap["faces"])
                result = detect_faces_for_mark(codec(resize(written, scale,
                                                            Image.Resampling.LANCZOS)),
                                               detector=detector)
                zs.append(f"{result.score:.1f}{'+' if result.found else ' '}")
            cells.append("/".join(zs))
        print(f"{label:12}" + "".join(f"{c:>12}" for c in cells))


def quality(swaps: list[dict]) -> None:
    print("\nPSNR inside the swapped region (dB)")
    print(f"{'image':28} {'both marks':>10} {'face mark':>10} {'block mark':>11}")
    for swap in swaps:
        written = np.asarray(Image.open(swap["path"]).convert("RGB"))
        block_only = embed_watermark(swap["unmarked"], swap["region"])
        print(f"{swap['name']:28} {psnr(written, swap['unmarked'], swap['region']):10.1f} "
              f"{psnr(swap['face_only'], swap['unmarked'], swap['region']):10.1f} "
              f"{psnr(block_only, swap['unmarked'], swap['region']):11.1f}")


def false_alarms(detector: FaceDetector) -> None:
    faces_checked = face_hits = images = block_hits = 0
    worst = -math.inf
    for name in ("astronaut", "grace_hopper", "group", "tom_hanks"):
        rgb = load_image(sample_path(name)).rgb
        for attack in ATTACKS.values():
            image = attack(rgb)
            fm = detect_faces_for_mark(image, detector=detector)
            images += 1
            faces_checked += len(fm.faces)
            face_hits += fm.found
            block_hits += detect_watermark(image).found
            worst = max([worst, *fm.faces])
    print(f"\nFalse positives on the 4 untouched photos x {len(ATTACKS)} transformations "
          f"({images} images, {faces_checked} faces read): face mark {face_hits}, block mark "
          f"{block_hits}; highest face z {worst:.2f} (threshold {face_mark.threshold():.2f})")


def video(detector: FaceDetector, n: int) -> None:
    clean = pan_zoom(load_image(sample_path("grace_hopper")).rgb, n)
    marked, payload = [], None
    start = time.perf_counter()
    with Swapper() as swapper:
        source = swapper.source(load_image(sample_path("astronaut")))
        for frame in clean:
            target = dataclasses.replace(load_image(sample_path("grace_hopper")), rgb=frame)
            result = swapper.swap([source], target)
            payload = payload or clip_payload(result.image)
            marked.append(mark_frame(result.image, result.faces, result.alpha > 0,
                                     payload=payload, detector=swapper.detector))
    swap_s = time.perf_counter() - start
    for crf in (23, 28):
        decoded = h264(marked, crf)
        result = detect_clip(decoded, detector=detector, expect=payload)
        print(f"\nvideo, {n} frames 512x512 (astronaut onto grace_hopper, pan/zoom), H.264 CRF "
              f"{crf}: {result.summary()}; per-frame z min/median "
              f"{min(s for s in result.scores if s is not None):.1f}/"
              f"{np.median([s for s in result.scores if s is not None]):.1f}")
    untouched = detect_clip(h264(clean, 28), detector=detector)
    flagged = sum(s is not None and s >= face_mark.threshold() for s in untouched.scores)
    print(f"untouched clip, H.264 CRF 28: {untouched.summary()}; frames over the image "
          f"threshold: {flagged} of {untouched.frames}; highest z "
          f"{max(s for s in untouched.scores if s is not None):.2f}")
    print(f"(swapping + marking {n} frames took {swap_s:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer swaps and video frames")
    parser.add_argument("--only-images", action="store_true", help="skip false alarms, video")
    parser.add_argument("--verbose", action="store_true", help="face z of every image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DIFFSWAP_IGFI_CONFIG_DIR", str(Path(tmp) / "config"))
        swaps = make_swaps(Path(tmp), args.quick)
        with FaceDetector() as detector:
            robustness(swaps, detector, args.verbose)
            face_size_sweep(swaps, detector)
            quality(swaps)
            if not args.only_images:
                false_alarms(detector)
                video(detector, 12 if args.quick else 24)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

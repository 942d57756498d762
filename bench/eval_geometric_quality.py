"""Acceptance figures of the geometric engine on the photos that ship with our dependencies.

- Same person: each single-face photo is swapped onto itself from a changed copy (mirrored,
  rescaled, re-lit with a side gradient, colour-shifted, made greyscale, or turned 15 degrees
  by re-rendering its 3D mesh); the face-region SSIM of the output against the original
  (1 = perfect).
- Distinct people: every ordered pair of the 9 identities (astronaut, Grace Hopper, Tom Hanks,
  the six people of the group photo); fraction of outputs closer (dlib) to the source than to
  the target, and the median dlib distance to the source.
- Colour leak: share of off-tone face pixels (chroma far from the target's own skin, see
  ``off_tone_share``) in the output minus the same share in the target.
- Far pixels: pixels farther than half a face from the face box must be unchanged.

Run: python bench/eval_geometric_quality.py [--grid docs/]   (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from diffswap_igfi.engines.geometric import GeometricSwapper
from diffswap_igfi.eval.recognizer import DlibRecognizer
from diffswap_igfi.faces import masks, mesh
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path

NAMES = ("astronaut", "grace_hopper", "tom_hanks", "group")


def reposed(rgb: np.ndarray, face, yaw_degrees: float) -> np.ndarray:
    """The photo with the face turned by ``yaw_degrees`` about its own centre: every mesh
    triangle's texture moved to where the rotated mesh projects it (nearest surface wins);
    outside the mesh the photo is unchanged. [H,W,3] uint8."""
    from diffswap_igfi.geometry.canonical import canonical_face

    _, triangles = canonical_face()
    lm = face.landmarks[:468].astype(np.float64)
    cam = mesh.camera_space(lm)
    centre = cam.mean(0)
    t = np.radians(yaw_degrees)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    turned = ((cam - centre) @ rot.T + centre) * np.array([1.0, -1.0, -1.0])
    index = mesh.raster_index(turned[:, :2], triangles, rgb.shape[:2], depth=turned[:, 2])
    field = mesh.interpolate(turned[:, :2], triangles, lm[:, :2], index)
    warped = cv2.remap(rgb, field[..., 0], field[..., 1], cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    return np.where((index >= 0)[..., None], warped, rgb)


def variants(rgb: np.ndarray, face) -> dict[str, np.ndarray]:
    """Changed copies of one photo: the same person under other conditions. [H,W,3] uint8."""
    h, w = rgb.shape[:2]
    f = rgb.astype(np.float32)
    ramp = np.linspace(0.55, 1.25, w, dtype=np.float32)[None, :, None]
    grey = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    small = cv2.resize(rgb, (w * 2 // 3, h * 2 // 3), interpolation=cv2.INTER_AREA)
    return {
        "mirrored": rgb[:, ::-1].copy(),
        "relit": np.clip(f * ramp, 0, 255).astype(np.uint8),
        "warm tint": np.clip(f * np.array([1.15, 1.0, 0.8], np.float32), 0, 255).astype(np.uint8),
        "greyscale": grey,
        "smaller, mirrored": small[:, ::-1].copy(),
        "turned 15 degrees": reposed(rgb, face, 15.0),
        "turned -15, relit": np.clip(reposed(rgb, face, -15.0) * ramp[:, ::-1], 0, 255
                                     ).astype(np.uint8),
    }


def face_ssim(a: np.ndarray, b: np.ndarray, face) -> float:
    """Mean SSIM (grey levels) over the target's face oval."""
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    _, smap = structural_similarity(ga, gb, full=True, data_range=255)
    oval = masks.region_mask(face.points, ga.shape, ("face",)) > 0
    return float(smap[oval].mean())


def off_tone_share(rgb: np.ndarray, reference: np.ndarray, face) -> float:
    """Share of skin pixels (face oval less eyes, brows, lips) whose Lab chroma lies more than
    4 robust deviations (and at least 8 units) from ``reference``'s median skin chroma."""
    shape = rgb.shape[:2]
    skin = masks.erode(masks.region_mask(face.points, shape, ("face",)), 3) > 0
    skin &= masks.dilate(masks.region_mask(face.points, shape, (
        "left_eye", "right_eye", "left_brow", "right_brow", "lips")), 3) == 0
    ref_ab = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB)[..., 1:].astype(np.float32)[skin]
    ab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[..., 1:].astype(np.float32)[skin]
    centre = np.median(ref_ab, axis=0)
    ref_d = np.linalg.norm(ref_ab - centre, axis=1)
    limit = max(8.0, np.median(ref_d) + 4 * 1.4826 * np.median(np.abs(ref_d - np.median(ref_d))))
    return float((np.linalg.norm(ab - centre, axis=1) > limit).mean())


def far_unchanged(out: np.ndarray, target: np.ndarray, face) -> bool:
    x0, y0, x1, y1 = face.box
    m = 0.5 * max(x1 - x0, y1 - y0)
    far = np.ones(target.shape[:2], bool)
    far[int(max(0, y0 - m)):int(y1 + m), int(max(0, x0 - m)):int(x1 + m)] = False
    return bool(np.array_equal(out[far], target[far]))


def crop_around(rgb: np.ndarray, face, side: int = 128) -> np.ndarray:
    x0, y0, x1, y1 = face.box
    cx, cy = face.center
    half = 0.75 * max(x1 - x0, y1 - y0)
    pad = int(half) + 2
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    l, t = int(cx - half) + pad, int(cy - half) + pad
    return cv2.resize(padded[t:t + int(2 * half), l:l + int(2 * half)], (side, side),
                      interpolation=cv2.INTER_AREA)


def save_grid(path: Path, rows: list[list[np.ndarray]], header: str) -> None:
    body = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    top = np.full((22, body.shape[1], 3), 255, np.uint8)
    cv2.putText(top, header, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    from PIL import Image  # a 256-colour palette keeps the PNGs small enough for the README

    Image.fromarray(np.concatenate([top, body])).quantize(256, dither=Image.Dither.NONE).save(
        path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=None, help="write before/after grids here")
    parser.add_argument("--shape-transfer", action="store_true", help="measure with it on")
    args = parser.parse_args()
    photos = {n: load_image(sample_path(n)).rgb for n in NAMES}
    engine = GeometricSwapper(shape_transfer=1.0 if args.shape_transfer else 0.0)
    recognizer = DlibRecognizer()
    with FaceDetector() as detector:
        faces = {n: detector.detect(photos[n]) for n in NAMES}
        people = [(n, i) for n in NAMES for i in range(len(faces[n]))]
        # same person
        ssims, same_rows = [], []
        for name in ("astronaut", "grace_hopper", "tom_hanks"):
            target, t_face = photos[name], faces[name][0]
            for label, src in variants(target, t_face).items():
                found = detector.detect(src)
                if not found:
                    print(f"  {name} {label}: no face found in the variant")
                    continue
                out, _ = engine.swap_one(target, t_face, src, found[0])
                ssims.append(face_ssim(out, target, t_face))
                same_rows.append([crop_around(src, found[0]), crop_around(target, t_face),
                                  crop_around(out, t_face)])
                print(f"  same person {name:12s} from {label:18s}: face SSIM {ssims[-1]:.3f}")
        # distinct people
        desc = {p: recognizer.describe(photos[p[0]], faces[p[0]][p[1]]) for p in people}
        wins, to_src, leaks, far_ok, rows = [], [], [], [], []
        for s in people:
            prepared = engine.prepare_source(photos[s[0]], faces[s[0]][s[1]])
            for t in people:
                if s == t or s[0] == t[0] and s[0] != "group":
                    continue
                target, t_face = photos[t[0]], faces[t[0]][t[1]]
                out, _ = engine.swap_one(target, t_face, prepared)
                d = recognizer.describe(out, t_face)
                ds, dt = recognizer.distance(d, desc[s]), recognizer.distance(d, desc[t])
                wins.append(ds < dt)
                to_src.append(ds)
                leaks.append(off_tone_share(out, target, t_face)
                             - off_tone_share(target, target, t_face))
                far_ok.append(far_unchanged(out, target, t_face))
                if t[0] != "group" and s[1] == 0 or (s[0] != "group" and t == ("group", 0)):
                    rows.append([crop_around(photos[s[0]], faces[s[0]][s[1]]),
                                 crop_around(target, t_face), crop_around(out, t_face)])
    print(f"same person: median face SSIM {statistics.median(ssims):.3f} over {len(ssims)} "
          f"swaps (min {min(ssims):.3f})")
    print(f"distinct people: {sum(wins)}/{len(wins)} closer to the source "
          f"({100 * sum(wins) / len(wins):.1f}%), median dlib distance to the source "
          f"{statistics.median(to_src):.3f}")
    print(f"colour leak: off-tone share above the target's own, median "
          f"{100 * statistics.median(leaks):+.2f}%, 90th percentile "
          f"{100 * float(np.percentile(leaks, 90)):+.2f}%")
    print(f"far pixels unchanged on {sum(far_ok)}/{len(far_ok)} swaps")
    if args.grid:
        args.grid.mkdir(parents=True, exist_ok=True)
        save_grid(args.grid / "geometric_same_person.png", same_rows[::2],
                  "same person: changed copy (source) | original (target) | swap")
        save_grid(args.grid / "geometric_distinct.png", rows[:8],
                  "distinct people: source | target | swap")


if __name__ == "__main__":
    main()

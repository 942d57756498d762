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

Held-out figures: the same measures over the pairs whose source is one of the last four
faces (people 5-8), which no engine setting was tuned on.

Run: python bench/eval_geometric_quality.py [--grid docs/] [--no-shape-transfer]
     python bench/eval_geometric_quality.py --compare   (before/after: shape transfer off
     and on, one table; about a minute on 2 idle cores)
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


HELD_OUT = 5  # people[5:] (the group photo's last four faces): sources for the held-out figures


def evaluate(engine: GeometricSwapper, photos: dict, faces: dict, detector, recognizer,
             log: bool = True) -> tuple[dict, list, list]:
    """All figures for one engine setting. Returns (figures, same-person grid rows, distinct
    grid rows); figures holds lists per swap: ssim, and per distinct pair (source index,
    target index, distance to source, distance to target, off-tone excess, far unchanged)."""
    people = [(n, i) for n in NAMES for i in range(len(faces[n]))]
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
            if log:
                print(f"  same person {name:12s} from {label:18s}: face SSIM {ssims[-1]:.3f}")
    desc = {p: recognizer.describe(photos[p[0]], faces[p[0]][p[1]]) for p in people}
    pairs, rows = [], []
    for si, s in enumerate(people):
        prepared = engine.prepare_source(photos[s[0]], faces[s[0]][s[1]])
        for ti, t in enumerate(people):
            if s == t or s[0] == t[0] and s[0] != "group":
                continue
            target, t_face = photos[t[0]], faces[t[0]][t[1]]
            out, _ = engine.swap_one(target, t_face, prepared)
            d = recognizer.describe(out, t_face)
            pairs.append((si, ti, recognizer.distance(d, desc[s]),
                          recognizer.distance(d, desc[t]),
                          off_tone_share(out, target, t_face)
                          - off_tone_share(target, target, t_face),
                          far_unchanged(out, target, t_face)))
            if t[0] != "group" and s[1] == 0 or (s[0] != "group" and t == ("group", 0)):
                rows.append([crop_around(photos[s[0]], faces[s[0]][s[1]]),
                             crop_around(target, t_face), crop_around(out, t_face)])
    return {"ssim": ssims, "pairs": pairs}, same_rows, rows


def identity(pairs: list) -> str:
    """'wins/n (pct%), median d' over distinct pairs (see ``evaluate``)."""
    wins = sum(p[2] < p[3] for p in pairs)
    return (f"{wins}/{len(pairs)} ({100 * wins / len(pairs):.0f}%), "
            f"{statistics.median(p[2] for p in pairs):.3f}")


def table(results: dict[str, dict]) -> str:
    """A markdown table of the figures, one column per engine setting."""
    rows = [("same person: median face SSIM (min)",
             lambda f: f"{statistics.median(f['ssim']):.3f} ({min(f['ssim']):.3f})"),
            ("distinct: closer to source, median dlib distance to source",
             lambda f: identity(f["pairs"])),
            ("  tuning half (sources 0-4)",
             lambda f: identity([p for p in f["pairs"] if p[0] < HELD_OUT])),
            ("  held-out half (sources 5-8)",
             lambda f: identity([p for p in f["pairs"] if p[0] >= HELD_OUT])),
            ("off-tone excess: median / 90th percentile",
             lambda f: f"{100 * statistics.median(p[4] for p in f['pairs']):+.1f}% / "
                       f"{100 * float(np.percentile([p[4] for p in f['pairs']], 90)):+.1f}%"),
            ("far pixels unchanged",
             lambda f: f"{sum(p[5] for p in f['pairs'])}/{len(f['pairs'])}")]
    lines = ["| figure | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(f) for f in results.values()) + " |"
              for name, cell in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=None, help="write before/after grids here")
    parser.add_argument("--shape-transfer", action=argparse.BooleanOptionalAction, default=True,
                        help="measure with shape transfer on (the engine's default) or off")
    parser.add_argument("--compare", action="store_true",
                        help="measure both settings and print one table (grids: the default)")
    args = parser.parse_args()
    photos = {n: load_image(sample_path(n)).rgb for n in NAMES}
    settings = ([True, False] if args.compare else [args.shape_transfer])
    recognizer = DlibRecognizer()
    results, grids = {}, None
    with FaceDetector() as detector:
        faces = {n: detector.detect(photos[n]) for n in NAMES}
        for on in settings:
            engine = GeometricSwapper(shape_transfer=1.0 if on else 0.0)
            figures, same_rows, rows = evaluate(engine, photos, faces, detector, recognizer,
                                                log=not args.compare)
            results["shape transfer on" if on else "off (--no-shape-transfer)"] = figures
            grids = grids or (same_rows, rows)
    print(table(results))
    if args.grid:
        args.grid.mkdir(parents=True, exist_ok=True)
        save_grid(args.grid / "geometric_same_person.png", grids[0][::2],
                  "same person: changed copy (source) | original (target) | swap")
        save_grid(args.grid / "geometric_distinct.png", grids[1][:8],
                  "distinct people: source | target | swap")


if __name__ == "__main__":
    main()

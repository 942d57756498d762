"""How well the head mask (``faces.head``) covers hair and ears on the shipped photos.

    PYTHONPATH=. python bench/bench_head_masks.py [--figure docs/head_masks.png]

For every face of the shipped photos (astronaut, grace_hopper, the six of group, tom_hanks),
aligned to the SFI's FFHQ crop at 256 px: the face mask (the mesh's oval), the geometric head
prior and the refined head mask. Four faces carry a hand-drawn outline of the whole head (face,
hair, cap, ears; drawn on the 256 px crop by eye, about +-5 px; tests/data/head_outlines.json):
for them it prints

- hair recall: the share of the outlined head outside the face oval (hair, ears, cap) that the
  mask covers;
- spill: the share of the mask outside the outline (background, neck, shoulders);
- IoU with the outline.

tom_hanks is a 112 px crop cut at the forehead (its FFHQ crop above the brows is a reflection),
and the other group faces were not outlined: they appear in the figure only. The figure shows
each face with the head mask in magenta, the prior's outline in cyan and the face oval in green.
Seconds are CPU time of ``head_mask`` per face (the machine may be loaded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.faces import head
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.faces.masks import polygon_mask, region_mask
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path

CROP = 256
OUTLINES_FILE = Path(__file__).resolve().parents[1] / "tests" / "data" / "head_outlines.json"


def load_outlines(path: Path = OUTLINES_FILE) -> dict[tuple[str, int], np.ndarray]:
    """Hand-drawn head outlines (face + hair + ears + headwear) in the 256 px FFHQ crop:
    (photo, face index, largest first) -> [N,2] float64 polygon."""
    data = json.loads(path.read_text())
    return {(o["photo"], o["face"]): np.array(o["polygon"], np.float64)
            for o in data["outlines"]}


PHOTOS = ("astronaut", "grace_hopper", "group", "tom_hanks")


def faces_in_crops():
    """[(photo, index, crop [S,S,3] uint8, points [478,2] crop pixels)] for every shipped face."""
    out = []
    with FaceDetector() as detector:
        for name in PHOTOS:
            rgb = load_image(sample_path(name)).rgb
            for i, face in enumerate(detector.detect(rgb)):
                aligned = align_face(rgb, face.kps, CROP, "ffhq")
                points = face.points.astype(np.float64) @ aligned.affine[:, :2].T
                out.append((name, i, aligned.crop, points + aligned.affine[:, 2]))
    return out


def scores(mask: np.ndarray, outline: np.ndarray, face: np.ndarray) -> dict[str, float]:
    m, gt = mask > 0, outline > 0
    hair = gt & ~(face > 0)
    return {"hair_recall": float((m & hair).sum() / max(hair.sum(), 1)),
            "spill": float((m & ~gt).sum() / max(m.sum(), 1)),
            "iou": float((m & gt).sum() / max((m | gt).sum(), 1))}


def overlay(crop: np.ndarray, mask: np.ndarray, prior: np.ndarray, face: np.ndarray,
            outline: np.ndarray | None) -> np.ndarray:
    vis = np.where(mask[..., None] > 0, (0.55 * crop + 0.45 * np.array([255, 0, 255])),
                   crop).astype(np.uint8)
    for m, colour in ((prior, (0, 255, 255)), (face, (0, 255, 0)), (outline, (255, 255, 0))):
        if m is None:
            continue
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(vis, contours, -1, colour, 1, cv2.LINE_AA)
    return vis


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, default=None,
                        help="write the masks figure here (e.g. docs/head_masks.png)")
    args = parser.parse_args()
    outlines = load_outlines()
    tiles, rows = [], []
    for name, i, crop, points in faces_in_crops():
        shape = crop.shape[:2]
        face = region_mask(points, shape, ("face",))
        prior = head.head_prior(points, shape)
        t0 = time.process_time()
        mask = head.head_mask(points, shape, crop)
        seconds = time.process_time() - t0
        outline = None
        if (name, i) in outlines:
            outline = polygon_mask(outlines[name, i], shape)
            rows.append((f"{name}[{i}]", scores(face, outline, face), scores(prior, outline, face),
                         scores(mask, outline, face), seconds))
        tiles.append(overlay(crop, mask, prior, face, outline))
        print(f"{name}[{i}]: yaw estimate {head.head_frame(points).yaw:+.2f}, head_mask "
              f"{seconds * 1000:.0f} ms CPU")
    print("\nface            | face mask: hair recall spill IoU | prior: hair recall spill IoU "
          "| head mask: hair recall spill IoU")
    for label, f, p, h, _ in rows:
        print(f"{label:15s} | {f['hair_recall']:.2f} {f['spill']:.2f} {f['iou']:.2f}"
              f"            | {p['hair_recall']:.2f} {p['spill']:.2f} {p['iou']:.2f}"
              f"        | {h['hair_recall']:.2f} {h['spill']:.2f} {h['iou']:.2f}")
    mean = {k: np.mean([r[3][k] for r in rows]) for k in ("hair_recall", "spill", "iou")}
    mean_prior = {k: np.mean([r[2][k] for r in rows]) for k in ("hair_recall", "spill", "iou")}
    print(f"mean head mask: hair recall {mean['hair_recall']:.2f}, spill {mean['spill']:.2f}, "
          f"IoU {mean['iou']:.2f} (prior alone: {mean_prior['hair_recall']:.2f}, "
          f"{mean_prior['spill']:.2f}, {mean_prior['iou']:.2f})")
    if args.figure:
        from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
        from diffswap_igfi.provenance.write import write_synthetic_image

        while len(tiles) % 5:
            tiles.append(np.zeros_like(tiles[0]))
        grid = np.concatenate([np.concatenate(tiles[k:k + 5], 1)
                               for k in range(0, len(tiles), 5)], 0)
        write_synthetic_image(args.figure, grid, None, engine="head-mask-figure",
                              digital_source_type=COMPOSITE_SYNTHETIC)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""An evaluation's numbers, written as OUT/report.json and OUT/report.md with plots and a grid.

report.json: ``id_cosine``, ``id_top1``, ``id_top5``, ``pose_error_deg``, ``expression_error``,
``fid`` (null when skipped), the per-pair rows under ``pairs``, and ``n_pairs``, ``n_failed``,
``n_identities``, ``recognizer``, ``notes`` plus the secondary numbers (per-angle pose errors,
KID, self-swap SSIM/PSNR/LPIPS, ArcFace scores when asked for). Means are over the evaluated
(not failed) pairs; a number with nothing to average is null.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffswap_igfi.eval.metrics import finite_mean, topk_accuracy
from diffswap_igfi.eval.recognizer import SAME_PERSON_DISTANCE
from diffswap_igfi.io.images import load_image

GRID_CELL = 128
GRID_PAIRS = 16


@dataclass
class Evaluation:
    """What ``eval.run.evaluate_pairs`` found. rows: one JSON-ready dict per pair; sources:
    source path -> FaceMeasure (the retrieval gallery); grid: up to 16 ((source, target, swap)
    paths, their face boxes); fid: {fid, kid, kid_std, fid_n} or None."""

    rows: list[dict]
    recognizer: str
    sources: dict = field(default_factory=dict)
    identities: int = 0
    grid: list = field(default_factory=list)
    fid: dict | None = None
    notes: list[str] = field(default_factory=list)
    pairs_file: str | None = None
    engine: str | None = None
    arcface: str | None = None
    lpips_given: bool = False


def summarise(ev: Evaluation) -> dict:
    """The report.json content (see the module docstring)."""
    ok = [r for r in ev.rows if r["status"] == "ok"]
    selfs = [r for r in ok if r["self_swap"]]
    k5 = min(5, ev.identities)

    def mean(key, rows=ok):
        return finite_mean(r.get(key) for r in rows)

    def top(key, k):
        ranks = [r[key] for r in ok if r.get(key) is not None]
        return topk_accuracy(np.array(ranks), k) if ranks and k > 0 else None

    fid = ev.fid or {}
    report = {
        "id_cosine": mean("id_cosine"), "id_top1": top("id_rank", 1),
        "id_top5": top("id_rank", k5), "pose_error_deg": mean("pose_error_deg"),
        "expression_error": mean("expression_error"), "fid": fid.get("fid"),
        "kid": fid.get("kid"), "kid_std": fid.get("kid_std"),
        "id_top5_k": k5, "id_distance_source": mean("id_distance_source"),
        "id_distance_target": mean("id_distance_target"),
        "pose_error_yaw_deg": mean("pose_error_yaw_deg"),
        "pose_error_pitch_deg": mean("pose_error_pitch_deg"),
        "pose_error_roll_deg": mean("pose_error_roll_deg"),
        "n_self_swaps": len(selfs), "ssim": mean("ssim", selfs), "psnr": mean("psnr", selfs),
        "lpips": mean("lpips", selfs),
        "n_pairs": len(ev.rows), "n_failed": len(ev.rows) - len(ok),
        "n_identities": ev.identities, "recognizer": ev.recognizer, "engine": ev.engine,
        "pairs_file": ev.pairs_file,
    }
    if ev.arcface:
        report.update(arcface_model=ev.arcface, arcface_id_cosine=mean("arcface_id_cosine"),
                      arcface_id_top1=top("arcface_id_rank", 1),
                      arcface_id_top5=top("arcface_id_rank", k5))
    report["notes"] = _notes(ev, report)
    report["pairs"] = ev.rows
    return report


def _notes(ev: Evaluation, report: dict) -> list[str]:
    notes = [
        f"identity: {ev.recognizer} descriptors, a recognizer independent of the ArcFace used "
        f"to condition and train the model; id_cosine = mean cosine(swap, source)",
        f"id_top1/id_top5: each swap retrieved among the {ev.identities} distinct source "
        f"image(s) of the pairs file by descriptor distance (top-5 capped at "
        f"{report['id_top5_k']}; ties count as misses)",
        "pose_error_deg: mean over pairs of the largest |yaw|, |pitch|, |roll| difference "
        "between swap and target (MediaPipe geometry fit); per-angle means under "
        "pose_error_*_deg",
        "expression_error: mean L2 distance between the 52 MediaPipe blendshapes of swap "
        "and target",
    ]
    if ev.fid:
        notes.append(f"FID/KID: {ev.fid['fid_n']} swaps vs their targets (whole images at "
                     f"299 px); FID is biased upwards for small sets: compare methods at equal N")
    if ev.arcface:
        notes.append(f"arcface_*: second opinion from {Path(ev.arcface).name}; not independent "
                     f"if the evaluated model was trained or conditioned with this ArcFace")
    if report["n_self_swaps"] and not ev.lpips_given:
        notes.append("LPIPS skipped: no weights; pass --lpips PATH (docs/evaluation.md)")
    if report["n_failed"]:
        notes.append(f"{report['n_failed']} pair(s) failed and are left out of every mean "
                     f"(reasons per pair)")
    return notes + ev.notes


def _clean(value):
    """JSON without NaN or infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # readers see the old report or the new one, never half


def write_report(out: Path, ev: Evaluation) -> dict:
    """Write report.json, report.md, id_distances.png, pose_errors.png and grid.png into
    ``out``. Returns the report dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = _clean(summarise(ev))
    figures = _plots(out, report["pairs"])
    if ev.grid:
        _grid(out / "grid.png", ev.grid)
        figures.append(("pairs: source | target | swap", "grid.png"))
    _write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    _write_text(out / "report.md", markdown(report, figures))
    return report


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(report: dict, figures: list[tuple[str, str]]) -> str:
    """report.md: the table of numbers, the notes, failed pairs and figures."""
    rows = [("ID cosine (swap vs source)", "id_cosine"), ("ID retrieval top-1", "id_top1"),
            (f"ID retrieval top-{report['id_top5_k']}", "id_top5"),
            ("pose error (deg)", "pose_error_deg"), ("yaw / pitch / roll error (deg)", None),
            ("expression error (blendshape L2)", "expression_error"), ("FID", "fid"),
            ("KID", "kid"), ("self-swap SSIM", "ssim"), ("self-swap PSNR (dB)", "psnr"),
            ("self-swap LPIPS", "lpips"), ("ArcFace cosine (second opinion)", "arcface_id_cosine"),
            ("ArcFace top-1 (second opinion)", "arcface_id_top1")]
    lines = ["# Face-swap evaluation", "",
             f"{report['n_pairs']} pair(s) from `{report['pairs_file']}`, {report['n_failed']} "
             f"failed, {report['n_identities']} source identities; recognizer "
             f"{report['recognizer']}; engine {report['engine'] or 'none (swaps given)'}.", "",
             "| metric | value |", "|---|---|"]
    for label, key in rows:
        if key is None:
            angles = [_fmt(report[f"pose_error_{a}_deg"]) for a in ("yaw", "pitch", "roll")]
            lines.append(f"| {label} | {' / '.join(angles)} |")
        elif key in report:
            lines.append(f"| {label} | {_fmt(report[key])} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    failed = [r for r in report["pairs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed pairs", "", "| line | source | target | swap | reason |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['line']} | {r['source']} | {r['target']} | {r['swap'] or ''} | "
                  f"{(r['reason'] or '').replace('|', '/')} |" for r in failed]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{t}]({f})" for t, f in figures]
    return "\n".join(lines) + "\n"


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str]]:
    """Plots are charts, not face images: saved by matplotlib directly (no provenance mark)."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1.2, 25)
    ax.hist([r["id_distance_source"] for r in ok], bins, alpha=0.6, label="swap - source")
    ax.hist([r["id_distance_target"] for r in ok], bins, alpha=0.6, label="swap - target")
    ax.axvline(SAME_PERSON_DISTANCE, color="k", ls="--", lw=1, label="dlib same-person threshold")
    ax.set(xlabel="descriptor distance", ylabel="pairs", title="identity distances")
    ax.legend()
    fig.savefig(out / "id_distances.png", dpi=100, bbox_inches="tight")
    fig = Figure(figsize=(max(6, 0.25 * len(ok)), 4))
    ax = fig.add_subplot()
    x = np.arange(len(ok))
    for i, angle in enumerate(("yaw", "pitch", "roll")):
        ax.bar(x + (i - 1) * 0.27, [r[f"pose_error_{angle}_deg"] for r in ok], 0.27, label=angle)
    ax.set(xlabel="pair (evaluated, in file order)", ylabel="|swap - target| (deg)",
           title="pose error per pair")
    ax.legend()
    fig.savefig(out / "pose_errors.png", dpi=100, bbox_inches="tight")
    return [("identity distances", "id_distances.png"), ("pose errors", "pose_errors.png")]


def _cell(path: Path, box: np.ndarray) -> np.ndarray:
    """A GRID_CELL square around a face (1.6x its box), zero-padded past the photo's edges."""
    rgb = load_image(path, max_pixels=1 << 62).rgb
    x0, y0, x1, y1 = (float(v) for v in box)
    half = 0.8 * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = GRID_CELL / (2 * half)
    affine = np.array([[scale, 0, GRID_CELL / 2 - scale * cx],
                       [0, scale, GRID_CELL / 2 - scale * cy]])
    return cv2.warpAffine(rgb, affine, (GRID_CELL, GRID_CELL), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)


def _grid(path: Path, items: list) -> None:
    """Rows of source | target | swap face crops. The swaps are synthetic faces, so the grid
    goes through write_synthetic_image like every face image the tool writes."""
    from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
    from diffswap_igfi.provenance.write import write_synthetic_image

    rows = [np.concatenate([_cell(p, b) for p, b in zip(paths, boxes)], axis=1)
            for paths, boxes in items[:GRID_PAIRS]]
    write_synthetic_image(path, np.ascontiguousarray(np.concatenate(rows, axis=0)), None,
                          digital_source_type=COMPOSITE_SYNTHETIC, engine="eval-grid")

"""``diffswap-igfi eval``: score the face swaps listed in a pairs file, or produce them first.

PAIRS.csv has the header ``source,target,swap`` (or ``source,target`` with ``--engine`` or
``--checkpoint``, which produce the swaps into OUT/swaps/). Paths are relative to the CSV's
folder; ``sample:NAME`` names a shipped photo. Every image is detected once; a pair whose
source, target or swap has no usable face is reported as failed and left out of the means.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from diffswap_igfi.errors import DiffSwapError, InputError, OutputError
from diffswap_igfi.io.images import DEFAULT_MAX_PIXELS, check_output_path, load_image
from diffswap_igfi.io.samples import SAMPLE_PREFIX, sample_path

if TYPE_CHECKING:
    from diffswap_igfi.eval.metrics import FaceMeter
    from diffswap_igfi.eval.report import Evaluation

# torch, mediapipe and dlib load inside the functions that need them: building the CLI's
# parser (add_eval_arguments) must stay fast.

PAIR_COLUMNS = ("source", "target", "swap")
ENGINE_COLUMNS = ("source", "target")


@dataclass
class Pair:
    """One row of a pairs file: paths resolved, ``names`` as written, ``failure`` set when the
    swap could not be produced."""

    line: int
    source: Path
    target: Path
    swap: Path | None
    names: tuple[str, str, str | None]
    failure: str | None = None
    # the swap as the engine made it, before its watermarks (produce_swaps): scored instead of
    # the written file, whose face-anchored mark moves recognizers; dropped once measured
    swap_rgb: np.ndarray | None = field(default=None, repr=False, compare=False)


def _resolve(value: str, base: Path) -> Path:
    if value.startswith(SAMPLE_PREFIX):
        return sample_path(value)
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()  # one key per file


def read_pairs(csv_path: str | Path, *, with_swap: bool = True) -> list[Pair]:
    """The pairs of a CSV file whose header is exactly ``source,target,swap`` (``with_swap``)
    or ``source,target``; an InputError naming the expected header otherwise."""
    path = Path(csv_path).expanduser()
    expected = PAIR_COLUMNS if with_swap else ENGINE_COLUMNS
    want = ",".join(expected)
    if not path.is_file():
        raise InputError(f"no such pairs file: {path}: pass a CSV with header {want}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header = [h.strip() for h in rows[0]] if rows else []
    if header != list(expected):
        hint = ("; --engine and --checkpoint produce the swaps, so drop the swap column"
                if header == list(PAIR_COLUMNS) else "")
        raise InputError(f"{path}: the header must be {want}, got {','.join(header) or 'nothing'}"
                         f"{hint}")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) != len(expected) or not all(cells):
            raise InputError(f"{path} line {number}: expected {len(expected)} non-empty values "
                             f"({want}), got {len(cells)}")
        resolved = [_resolve(c, path.parent) for c in cells]
        pairs.append(Pair(number, resolved[0], resolved[1],
                          resolved[2] if with_swap else None,
                          (cells[0], cells[1], cells[2] if with_swap else None)))
    if not pairs:
        raise InputError(f"{path} lists no pairs: add rows below the header {want}")
    return pairs


def produce_swaps(pairs: list[Pair], engine, folder: Path, *, force: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS, swapper) -> Iterator[Pair]:
    """Swap every pair with ``engine`` into ``folder`` (fully marked, as the CLI writes), one
    pair at a time as the caller iterates; each pair comes back with ``swap`` and ``swap_rgb``
    (the unmarked swap, for scoring) or with ``failure`` set. The output paths are checked
    here, before any work, not half-way through. ``swapper``: the Swapper whose detector is
    used (its engine is set to ``engine``)."""
    outs = [folder / f"{i:04d}_{p.source.stem}_to_{p.target.stem}.png" for i, p in
            enumerate(pairs)]
    for out, pair in zip(outs, pairs):
        check_output_path(out, [pair.source, pair.target], force=force)
    swapper.engine = engine
    return _swapped(zip(outs, pairs), swapper, folder, max_pixels)


def _swapped(jobs, swapper, folder: Path, max_pixels: int) -> Iterator[Pair]:
    from diffswap_igfi.swapper import swap_file

    for out, pair in jobs:
        try:
            source = swapper.source(load_image(pair.source, max_pixels=max_pixels))
            result = swap_file(swapper, [source], pair.target, out, max_pixels=max_pixels)
        except DiffSwapError as err:
            yield replace(pair, failure=f"swap not produced: {err}")
            continue
        name = f"{folder.name}/{out.name}"  # as the report's folder sees it
        yield replace(pair, swap=out, names=pair.names[:2] + (name,), swap_rgb=result.image)


def evaluate_pairs(pairs: Iterable[Pair], *, detector, meter: FaceMeter, inception=None,
                   lpips=None, progress: bool = False, kid_subset_size: int = 1000,
                   max_pixels: int = DEFAULT_MAX_PIXELS, total: int | None = None,
                   desc: str = "evaluating") -> Evaluation:
    """Measure every pair, then rank identities and compute FID/KID (see eval.metrics).
    ``pairs`` may be produce_swaps' stream (then ``total`` sizes the progress bar): a pair
    with ``swap_rgb`` is scored on those pixels, not on its marked file."""
    from diffswap_igfi.eval import metrics as M
    from diffswap_igfi.eval.fid import NO_INCEPTION_NOTE, set_scores
    from diffswap_igfi.eval.report import Evaluation

    measurer = M.PhotoMeasurer(detector, meter, max_pixels)
    rows, swap_desc, features, pooled = [], {}, {"swap": [], "target": []}, {}
    ev = Evaluation(rows=rows, recognizer=meter.recognizer.name)
    for pair in tqdm(pairs, desc=desc, total=total, disable=not progress, file=sys.stderr):
        row = {"line": pair.line, "source": pair.names[0], "target": pair.names[1],
               "swap": pair.names[2], "status": "failed", "reason": pair.failure,
               "self_swap": pair.source.resolve() == pair.target.resolve()}
        rows.append(row)
        if pair.failure:
            continue
        images: dict[Path, np.ndarray] = {}
        if pair.swap_rgb is not None:
            images[pair.swap] = pair.swap_rgb
        try:
            src, _ = measurer.measure(pair.source, "source", images)
            ev.sources.setdefault(pair.source, src)  # in the gallery even if the pair fails
            tgt, tgt_face = measurer.measure(pair.target, "target", images)
            swp, _ = measurer.measure(pair.swap, "swap", images, (pair.target, tgt_face))
        except DiffSwapError as err:
            row["reason"] = " ".join(str(err).split())
            continue
        row.update(M.pair_scores(src, tgt, swp, meter.recognizer))
        if row["self_swap"]:
            row.update(M.self_swap_row(images[pair.swap], images[pair.target], lpips))
        row.update(status="ok", reason=None)
        swap_desc[len(rows) - 1] = (pair.source, swp)
        if len(ev.grid) < 16:
            ev.grid.append(((pair.source, pair.target, pair.swap), (src.box, tgt.box, swp.box)))
        if inception is not None:
            todo = [p for p in dict.fromkeys((pair.swap, pair.target)) if p not in pooled]
            if todo:
                pooled.update(zip(todo, inception.features([images[p] for p in todo])))
            features["swap"].append(pooled[pair.swap])
            features["target"].append(pooled[pair.target])
    _rank(ev, swap_desc)
    if inception is None:
        ev.notes.append(NO_INCEPTION_NOTE)
    else:
        ev.fid, note = set_scores(features["swap"], features["target"],
                                  subset_size=kid_subset_size)
        ev.notes += [note] if note else []
    return ev


def _rank(ev: Evaluation, swap_desc: dict) -> None:
    """Retrieval of each swap among the distinct source images that measured well."""
    from diffswap_igfi.eval.metrics import retrieval_ranks

    gallery = list(ev.sources)
    ev.identities = len(gallery)
    if not swap_desc:
        return
    position = {path: i for i, path in enumerate(gallery)}
    truth = np.array([position[src] for src, _ in swap_desc.values()])
    for key, rank_key in (("descriptor", "id_rank"), ("arcface", "arcface_id_rank")):
        if getattr(next(iter(swap_desc.values()))[1], key) is None:
            continue
        queries = np.stack([getattr(m, key) for _, m in swap_desc.values()])
        bank = np.stack([getattr(ev.sources[p], key) for p in gallery])
        for index, rank in zip(swap_desc, retrieval_ranks(queries, bank, truth)):
            ev.rows[index][rank_key] = int(rank)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffswap-igfi eval``."""
    parser.add_argument("--pairs", required=True, metavar="PAIRS.csv",
                        help="CSV with header source,target,swap (source,target with --engine "
                             "or --checkpoint); paths relative to the CSV, or sample:NAME")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for report.json, report.md, plots, grid (and swaps/)")
    parser.add_argument("--engine", choices=["geometric", "diffusion"], default=None,
                        help="produce the swaps first with this engine (diffusion needs "
                             "--checkpoint)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="DiffSwapIGFIPipeline folder: produce the swaps with the diffusion "
                             "engine")
    parser.add_argument("--steps", type=int, default=None,
                        help="diffusion: sampling steps (default: the checkpoint's own)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="diffusion: identity guidance (default: the checkpoint's own)")
    parser.add_argument("--seed", type=int, default=0, help="diffusion: random seed")
    parser.add_argument("--device", default="cpu",
                        help="torch device for diffusion, Inception and LPIPS (default: cpu)")
    parser.add_argument("--arcface", metavar="PATH",
                        help="ArcFace ONNX file or model pack: a second, labelled identity score "
                             "(not independent if the model was trained with it)")
    parser.add_argument("--inception", metavar="PATH",
                        help="torchvision inception_v3 state dict for FID/KID (default: "
                             "$DIFFSWAP_IGFI_INCEPTION; FID is skipped without one)")
    parser.add_argument("--lpips", metavar="PATH",
                        help="LPIPS (AlexNet) state dict for self-swap pairs (skipped without)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size, capped at the number of pairs (default: 1000)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels than this")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing report (and swaps) in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _engine(args: argparse.Namespace):
    """The engine that produces the swaps (``engines.factory``), or None to score given ones."""
    from diffswap_igfi.engines.factory import EngineOptions, build_engine

    if not (args.engine or args.checkpoint):
        return None
    if args.engine == "geometric" and args.checkpoint:
        raise InputError("--checkpoint needs --engine diffusion (or no --engine)")
    return build_engine(EngineOptions(engine=args.engine, checkpoint=args.checkpoint,
                                      steps=args.steps, guidance=args.guidance, seed=args.seed,
                                      device=args.device, progress=False))


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate (and with an engine, first produce) the swaps of ``args.pairs`` into
    ``args.out``. Returns 0; raises a DiffSwapError when nothing could be evaluated."""
    from diffswap_igfi.eval import metrics as M
    from diffswap_igfi.eval.fid import inception_weights_path, load_inception
    from diffswap_igfi.eval.report import write_report
    from diffswap_igfi.faces.recognizer import DlibRecognizer
    from diffswap_igfi.swapper import Swapper

    if (args.steps is not None and args.steps < 1) or args.kid_subset_size < 2 \
            or args.max_pixels < 1:
        raise InputError("--steps and --max-pixels must be positive and --kid-subset-size at "
                         "least 2")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file: pass a folder to --out")
    if (out / "report.json").exists() and not args.force:
        raise OutputError(f"{out / 'report.json'} exists: pass --force to overwrite it, or "
                          f"choose another --out")
    producing = bool(args.engine or args.checkpoint)
    pairs = read_pairs(args.pairs, with_swap=not producing)
    engine = _engine(args)  # loads a checkpoint: fail before any work on a bad one
    arcface = None
    if args.arcface:
        from diffswap_igfi.conditions.identity import ArcFaceONNX

        arcface = ArcFaceONNX(args.arcface)
    weights = inception_weights_path(args.inception)
    inception = load_inception(weights, args.device) if weights else None
    lpips = M.load_lpips(args.lpips).to(args.device) if args.lpips else None
    with Swapper(engine) as swapper:  # one detector: for producing the swaps and scoring them
        total, desc = len(pairs), "evaluating"
        if engine is not None:  # swapped and scored one pair at a time: memory stays bounded
            pairs = produce_swaps(pairs, engine, out / "swaps", force=args.force,
                                  max_pixels=args.max_pixels, swapper=swapper)
            desc = "swapping and evaluating"
        meter = M.FaceMeter(DlibRecognizer(), arcface=arcface)
        ev = evaluate_pairs(pairs, detector=swapper.detector, meter=meter, inception=inception,
                            lpips=lpips, progress=not args.quiet,
                            kid_subset_size=args.kid_subset_size, max_pixels=args.max_pixels,
                            total=total, desc=desc)
    ev.pairs_file = str(args.pairs)
    ev.engine = getattr(engine, "name", None)
    ev.arcface = str(arcface.path) if arcface is not None else None
    ev.lpips_given = lpips is not None
    report = write_report(out, ev)
    if not args.quiet:
        print(f"evaluated {report['n_pairs'] - report['n_failed']} of {report['n_pairs']} "
              f"pair(s) ({report['n_failed']} failed); wrote {out / 'report.md'}")
    if report["n_failed"] == report["n_pairs"]:
        raise InputError(f"no pair could be evaluated: see the reasons in {out / 'report.md'}")
    return 0

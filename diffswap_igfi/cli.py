"""Command line: ``diffswap-igfi swap | verify | keys | conditions | preprocess | eval | samples |
demo | build-dictionaries | ui``.

Every failure prints one ``error:`` line on stderr (usage text only with ``--help``) and exits
with a documented code (the errors' own, or the EXIT_* constants); ``--debug`` adds the traceback and keeps the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from diffswap_igfi import __version__
from diffswap_igfi.errors import DiffSwapError, InputError, OutputError
from diffswap_igfi.io.arguments import int_in, positive_int

# The exit codes, as documented in README.md. Errors carry their own (errors.py: InputError and
# ConfigError 2, OutputError 3, ModelNotFoundError 4); these are the others.
EXIT_OK, EXIT_NOT_MARKED, EXIT_BATCH_FAILURES, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 5, 70, 130

RESPONSIBLE_USE = ("Swap only faces of people who consented. Every image written is marked as "
                   "synthetic (metadata and an invisible watermark).")


class UsageError(Exception):
    """A command line argparse rejects: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage block only with --help) and no abbreviated
    options (so an option's presence can be checked, see ``_given_options``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse calls this for every bad command line
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffswap-igfi",
        description="Identity-guided face swapping. " + RESPONSIBLE_USE)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    swap = sub.add_parser(
        "swap", help="swap the source identity onto target photo(s)",
        description="Swap the face of the source onto the target. Paths may be sample:NAME "
                    "for photos that ship with our dependencies (astronaut, grace_hopper, "
                    "group, tom_hanks). " + RESPONSIBLE_USE)
    swap.add_argument("-s", "--source", nargs="+", required=True, metavar="PATH",
                      help="source photo(s) of one person; with several, each target face uses "
                           "the one whose head pose is closest")
    swap.add_argument("-t", "--target", required=True, metavar="PATH",
                      help="target photo, or a folder of them (batch)")
    swap.add_argument("-o", "--output", required=True, metavar="PATH",
                      help="output image (.png .jpg .webp .tif .bmp), or a folder for a batch")
    swap.add_argument("--face-selector", choices=["largest", "index", "all", "reference"],
                      default="largest", help="which target faces to swap (default: largest)")
    swap.add_argument("--face-index", type=int, default=0,
                      help="with --face-selector index: the face to swap, 0 = largest")
    swap.add_argument("--reference-face", metavar="PATH",
                      help="with --face-selector reference: a photo of the person to replace")
    swap.add_argument("--reference-distance", type=float, default=0.6,
                      help="with --face-selector reference: match threshold (dlib distance)")
    swap.add_argument("--source-face-index", type=int, default=None,
                      help="the face to use in a source photo with several people, 0 = largest")
    swap.add_argument("--engine", choices=["geometric", "diffusion"], default=None,
                      help="geometric: landmark warp + blending, runs anywhere (the default "
                           "without --checkpoint); diffusion: the SFI pipeline (the default "
                           "with --checkpoint)")
    swap.add_argument("--checkpoint", metavar="DIR",
                      help="DiffSwapIGFIPipeline folder for --engine diffusion")
    swap.add_argument("--steps", type=positive_int, default=None,
                      help="diffusion: sampling steps (default: the checkpoint's own, 30 for "
                           "ours, 50 for REFace's)")
    swap.add_argument("--guidance", type=float, default=None,
                      help="diffusion: identity guidance scale, 1 = off (default: the "
                           "checkpoint's own, 3.0 for ours, 3.5 for REFace's)")
    swap.add_argument("--seed", type=int, default=0, help="diffusion: random seed (default: 0)")
    swap.add_argument("--device", default="cpu", help="diffusion: torch device (default: cpu)")
    swap.add_argument("--warm-start", type=float, default=None, metavar="STRENGTH",
                      help="diffusion: start from the geometric swap noised to this strength "
                           "in (0, 1], running that fraction of the steps")
    swap.add_argument("--no-refine", action="store_true",
                      help="diffusion: skip the JR refinement stage even if the checkpoint has it")
    swap.add_argument("--region", choices=["face", "head"], default=None,
                      help="diffusion: repaint the face, or the head (face, hair, ears) "
                           "(default: what the checkpoint was trained with)")
    swap.add_argument("--mix-source", nargs="+", metavar="PATH",
                      help="diffusion: photo(s) of a second identity to mix in (MFIM)")
    swap.add_argument("--mix-mode", choices=["blocks", "weighted"], default="blocks",
                      help="blocks: the second identity drives the fine UNet blocks; weighted: "
                           "tokens mixed by --mix-weight")
    swap.add_argument("--mix-weight", type=float, default=0.5,
                      help="weight of the first identity with --mix-mode weighted")
    swap.add_argument("--blend", choices=["laplacian", "poisson", "alpha"], default="laplacian",
                      help="how the warped face is blended in (default: laplacian)")
    swap.add_argument("--occlusion-mask", metavar="PATH",
                      help="geometric: an image of the target's size, white where the target "
                           "must stay (hands, glasses, hair over the face)")
    swap.add_argument("--auto-occluders", action="store_true",
                      help="geometric: also keep target pixels over the face that are not its "
                           "skin colour (glasses, hair; partial, by colour only)")
    swap.add_argument("--source-eyes", action="store_true",
                      help="geometric: the source's eyes even when they are less open than "
                           "the target's (default: the target's then); either way they look "
                           "where the target looks")
    swap.add_argument("--shape-transfer", action=argparse.BooleanOptionalAction, default=None,
                      help="geometric: move the face outline to the source's face shape "
                           "(default: on; --no-shape-transfer keeps the target's outline)")
    swap.add_argument("--domain", choices=["auto", "photo", "stylized"], default=None,
                      help="geometric: stylized = a drawn/animated target, the face takes its "
                           "flat colours (default: auto)")
    swap.add_argument("--source-mouth", action="store_true",
                      help="geometric: take the source's mouth interior (default: the target's "
                           "teeth and tongue)")
    swap.add_argument("--force", action="store_true",
                      help="overwrite an existing output (never an input)")
    swap.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                      help="refuse images with more pixels than this (default: 40000000)")
    swap.add_argument("--jpeg-quality", type=int_in(1, 100), default=95, metavar="1-100",
                      help="quality of JPEG/WebP outputs (default: 95)")
    swap.add_argument("--quiet", action="store_true", help="no progress bar")
    swap.add_argument("--c2pa-cert", metavar="PEM", help="sign the C2PA manifest with this "
                      "certificate chain (with --c2pa-key; default: the local keys)")
    swap.add_argument("--c2pa-key", metavar="PEM", help="the private key of --c2pa-cert")
    from diffswap_igfi.video.arguments import add_video_arguments

    add_video_arguments(swap)

    verify = sub.add_parser("verify", help="report provenance marks in image(s) and video(s)")
    verify.add_argument("images", nargs="+", metavar="FILE", help="images or videos")
    verify.add_argument("--json", action="store_true", help="print JSON")
    from diffswap_igfi.provenance.keys import add_keys_arguments

    add_keys_arguments(sub.add_parser("keys", help="C2PA signing keys (keys init | keys show)"))

    cond = sub.add_parser(
        "conditions", help="compute the SFI conditions of a pair and draw them",
        description="Fit 3D geometry to source and target, build the swapped-geometry "
                    "condition and the 3D-aware mask in the target's crop, optionally with "
                    "identity and CLIP tokens from local weights, and save a debug image.")
    cond.add_argument("-s", "--source", required=True, metavar="PATH")
    cond.add_argument("-t", "--target", required=True, metavar="PATH")
    cond.add_argument("--save-debug", metavar="PNG",
                      help="write a picture of landmarks, swapped geometry, mask and heatmaps")
    cond.add_argument("--save-conditions", metavar="FILE.safetensors",
                      help="store the computed conditions (what training preprocessing keeps)")
    cond.add_argument("--geometry", choices=["mediapipe", "3ddfa_v2"], default="mediapipe",
                      help="3DMM backend (3ddfa_v2 needs --tddfa-dir)")
    cond.add_argument("--tddfa-dir", metavar="DIR",
                      help="folder with mb1_120x120.onnx and the converted BFM basis")
    cond.add_argument("--arcface", metavar="PATH",
                      help="ArcFace ONNX file or insightface model-pack folder (identity)")
    cond.add_argument("--clip-model", metavar="NAME", help="open_clip model name, e.g. ViT-B-16")
    cond.add_argument("--clip-weights", metavar="PATH", help="local open_clip checkpoint file")
    cond.add_argument("--crop-size", type=positive_int, default=512)
    cond.add_argument("--face-index", type=int, default=0,
                      help="the target face to use, 0 = largest")
    cond.add_argument("--force", action="store_true", help="overwrite existing outputs")

    prep = sub.add_parser(
        "preprocess", help="turn a folder of face photos into training shards",
        description="Detect, align and fit every face under IN_DIR and write webdataset-style "
                    "shards to OUT_DIR for train/train_sfi.py. Resumable; bad files are skipped "
                    "and listed in OUT_DIR/bad_files.tsv, never modified.")
    from diffswap_igfi.data.preprocess import add_preprocess_arguments

    add_preprocess_arguments(prep)

    evaluation = sub.add_parser(
        "eval", help="score face swaps: identity retrieval, pose, expression, FID",
        description="Score the swaps listed in PAIRS.csv (header source,target,swap), or produce "
                    "them first with --engine/--checkpoint (header source,target); writes "
                    "DIR/report.json and DIR/report.md. See docs/evaluation.md.")
    from diffswap_igfi.eval.run import add_eval_arguments

    add_eval_arguments(evaluation)

    dictionaries = sub.add_parser(
        "build-dictionaries", help="cluster eye/nose/mouth features into JR's dictionaries",
        description="Cluster encoder features of left-eye, right-eye, nose and mouth crops of a "
                    "preprocessed data set into K atoms per component and scale (DFDNet-style "
                    "component dictionaries for the JR stage).")
    from diffswap_igfi.jr.arguments import add_build_dictionaries_arguments

    add_build_dictionaries_arguments(dictionaries)

    samples = sub.add_parser(
        "samples", help="list the face photos shipped inside our dependencies, or copy them",
        description="List the sample photos (usable anywhere as sample:NAME), or copy them into "
                    "DIR, e.g. as a tiny training set for diffswap-igfi preprocess.")
    samples.add_argument("dir", nargs="?", metavar="DIR", help="folder to copy them into")
    samples.add_argument("--force", action="store_true", help="overwrite existing copies")

    ui = sub.add_parser("ui", help="start the web UI (local only by default)",
                        description="A Gradio web UI with /swap_image and /verify API "
                                    "endpoints. " + RESPONSIBLE_USE)
    from diffswap_igfi.ui.server import add_ui_arguments

    add_ui_arguments(ui)

    conv = sub.add_parser("convert", help="convert a released checkpoint (REFace's last.ckpt) "
                          "to a pipeline folder that swap --checkpoint loads")
    conv.add_argument("--from", dest="source_format", required=True, choices=["reface"])
    conv.add_argument("checkpoint", metavar="CKPT")
    conv.add_argument("out", metavar="OUT", help="new folder to write")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="unpickle CKPT (it can run code: only for a file from a trusted source)")
    conv.add_argument("--config", metavar="JSON", help="overrides of the model configuration")

    demo = sub.add_parser("demo", help="swap two photos that ship with our dependencies")
    demo.add_argument("-o", "--output", default="demo", metavar="DIR",
                      help="folder for the results (default: ./demo)")
    return parser


def _load(path: str, max_pixels: int):
    from diffswap_igfi.io.images import load_image
    from diffswap_igfi.io.samples import resolve_input_path

    return load_image(resolve_input_path(path), max_pixels=max_pixels)


def _engine_options(args: argparse.Namespace, mix_sources=()):
    """The swap options as engine options (checked: InputError on a bad combination)."""
    from diffswap_igfi.engines.factory import EngineOptions

    occlusion = (_load(args.occlusion_mask, args.max_pixels).rgb.max(axis=2) > 127
                 if args.occlusion_mask else None)
    return EngineOptions(engine=args.engine, blend=args.blend, occlusion_mask=occlusion,
                         keep_eyes="never" if args.source_eyes else "auto",
                         keep_mouth_interior="never" if args.source_mouth else "always",
                         shape_transfer=None if args.shape_transfer is None
                         else float(args.shape_transfer),
                         domain=args.domain or "auto", auto_occluders=args.auto_occluders,
                         checkpoint=args.checkpoint, steps=args.steps, guidance=args.guidance,
                         seed=args.seed, device=args.device, warm_start=args.warm_start,
                         refine=not args.no_refine, mix_sources=tuple(mix_sources),
                         mix_mode=args.mix_mode, mix_weight=args.mix_weight,
                         region=args.region, progress=not args.quiet)


def _engine(args: argparse.Namespace, swapper=None):
    """The swap engine the options ask for (diffusion when a checkpoint is given); --mix-source
    photos become Sources through the swapper's detector (so --source-face-index applies)."""
    from diffswap_igfi.engines.factory import build_engine

    if args.mix_source and swapper is None:  # the video front end opens its swapper later
        from diffswap_igfi.swapper import Swapper

        with Swapper() as own:
            return _engine(args, own)
    mix = [swapper.source(_load(p, args.max_pixels), args.source_face_index)
           for p in args.mix_source or []]
    return build_engine(_engine_options(args, mix))


# Options that only mean something in one mode: (option, dest, needs, why). ``needs`` is a test
# on the parsed arguments; a given option whose test fails is refused, never silently ignored.
def _diffusion(args: argparse.Namespace) -> bool:
    return (args.engine or ("diffusion" if args.checkpoint else "geometric")) == "diffusion"


_MODE_OPTIONS = [
    ("--face-index", "face_index", lambda a: a.face_selector == "index",
     "it picks the face for --face-selector index"),
    ("--reference-face", "reference_face", lambda a: a.face_selector == "reference",
     "it is the person to find with --face-selector reference"),
    ("--reference-distance", "reference_distance", lambda a: a.face_selector == "reference",
     "it is the match threshold of --face-selector reference"),
    ("--checkpoint", "checkpoint", _diffusion, "it is the model of --engine diffusion"),
    ("--steps", "steps", _diffusion, "the geometric engine does not sample (use --engine diffusion)"),
    ("--guidance", "guidance", _diffusion, "it is a diffusion option (use --engine diffusion)"),
    ("--seed", "seed", _diffusion, "the geometric engine is deterministic (use --engine diffusion)"),
    ("--device", "device", _diffusion, "the geometric engine runs on the CPU (use --engine diffusion)"),
    ("--warm-start", "warm_start", _diffusion, "it is a diffusion option (use --engine diffusion)"),
    ("--no-refine", "no_refine", _diffusion, "it is a diffusion option (use --engine diffusion)"),
    ("--mix-source", "mix_source", _diffusion, "it is a diffusion option (use --engine diffusion)"),
    ("--region", "region", lambda a: _diffusion(a) or a.region == "face",
     "the geometric engine moves the source's face-mesh texture, which cannot carry hair or "
     "ears (a head swap needs --engine diffusion)"),
    ("--mix-mode", "mix_mode", lambda a: bool(a.mix_source),
     "it says how to mix the identity of --mix-source"),
    ("--mix-weight", "mix_weight", lambda a: bool(a.mix_source) and a.mix_mode == "weighted",
     "it weights the identities with --mix-source and --mix-mode weighted"),
    ("--blend", "blend", lambda a: not _diffusion(a) or a.warm_start is not None,
     "the diffusion engine blends only the geometric swap of --warm-start"),
]


def refuse_unused_options(args: argparse.Namespace) -> None:
    """Raise InputError for an option the user gave that has no effect in the chosen mode."""
    given = getattr(args, "given", set())
    for option, dest, needs, why in _MODE_OPTIONS:
        if dest in given and not needs(args):
            raise InputError(f"{option} has no effect here: {why}")


def _given_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   argv: Sequence[str]) -> set[str]:
    """The dests of the options written on the command line (abbreviations are off, so an
    option is given exactly when one of its strings appears as a token or as ``--opt=...``)."""
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them only here
    sub = commands.get(getattr(args, "command", None))
    if sub is None:
        return set()
    tokens = {tok.split("=", 1)[0] for tok in argv if tok.startswith("-")}
    return {action.dest for action in sub._actions
            if any(s in tokens for s in action.option_strings)}


def cmd_swap(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    refuse_unused_options(args)

    from diffswap_igfi.io.images import check_output_path, list_images
    from diffswap_igfi.io.samples import resolve_input_path
    from diffswap_igfi.swapper import FaceSelection, Swapper, swap_file

    if args.face_selector == "reference" and not args.reference_face:
        raise InputError("--face-selector reference needs --reference-face PATH")
    target_path = resolve_input_path(args.target)
    from diffswap_igfi.video.arguments import is_video_target, refuse_video_options

    if is_video_target(target_path):  # a video or a folder of videos: video/command.py
        from diffswap_igfi.video.command import run_video_swap

        failed = run_video_swap(args, _engine(args), target_path)
        return EXIT_BATCH_FAILURES if failed else EXIT_OK
    refuse_video_options(args)
    output = Path(args.output).expanduser()
    source_paths = [resolve_input_path(s) for s in args.source]
    batch = target_path.is_dir()
    if batch:
        targets = list_images(target_path)
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output} is a file, but a folder of targets needs an output "
                              f"folder: pass -o DIR")
        jobs = [(t, output / t.name) for t in targets]
    else:
        jobs = [(target_path, output)]
    inputs = source_paths + [t for t, _ in jobs]
    if args.reference_face:
        inputs.append(resolve_input_path(args.reference_face))
    if not batch:  # a batch checks each output in turn and reports clashes per file
        check_output_path(output, inputs, force=args.force)

    _engine_options(args)  # a bad combination fails before any work (--mix-source: once built)
    failures: list[str] = []
    with Swapper() as swapper:
        swapper.engine = _engine(args, swapper)
        sources = [swapper.source(_load(str(p), args.max_pixels), args.source_face_index)
                   for p in source_paths]
        reference = None
        if args.reference_face:
            reference = swapper.source(_load(args.reference_face, args.max_pixels))
        selection = FaceSelection(args.face_selector, args.face_index, reference,
                                  args.reference_distance)
        bar = tqdm(jobs, desc="swapping", unit="photo",
                   disable=args.quiet or len(jobs) < 2, file=sys.stderr)
        for target_file, out_file in bar:
            try:
                if batch:
                    check_output_path(out_file, inputs, force=args.force)
                result = swap_file(swapper, sources, target_file, out_file, selection=selection,
                                   jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels,
                                   c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)
            except DiffSwapError as err:
                if not batch:
                    raise
                failures.append(f"{target_file.name}: {err}")
                continue
            if not batch and not args.quiet:
                print(f"wrote {out_file} ({len(result.faces)} face(s) swapped)")
    if batch:
        done = len(jobs) - len(failures)
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        print(f"wrote {done} of {len(jobs)} photo(s) to {output}")
        return EXIT_BATCH_FAILURES if failures else EXIT_OK
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from diffswap_igfi.provenance.verify import verify_files

    reports = verify_files([Path(p).expanduser() for p in args.images])
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for report in reports:
            print("\n".join(report.lines()))
    return EXIT_OK if all(r.synthetic for r in reports) else EXIT_NOT_MARKED


def cmd_conditions(args: argparse.Namespace) -> int:
    from diffswap_igfi.conditions.builder import ConditionBuilder, save_conditions
    from diffswap_igfi.faces.detect import FaceDetector, pick_source_face, select_faces
    from diffswap_igfi.geometry.condition import debug_panel
    from diffswap_igfi.io.images import check_output_path
    from diffswap_igfi.io.samples import resolve_input_path
    from diffswap_igfi.provenance.metadata import COMPOSITE_SYNTHETIC
    from diffswap_igfi.provenance.write import write_synthetic_image

    if args.clip_model and not args.clip_weights or args.clip_weights and not args.clip_model:
        raise InputError("--clip-model and --clip-weights go together: pass both or neither")
    if args.geometry == "3ddfa_v2" and not args.tddfa_dir:
        raise InputError("--geometry 3ddfa_v2 needs --tddfa-dir DIR (see geometry/tddfa.py)")
    inputs = [resolve_input_path(args.source), resolve_input_path(args.target)]
    if args.save_debug:
        check_output_path(Path(args.save_debug), inputs, force=args.force)
    if args.save_conditions:
        check_output_path(Path(args.save_conditions), inputs, force=args.force,
                          extensions={".safetensors"})
    if args.geometry == "3ddfa_v2":
        from diffswap_igfi.geometry.tddfa import TDDFABackend

        geometry = TDDFABackend(args.tddfa_dir)
    else:
        from diffswap_igfi.geometry.mediapipe_backend import MediaPipeBackend

        geometry = MediaPipeBackend()
    identity = clip = None
    if args.arcface:
        from diffswap_igfi.conditions.identity import ArcFaceONNX

        identity = ArcFaceONNX(args.arcface)
    if args.clip_model:
        from diffswap_igfi.conditions.clip import ClipImageEncoder

        clip = ClipImageEncoder(args.clip_model, args.clip_weights)
    source, target = (_load(str(p), 40_000_000) for p in inputs)
    builder = ConditionBuilder(geometry, identity, clip, crop_size=args.crop_size)
    with FaceDetector() as detector:
        src_face = pick_source_face(detector.detect(source.rgb), what=source.path.name)
        tgt_face = select_faces(detector.detect(target.rgb), "index", index=args.face_index,
                                what=target.path.name)[0]
    cond = builder.build(source.rgb, src_face, target.rgb, tgt_face)
    fmt = "yaw {:+.1f} pitch {:+.1f} roll {:+.1f}".format
    print(f"geometry backend: {geometry.name} (shape {cond.swapped.shape.size}, "
          f"expression {cond.swapped.expression.size} parameters)")
    print(f"source pose  {fmt(*builder.fit(source.rgb, src_face).pose)}")
    print(f"target pose  {fmt(*builder.fit(target.rgb, tgt_face).pose)}")
    print(f"swapped pose {fmt(*cond.swapped.pose)}")
    print(f"mask covers {100 * (cond.mask > 0).mean():.1f}% of the {args.crop_size}px crop; "
          f"heatmaps {tuple(cond.heatmaps.shape)}")
    if cond.identity is not None:
        print(f"identity embedding: {cond.identity.shape[0]}-d")
    if cond.clip_tokens is not None:
        print(f"CLIP tokens: {tuple(cond.clip_tokens.shape)}")
    print("seconds: " + ", ".join(f"{k} {sum(v):.3f}" for k, v in builder.timings.items()))
    if args.save_debug:
        panel = debug_panel(cond.crop, cond.target_points, cond.swapped_points, cond.soft_mask,
                            cond.heatmaps)
        write_synthetic_image(Path(args.save_debug), panel, None,
                              digital_source_type=COMPOSITE_SYNTHETIC, engine="conditions-debug")
        print(f"wrote {args.save_debug}")
    if args.save_conditions:
        save_conditions(Path(args.save_conditions), cond, {"source": source.path.name,
                                                            "target": target.path.name})
        print(f"wrote {args.save_conditions}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    import shutil

    from diffswap_igfi.io.samples import describe_sample, sample_names, sample_path

    if args.dir is None:
        for name in sample_names():
            print(f"sample:{name:14s} {describe_sample(name)}  ({sample_path(name)})")
        return 0
    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file: pass a folder to copy the samples into")
    folder.mkdir(parents=True, exist_ok=True)
    for name in sample_names():
        src = sample_path(name)
        dest = folder / f"{name}{src.suffix.lower()}"
        if dest.exists() and not args.force:
            raise OutputError(f"{dest} exists: pass --force to overwrite it")
        shutil.copyfile(src, dest)
        print(f"copied {dest}")
    return 0


def _run_preprocess(args: argparse.Namespace) -> int:
    from diffswap_igfi.data.preprocess import run_preprocess

    return run_preprocess(args)


def _run_keys(args: argparse.Namespace) -> int:
    from diffswap_igfi.provenance.keys import run_keys

    return run_keys(args)


def _run_eval(args: argparse.Namespace) -> int:
    from diffswap_igfi.eval.run import run_eval

    return run_eval(args)


def _run_build_dictionaries(args: argparse.Namespace) -> int:
    from diffswap_igfi.jr.dictionary import run_build_dictionaries

    return run_build_dictionaries(args)


def _run_ui(args: argparse.Namespace) -> int:
    from diffswap_igfi.ui.server import run_ui

    return run_ui(args)

def _run_convert(args: argparse.Namespace) -> int:
    from diffswap_igfi.convert.reface import run_convert

    return run_convert(args)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.output)
    pairs = [("grace_hopper", "astronaut"), ("astronaut", "grace_hopper")]
    status = 0
    for source, target in pairs:
        dest = out / f"{source}_onto_{target}.png"
        status |= cmd_swap(build_parser().parse_args(
            ["swap", "-s", f"sample:{source}", "-t", f"sample:{target}", "-o", str(dest),
             "--force"]))
        status |= cmd_verify(argparse.Namespace(images=[str(dest)], json=False))
    print(RESPONSIBLE_USE)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return InputError.exit_code
    args.given = _given_options(parser, args, argv)
    handlers = {"swap": cmd_swap, "verify": cmd_verify, "demo": cmd_demo,
                "conditions": cmd_conditions, "samples": cmd_samples,
                "preprocess": _run_preprocess, "eval": _run_eval,
                "build-dictionaries": _run_build_dictionaries, "ui": _run_ui,
                "keys": _run_keys, "convert": _run_convert}
    try:
        return handlers[args.command](args)
    except DiffSwapError as err:
        return _fail(args, str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", EXIT_INTERRUPTED)
    except Exception as err:  # a bug, not bad input: still one line unless --debug
        message = str(err).splitlines()[0] if str(err) else ""
        return _fail(args, f"internal error ({type(err).__name__}: {message}): rerun with "
                           f"--debug and report it", EXIT_INTERNAL)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """One ``error:`` line with the documented code; ``--debug`` prints the traceback first."""
    if args.debug:
        import traceback

        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

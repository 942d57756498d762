"""The ``swap`` command for a video target: the run over one video or a folder of them.

``cli.py`` registers the options with ``video.arguments.add_video_arguments`` and hands a video
target to :func:`run_video_swap` (with the engine it built from the shared options).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from diffswap_igfi.errors import DiffSwapError, InputError, OutputError
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import resolve_input_path
from diffswap_igfi.io.video import OUTPUT_FORMATS, VIDEO_EXTENSIONS, EncodeSettings, check_encoder
from diffswap_igfi.provenance.c2pa_sign import can_sign, check_signing_keys
from diffswap_igfi.swapper import Swapper
from diffswap_igfi.video.arguments import refuse_photo_options
from diffswap_igfi.video.job import VideoSwapOptions, check_video_output, swap_video, work_folder


def _map_pairs(values: list[str]) -> list[tuple[str, str]]:
    if len(values) == 1 and values[0].lower().endswith(".json"):
        try:
            data = json.loads(Path(values[0]).expanduser().read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read --map-faces {values[0]} ({err}): pass a JSON object "
                             f"{{\"ref.jpg\": \"source.jpg\"}}") from None
        if not isinstance(data, dict):
            raise InputError(f"--map-faces {values[0]} must hold a JSON object "
                             f"{{\"ref.jpg\": \"source.jpg\"}}")
        return [(str(k), str(v)) for k, v in data.items()]
    pairs = []
    for value in values:
        if "=" not in value:
            raise InputError(f"--map-faces takes REF=SRC pairs, got {value!r}")
        ref, src = value.split("=", 1)
        pairs.append((ref, src))
    return pairs


def run_video_swap(args: argparse.Namespace, engine, target: Path) -> int:
    """Swap one video, or every video in a folder. Returns how many videos of a folder failed
    (each is listed on stderr); a single video's failure raises its DiffSwapError."""
    refuse_photo_options(args)
    output = Path(args.output).expanduser()
    max_pixels = args.max_pixels
    source_paths = [resolve_input_path(s) for s in args.source]
    if target.is_dir():
        videos = sorted(p for p in target.iterdir() if p.is_file()
                        and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith("."))
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output} is a file, but a folder of videos needs an output "
                              f"folder: pass -o DIR")
        jobs = [(v, output / (v.name if v.suffix.lower() in OUTPUT_FORMATS else v.stem + ".mp4"))
                for v in videos]
    else:
        jobs = [(target, output)]
    map_pairs = _map_pairs(args.map_faces) if args.map_faces else []
    inputs = source_paths + [t for t, _ in jobs] + [resolve_input_path(p) for pair in map_pairs
                                                     for p in pair]
    if args.reference_face:
        inputs.append(resolve_input_path(args.reference_face))
    if target.is_file():
        # --resume: an output left by a finished run is still refused without --force
        check_video_output(output, inputs, force=args.force)
    if args.video_codec:
        check_encoder(args.video_codec)
    if any(can_sign(out) for _, out in jobs):  # unusable keys fail now, not after the work
        check_signing_keys(args.c2pa_cert, args.c2pa_key)
    options = VideoSwapOptions(
        selector=args.face_selector, index=args.face_index,
        reference_distance=args.reference_distance,
        encode=EncodeSettings(crf=args.crf, preset=args.preset),
        trim_start=args.trim_start, trim_end=args.trim_end, chunk_frames=args.chunk_frames,
        smooth_landmarks=not args.no_smoothing, smooth_colour=not args.no_smoothing)
    if args.trim_start is not None and args.trim_end is not None \
            and args.trim_end <= args.trim_start:
        raise InputError(f"--trim-end ({args.trim_end}) must be after --trim-start "
                         f"({args.trim_start})")
    failures = []
    with Swapper(engine) as swapper:
        def load(path: Path):
            return load_image(path, max_pixels=max_pixels)

        sources = [swapper.source(load(p), args.source_face_index) for p in source_paths]
        reference = None
        if args.face_selector == "reference":
            ref = swapper.source(load(resolve_input_path(args.reference_face)))
            reference = swapper.recognizer.describe(ref.image.rgb, ref.face)
        face_map = []
        for ref_path, src_path in map_pairs:
            ref = swapper.source(load(resolve_input_path(ref_path)))
            src = swapper.source(load(resolve_input_path(src_path)), args.source_face_index)
            face_map.append((swapper.recognizer.describe(ref.image.rgb, ref.face), [src]))
        for video, out in jobs:
            try:
                if target.is_dir():
                    check_video_output(out, inputs, force=args.force)
                # the encoder follows each output's container unless --video-codec says
                codec = args.video_codec or OUTPUT_FORMATS[out.suffix.lower()][1]
                job = replace(options, encode=replace(options.encode, codec=codec))
                result = swap_video(swapper, sources, video, out, options=job,
                                    reference=reference, face_map=face_map,
                                    resume=args.resume, progress=not args.quiet,
                                    log=lambda m: print(m, file=sys.stderr),
                                    c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)
            except DiffSwapError as err:
                if not target.is_dir():
                    raise
                failures.append(f"{video.name}: {err}")
                continue
            except KeyboardInterrupt:
                if work_folder(out).exists():
                    print(f"interrupted: rerun with --resume to continue {out}", file=sys.stderr)
                raise
            if not args.quiet:
                print(f"wrote {result.output} ({result.frames} frames, {result.swapped_frames} "
                      f"with a swapped face, {len(result.swapped_tracks)} of {result.tracks} "
                      f"tracked people swapped)")
    if target.is_dir():
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        print(f"wrote {len(jobs) - len(failures)} of {len(jobs)} video(s) to {output}")
    return len(failures)

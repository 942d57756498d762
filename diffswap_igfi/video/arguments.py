"""Command-line options for video targets (kept light: ``--help`` imports no model code)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffswap_igfi.errors import InputError
from diffswap_igfi.io.images import INPUT_EXTENSIONS
from diffswap_igfi.io.video import is_video_path


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "video targets", "options for a video target (.mp4 .mov .mkv .webm .avi ...) or a "
        "folder of them; the output is a video (.mp4 .m4v .mov .mkv .webm)")
    group.add_argument("--video-codec", default=None, metavar="NAME",
                       help="FFmpeg encoder (default: libx264 for .mp4/.mov/.mkv, libvpx-vp9 "
                            "for .webm)")
    group.add_argument("--crf", type=int, default=18,
                       help="constant-quality level, lower is better (default: 18)")
    group.add_argument("--preset", default="veryfast",
                       help="x264/x265 speed preset (default: veryfast)")
    group.add_argument("--trim-start", type=float, default=None, metavar="SECONDS",
                       help="keep the video from this time on")
    group.add_argument("--trim-end", type=float, default=None, metavar="SECONDS",
                       help="keep the video before this time")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last completed chunk")
    group.add_argument("--chunk-frames", type=int, default=48, metavar="N",
                       help="frames per resumable chunk: a killed run loses at most this many "
                            "(default: 48)")
    group.add_argument("--map-faces", nargs="+", metavar="REF=SRC",
                       help="swap several people: each REF photo shows a person in the video, "
                            "SRC the face to give them (or one JSON file {\"REF\": \"SRC\"})")
    group.add_argument("--no-smoothing", action="store_true",
                       help="swap every frame independently (no landmark or colour smoothing)")


def is_video_target(path: Path) -> bool:
    """A video file, or a folder holding at least one video and no photo."""
    if path.is_dir():
        names = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        photos = any(p.suffix.lower() in INPUT_EXTENSIONS for p in names)
        return not photos and any(is_video_path(p) for p in names)
    return is_video_path(path)




VIDEO_OPTIONS = {"video_codec": "--video-codec", "crf": "--crf", "preset": "--preset",
                 "trim_start": "--trim-start", "trim_end": "--trim-end", "resume": "--resume",
                 "chunk_frames": "--chunk-frames", "map_faces": "--map-faces",
                 "no_smoothing": "--no-smoothing"}
PHOTO_OPTIONS = {"jpeg_quality": "--jpeg-quality"}


def _refuse(args: argparse.Namespace, options: dict[str, str], why: str) -> None:
    for dest in sorted(getattr(args, "given", set()) & options.keys()):
        raise InputError(f"{options[dest]} has no effect here: {why}")


def refuse_video_options(args: argparse.Namespace) -> None:
    """An option for video targets, given with a photo target, is refused (never ignored)."""
    _refuse(args, VIDEO_OPTIONS, "the target is a photo, and it is a video option")


def refuse_photo_options(args: argparse.Namespace) -> None:
    """The reverse: photo-only options given with a video target."""
    _refuse(args, PHOTO_OPTIONS, "the target is a video (use --crf for its quality)")

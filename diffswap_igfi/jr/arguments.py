"""Command-line options of ``diffswap-igfi build-dictionaries``, kept free of torch so that
building the CLI parser stays fast."""

from __future__ import annotations

import argparse

PATCH_SIZES = {"left_eye": 32, "right_eye": 32, "nose": 32, "mouth": 48}


def add_build_dictionaries_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``diffswap-igfi build-dictionaries DATA OUT``."""
    parser.add_argument("data", metavar="DATA", help="a folder written by `diffswap-igfi "
                        "preprocess` (high-quality faces)")
    parser.add_argument("out", metavar="OUT", help="new folder for the dictionary")
    parser.add_argument("--num-atoms", type=int, default=64, help="atoms per component and scale")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="feature scales (1 = patch resolution, 2 = half)")
    for part, name in (("eye", "left_eye"), ("nose", "nose"), ("mouth", "mouth")):
        parser.add_argument(f"--{part}-size", type=int, default=PATCH_SIZES[name],
                            help=f"{part} patch side in pixels")
    parser.add_argument("--max-samples", type=int, default=1024,
                        help="use at most this many faces, evenly spaced (0 = all)")
    parser.add_argument("--vgg16", metavar="PATH", help="torchvision vgg16 state dict: encode "
                        "with its first two blocks instead of seeded random features")
    parser.add_argument("--iters", type=int, default=30, help="k-means iterations at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    return parser

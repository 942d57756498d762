"""What the training scripts share: their command line, and how they report errors.

``train/train_sfi.py`` and ``train/train_jr.py`` parse ``arguments(...)`` and run their
``train(args)`` through ``run``: a ``DiffSwapError`` (bad config, missing data, a resume that
does not fit) is one ``error: ...`` line on stderr and its exit code; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from diffswap_igfi.errors import DiffSwapError, InputError
from diffswap_igfi.training.config import SFIConfig, load_config


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every trainer takes; a trainer adds its own to the returned parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/sfi/tiny.yaml")
    parser.add_argument("--data", required=True, help="DATA_DIR from diffswap-igfi preprocess")
    parser.add_argument("--output", required=True, help="RUN_DIR for logs, checkpoints, export")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--resume", default=None,
                        help="'latest' (the newest complete checkpoint in RUN_DIR) or a folder")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    parser.add_argument("--dump-params", action="store_true",
                        help="each process writes a digest of its parameters (DDP checks)")
    return parser


def run(train: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call ``train``; a DiffSwapError becomes one line and an exit code."""
    args = parser.parse_args(argv)
    try:
        return train(args)
    except DiffSwapError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def load_run_config(args: argparse.Namespace, cls: type = SFIConfig):
    """The training config of ``--config`` with ``--max-steps`` applied, checked."""
    config = load_config(args.config, cls)
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise InputError(f"--max-steps must be positive, got {args.max_steps}")
        config.train.max_steps = args.max_steps
    return config

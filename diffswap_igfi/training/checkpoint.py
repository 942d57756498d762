"""Checkpoints written atomically, found again with ``--resume latest``.

A checkpoint is ``RUN/checkpoints/checkpoint-<step>``: accelerate's full training state (models,
optimizer, LR schedule, RNG states of every process, registered objects such as the EMA) plus
``checkpoint.json``. It is assembled under a temporary name and renamed into place only when
complete, so a run killed mid-write leaves at worst a ``.tmp-*`` folder, which is never loaded
and is cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from diffswap_igfi.errors import ConfigError

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with their marker), oldest first."""
    root = checkpoint_dir(run_dir)
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _NAME.match(entry.name)
            if match and (entry / MARKER).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``--resume`` value -> checkpoint folder: None, ``latest`` or a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)  # a fresh run: nothing to resume, start at step 0
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {MARKER}); "
                          f"use --resume latest")
    return path


def save_checkpoint(accelerator, run_dir: Path, step: int, *, keep: int,
                    info: dict | None = None) -> Path:
    """Save the full state on every process, then publish it atomically from the main one."""
    root = checkpoint_dir(run_dir)
    final = root / f"checkpoint-{step:08d}"
    tmp = root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / MARKER, "w") as f:
            json.dump({"step": step, **(info or {})}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, required: set[str] | None = None, *,
                    partial: bool = False) -> int:
    """Restore the full state; returns the step the checkpoint was taken at.

    partial: the checkpoint holds only the trained parameters (``TrainLoop`` drops the frozen
    ones), so the model loads non-strictly; ``required`` (the trained parameter names) must
    all be there."""
    weights = Path(path) / "model.safetensors"
    if required and weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            missing = sorted(set(required) - set(f.keys()))
        if missing:
            raise ConfigError(f"checkpoint {path} lacks {len(missing)} trained weights (e.g. "
                              f"{missing[0]}): it was written by another configuration; resume "
                              f"with the config it was trained with")
    accelerator.load_state(str(path), **({"strict": False} if partial else {}))
    with open(Path(path) / MARKER) as f:
        return int(json.load(f)["step"])

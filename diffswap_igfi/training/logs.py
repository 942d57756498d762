"""Training logs: ``metrics.jsonl`` (one JSON object per optimisation step) and image grids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class MetricsLog:
    """Appends ``{"step": ..., "loss": ..., ...}`` lines to RUN/metrics.jsonl (main process)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (the killed run's tail), so the
        file reads as one uninterrupted run. Rewritten atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def image_grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tile equally sized [H,W,3] uint8 images: rows x columns -> one [rH, cW, 3] image."""
    return np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)

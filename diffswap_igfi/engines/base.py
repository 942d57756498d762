"""The engine contract: how every swap engine is called.

Front ends (``swapper.Swapper``, and through it the CLI, batches, eval, video and the web UI)
detect faces once, pick each target face's source with ``swapper.choose_source`` and hand the
engine (target face, source) pairs. An engine detects nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.faces.record import FaceRecord


@runtime_checkable
class SwapEngine(Protocol):
    """name: recorded in the provenance metadata; digital_source_type: the IPTC term of what
    the engine makes."""

    name: str
    digital_source_type: str

    def swap_pairs(self, target: np.ndarray, pairs: Sequence[tuple[FaceRecord, Source]]
                   ) -> tuple[np.ndarray, np.ndarray]:
        """target: [H,W,3] uint8 photo; pairs: each target face (in target's pixels) with the
        source whose identity it gets. Returns (image [H,W,3] uint8, alpha [H,W] float32 in
        [0,1]); image equals target exactly where alpha == 0."""
        ...

"""``Source``: one source photo and the identity face chosen in it.

It lives this low (below the SFI pipeline and the engines) because every engine takes its
identity in this form; ``swapper`` re-exports it for front ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import LoadedImage


@dataclass
class Source:
    """One source photo and the identity face chosen in it. Results computed from the face
    (identity embedding, geometry fit) are cached on ``face.extras``, so a source used for many
    targets is encoded once."""

    image: LoadedImage
    face: FaceRecord

    @property
    def rgb(self) -> np.ndarray:
        """[H,W,3] uint8 the source photo."""
        return self.image.rgb

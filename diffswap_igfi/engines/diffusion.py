"""The diffusion engine: the SFI pipeline behind the same front end as the geometric engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA

HOW_TO_GET_A_CHECKPOINT = (
    "train one (accelerate launch train/train_sfi.py --config configs/sfi/tiny.yaml --data DIR "
    "--output RUN, which exports RUN/pipeline) or pass --checkpoint with a local "
    "DiffSwapIGFIPipeline folder; without one, use --engine geometric"
)


def load_pipeline(checkpoint: str | Path | None, device: str = "cpu", *, progress: bool = True):
    """A DiffSwapIGFIPipeline from a local folder, with errors that say what to do."""
    if checkpoint is None:
        raise ModelNotFoundError(f"the diffusion engine needs a checkpoint: "
                                 f"{HOW_TO_GET_A_CHECKPOINT}")
    path = Path(checkpoint).expanduser()
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a DiffSwapIGFIPipeline folder (no "
                                 f"model_index.json): {HOW_TO_GET_A_CHECKPOINT}")
    from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline

    from diffusers.utils import logging as diffusers_logging

    if not progress:
        diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffSwapIGFIPipeline.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"cannot load the checkpoint {path} ({first}): "
                                 f"{HOW_TO_GET_A_CHECKPOINT}") from err
    finally:
        if not progress:
            diffusers_logging.enable_progress_bar()
    return pipe.to(device)


class DiffusionEngine:
    """Swaps through a DiffSwapIGFIPipeline; the engine contract (``engines.base.SwapEngine``).

    id_mix: a second identity to mix in (MFIM); warm_start_strength with warm_engine: start
    from ``warm_engine``'s swap of the same pairs (the caller's geometric engine, so its blend
    and the per-face source apply), noised to that strength.
    """

    name = "diffusion"
    digital_source_type = COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA

    def __init__(self, pipe, *, steps: int = 30, guidance: float = 3.0, seed: int = 0,
                 warm_start_strength: float | None = None, warm_engine=None,
                 id_mix=None, progress: bool = True, refine: bool = True) -> None:
        if warm_start_strength is not None and warm_engine is None:
            raise ValueError("a warm start needs the engine whose swap it starts from")
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.warm_start_strength, self.warm_engine = warm_start_strength, warm_engine
        self.refine = refine
        self.id_mix = id_mix

    def swap_pairs(self, target: np.ndarray,
                   pairs: Sequence[tuple[FaceRecord, Source]]) -> tuple[np.ndarray, np.ndarray]:
        """target: [H,W,3] uint8; pairs: (target face, its source). Returns (image [H,W,3]
        uint8, alpha [H,W] float32; image == target where alpha == 0)."""
        import torch

        warm = None
        if self.warm_start_strength is not None:
            warm, _ = self.warm_engine.swap_pairs(target, pairs)
        out = self.pipe(target, list(pairs), num_inference_steps=self.steps,
                        guidance_scale=self.guidance,
                        generator=torch.Generator().manual_seed(self.seed), image=warm,
                        strength=self.warm_start_strength or 1.0, id_mix=self.id_mix,
                        refine=self.refine)
        return out.images[0], out.alphas[0]

"""One factory for swap engines, from options that front ends (CLI, eval, web UI) fill in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.engines.base import SwapEngine
from diffswap_igfi.engines.geometric import BLENDS, GeometricSwapper
from diffswap_igfi.errors import InputError

ENGINES = ("geometric", "diffusion")


@dataclass
class EngineOptions:
    """What engine to build and how it swaps; checked on creation (InputError).

    engine: ``geometric`` or ``diffusion``; None picks diffusion when a checkpoint is given.
    blend: the geometric engine's blending (also the diffusion warm start's); occlusion_mask
    ([H,W] bool, the target's pixels to keep), keep_eyes, keep_mouth_interior, shape_transfer,
    domain, auto_occluders: the geometric engine's options (``GeometricSwapper``). checkpoint,
    steps, guidance (None: the checkpoint's own defaults), seed, device, refine, progress: the
    diffusion engine. warm_start: a
    strength in (0, 1]: start diffusion from the geometric swap. mix_sources, mix_mode,
    mix_weight: identity mixing (MFIM) with a second person's source faces. region: what the
    diffusion engine repaints, ``face`` or ``head`` (None: the checkpoint's own); the geometric
    engine swaps faces only.
    """

    engine: str | None = None
    blend: str = "laplacian"
    occlusion_mask: np.ndarray | None = None
    keep_eyes: str = "auto"
    keep_mouth_interior: str = "always"
    shape_transfer: float | None = None  # None: the geometric engine's default (on)
    domain: str = "auto"
    auto_occluders: bool = False
    checkpoint: str | Path | None = None
    steps: int | None = None  # None: the checkpoint's own default
    guidance: float | None = None  # None: the checkpoint's own default
    seed: int = 0
    device: str = "cpu"
    warm_start: float | None = None
    refine: bool = True
    mix_sources: Sequence[Source] = field(default_factory=tuple)
    mix_mode: str = "blocks"
    mix_weight: float = 0.5
    region: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.engine is not None and self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r}: choose from {', '.join(ENGINES)}")
        if self.blend not in BLENDS:
            raise InputError(f"unknown blend {self.blend!r}: choose from {', '.join(BLENDS)}")
        if self.region not in (None, "face", "head"):
            raise InputError(f"unknown region {self.region!r}: choose face or head")
        if self.name == "geometric":
            if self.region == "head":
                raise InputError("--region head needs --engine diffusion: the geometric engine "
                                 "moves the source's face-mesh texture, which cannot carry hair "
                                 "or ears")
            if (self.checkpoint or self.mix_sources or self.warm_start is not None
                    or not self.refine):
                raise InputError("--checkpoint, --mix-source, --warm-start and --no-refine need "
                                 "--engine diffusion")
            return
        if (self.occlusion_mask is not None or self.keep_eyes != "auto"
                or self.keep_mouth_interior != "always" or self.shape_transfer
                or self.domain != "auto" or self.auto_occluders):
            raise InputError("--occlusion-mask, --auto-occluders, --source-eyes, --source-mouth, "
                             "--shape-transfer and --domain work with the geometric engine only: "
                             "drop them or use --engine geometric")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be positive, got {self.steps}")
        if self.warm_start is not None and not 0.0 < self.warm_start <= 1.0:
            raise InputError(f"--warm-start must be in (0, 1], got {self.warm_start}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise InputError(f"--mix-weight must be in [0, 1], got {self.mix_weight}")
        if self.mix_mode not in ("blocks", "weighted"):
            raise InputError(f"--mix-mode must be blocks or weighted, got {self.mix_mode!r}")

    @property
    def name(self) -> str:
        """The engine these options build."""
        return self.engine or ("diffusion" if self.checkpoint else "geometric")


def build_engine(options: EngineOptions) -> SwapEngine:
    """The engine ``options`` ask for. Loading a diffusion checkpoint raises
    ModelNotFoundError with what to do."""
    # a diffusion warm start keeps the target's outline: its masked sampling keeps every pixel
    # outside the target's face exactly, so a warped jaw would not line up with them
    shape = options.shape_transfer
    if shape is None:
        shape = GeometricSwapper.shape_transfer if options.name == "geometric" else 0.0
    geometric = GeometricSwapper(blend=options.blend, occlusion_mask=options.occlusion_mask,
                                 keep_eyes=options.keep_eyes,
                                 keep_mouth_interior=options.keep_mouth_interior,
                                 shape_transfer=shape, domain=options.domain,
                                 auto_occluders=options.auto_occluders)
    if options.name == "geometric":
        return geometric
    from diffswap_igfi.engines.diffusion import DiffusionEngine, load_pipeline

    pipe = load_pipeline(options.checkpoint, options.device, progress=options.progress)
    id_mix = None
    if options.mix_sources:
        from diffswap_igfi.sfi.pipeline import IdMix

        id_mix = IdMix(list(options.mix_sources), options.mix_mode, options.mix_weight)
    return DiffusionEngine(pipe, steps=options.steps, guidance=options.guidance,
                           seed=options.seed, warm_start_strength=options.warm_start,
                           warm_engine=geometric if options.warm_start is not None else None,
                           id_mix=id_mix, progress=options.progress, refine=options.refine,
                           region=options.region)

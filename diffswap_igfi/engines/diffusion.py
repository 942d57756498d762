"""The diffusion engine: the SFI pipeline behind the same front end as the geometric engine."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(path: Path) -> None:
    """Checkpoints load from safetensors only: a component folder holding only pickled weights
    is refused with how to convert it (unpickling runs code from the file)."""
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        files = [f for f in component.iterdir() if f.is_file()]
        pickled = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            raise ModelNotFoundError(
                f"{component} holds pickled weights only ({pickled[0]}); checkpoints load from "
                f"safetensors only: convert it once, on a machine where you trust the file, with "
                f"DiffSwapIGFIPipeline.from_pretrained(DIR, use_safetensors=False)"
                f".save_pretrained(NEW_DIR)")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars, notices or warnings from diffusers/transformers/torch while loading:
    the CLI prints one line per outcome."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # "Loading weights" of transformers components
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(verbosity[0])
        transformers_logging.set_verbosity(verbosity[1])


# model_index.json's ``_class_name`` -> (module, class): the pipeline classes a folder may name
PIPELINE_CLASSES = {
    "DiffSwapIGFIPipeline": ("diffswap_igfi.sfi.pipeline", "DiffSwapIGFIPipeline"),
    "RefacePipeline": ("diffswap_igfi.sfi.reface_pipeline", "RefacePipeline"),
    "LCMStudentPipeline": ("diffswap_igfi.sfi.student", "LCMStudentPipeline"),  # distilled
}


def pipeline_class_for(path: Path):
    """The pipeline class a checkpoint folder's model_index.json names (only ours)."""
    import importlib
    import json

    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"cannot read {path / 'model_index.json'} ({err}): "
                                 f"{HOW_TO_GET_A_CHECKPOINT}") from err
    if name not in PIPELINE_CLASSES:
        raise ModelNotFoundError(f"{path} holds a {name!r} pipeline; this engine runs "
                                 f"{', '.join(sorted(PIPELINE_CLASSES))}")
    module, cls = PIPELINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def load_pipeline(checkpoint: str | Path | None, device: str = "cpu", *, progress: bool = True):
    """A DiffSwapIGFIPipeline from a local folder (safetensors only), with errors that say what
    to do. ``progress`` is the sampling progress bar; loading is always quiet."""
    if checkpoint is None:
        raise ModelNotFoundError(f"the diffusion engine needs a checkpoint: "
                                 f"{HOW_TO_GET_A_CHECKPOINT}")
    path = Path(checkpoint).expanduser()
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a DiffSwapIGFIPipeline folder (no "
                                 f"model_index.json): {HOW_TO_GET_A_CHECKPOINT}")
    _refuse_pickles(path)
    pipeline_class = pipeline_class_for(path)
    # diffusers loads a component only from a module already imported: JR's refiner and its
    # component dictionary (train/train_jr.py's RUN/pipeline) live in jr.network, jr.dictionary
    import diffswap_igfi.jr.dictionary  # noqa: F401
    try:
        with quiet_loading():
            pipe = pipeline_class.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"cannot load the checkpoint {path} ({first}): "
                                 f"{HOW_TO_GET_A_CHECKPOINT}") from err
    return pipe.to(device)


class DiffusionEngine:
    """Swaps through a DiffSwapIGFIPipeline; the engine contract (``engines.base.SwapEngine``).

    id_mix: a second identity to mix in (MFIM); warm_start_strength with warm_engine: start
    from ``warm_engine``'s swap of the same pairs (the caller's geometric engine, so its blend
    and the per-face source apply), noised to that strength.
    """

    name = "diffusion"
    digital_source_type = COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA

    def __init__(self, pipe, *, steps: int | None = None, guidance: float | None = None,
                 seed: int = 0,
                 warm_start_strength: float | None = None, warm_engine=None,
                 id_mix=None, progress: bool = True, refine: bool = True,
                 region: str | None = None) -> None:
        if warm_start_strength is not None and warm_engine is None:
            raise ValueError("a warm start needs the engine whose swap it starts from")
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.warm_start_strength, self.warm_engine = warm_start_strength, warm_engine
        self.refine = refine
        self.id_mix = id_mix
        # None: the checkpoint's own (DiffSwapIGFIPipeline.config.region); a pipeline without
        # the option (REFace's) repaints the face only
        self.region = region if "region" in getattr(pipe, "config", {}) else None
        if region == "head" and self.region is None:
            from diffswap_igfi.errors import InputError

            raise InputError(f"--region head needs a DiffSwap-IGFI checkpoint; this "
                             f"{type(pipe).__name__} repaints the face only")

    def for_track(self, track: int) -> DiffusionEngine:
        """This engine for one person of a video (video/job.py): the same pipeline with a seed
        of the track's own, so every frame of a track starts from the same noise (in the
        face's aligned frame, where the pipeline samples) and two people do not share it."""
        engine = copy.copy(self)
        engine.seed = (self.seed * 1_000_003 + 7919 * (track + 1)) % (2**63)
        return engine

    def swap_pairs(self, target: np.ndarray,
                   pairs: Sequence[tuple[FaceRecord, Source]], *,
                   warm: np.ndarray | None = None, strength: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """target: [H,W,3] uint8; pairs: (target face, its source). Returns (image [H,W,3]
        uint8, alpha [H,W] float32; image == target where alpha == 0). warm: [H,W,3] uint8 a
        warm start in target's pixels (a video's previous swap of the same face, moved to this
        frame), noised to ``strength`` (default: the engine's warm_start_strength, else
        0.5); without it the engine's own warm start, if any."""
        import torch

        if warm is not None:
            strength = strength or self.warm_start_strength or 0.5
        elif self.warm_start_strength is not None:
            warm, _ = self.warm_engine.swap_pairs(target, pairs)
            strength = self.warm_start_strength
        # None: the checkpoint's own defaults (30 at 3.0 for ours, REFace's 50 at 3.5, a
        # distilled student's default_steps at 1.0: its guidance is in its weights)
        chosen = {k: v for k, v in (("num_inference_steps", self.steps),
                                    ("guidance_scale", self.guidance),
                                    ("region", self.region)) if v is not None}
        out = self.pipe(target, list(pairs), **chosen,
                        generator=torch.Generator().manual_seed(self.seed), image=warm,
                        strength=strength or 1.0, id_mix=self.id_mix,
                        refine=self.refine)
        return out.images[0], out.alphas[0]

"""The diffusion engine: the SFI pipeline behind the same front end as the geometric engine."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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
    try:
        with quiet_loading():
            pipe = pipeline_class.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"cannot load the checkpoint {path} ({first}): "
                                 f"{HOW_TO_GET_A_CHECKPOINT}") from err
    return pipe.to(device)


class DiffusionEngine:
    """Swaps through DiffSwapIGFIPipeline. ``mix_sources`` (photos of a second person) turn on
    ID mixing; ``warm_start_strength`` starts from the geometric swap."""

    name = "diffusion"
    digital_source_type = COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA

    def __init__(self, checkpoint: str | Path | None, *, steps: int = 30,
                 guidance: float = 3.0, seed: int = 0, device: str = "cpu",
                 warm_start_strength: float | None = None,
                 mix_sources: list[np.ndarray] | None = None, mix_mode: str = "blocks",
                 mix_weight: float = 0.5, progress: bool = True, refine: bool = True) -> None:
        self.pipe = load_pipeline(checkpoint, device, progress=progress)
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.warm_start_strength = warm_start_strength
        self.refine = refine
        self.id_mix = None
        if mix_sources:
            from diffswap_igfi.sfi.pipeline import IdMix

            self.id_mix = IdMix(mix_sources, mix_mode, mix_weight)

    def swap_faces(self, sources, target: np.ndarray,
                   faces: list[FaceRecord]) -> tuple[np.ndarray, np.ndarray]:
        """sources: swapper.Source list; target: [H,W,3] uint8; faces: target faces to swap.
        Returns (image [H,W,3] uint8, alpha [H,W] float32; image == target where alpha == 0)."""
        import torch

        warm = self.warm_start_strength
        out = self.pipe([s.image.rgb for s in sources], target,
                        source_faces=[s.face for s in sources], target_faces=[faces],
                        num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=torch.Generator().manual_seed(self.seed),
                        warm_start="geometric" if warm else None, strength=warm or 1.0,
                        id_mix=self.id_mix, refine=self.refine)
        return out.images[0], out.alphas[0]

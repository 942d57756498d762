"""Train the SFI stage (styled face inpainting) by self-reconstruction.

    accelerate launch train/train_sfi.py --config configs/sfi/tiny.yaml --data DATA_DIR \
        --output RUN_DIR [--max-steps N] [--resume latest]

DATA_DIR comes from ``diffswap-igfi preprocess``. RUN_DIR receives metrics.jsonl (one line per
optimisation step), tensorboard events, checkpoints/ (atomic; ``--resume latest`` continues the
newest complete one), validation/ grids, and at the end pipeline/: the EMA weights as a
DiffSwapIGFIPipeline folder that ``diffswap-igfi swap --checkpoint RUN_DIR/pipeline`` loads.
The same code runs on one CPU, one GPU or many nodes (see configs/accelerate/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffswap_igfi.errors import DiffSwapError, InputError
from diffswap_igfi.training.config import SFIConfig, config_to_dict, load_config


def parse_args(argv=None, description: str = "Train the SFI stage.") -> argparse.ArgumentParser:
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


def main(argv=None) -> int:
    return guarded(train, parse_args().parse_args(argv))


def guarded(train_fn, args: argparse.Namespace) -> int:
    """Run a trainer; a DiffSwapError is one line on stderr (a traceback with --debug)."""
    try:
        return train_fn(args)
    except DiffSwapError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def load_inputs(args, cls=SFIConfig):
    """Config and dataset, checked before any model is built."""
    config = load_config(args.config, cls)
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise InputError(f"--max-steps must be positive, got {args.max_steps}")
        config.train.max_steps = args.max_steps
    from diffswap_igfi.data.dataset import SFIDataset

    dataset = SFIDataset(args.data, latent_factor=8, seed=config.train.seed,
                         augment=config.augment)
    return config, dataset


def train(args: argparse.Namespace) -> int:
    config, dataset = load_inputs(args)
    if dataset.crop_size != config.model.crop_size:
        raise InputError(f"{args.data} holds {dataset.crop_size}px crops but the config trains "
                         f"at {config.model.crop_size}px: preprocess with --crop-size "
                         f"{config.model.crop_size} or change model.crop_size")
    from diffswap_igfi.sfi.training import SFITrainable, build_sfi_pipeline, training_scheduler
    from diffswap_igfi.training.loop import TrainLoop, flat

    run_dir = Path(args.output)
    loop = TrainLoop(run_dir, config.train, config.optim, config.ema, project="sfi",
                     hparams=flat(config_to_dict(config)))

    # the pipeline the config describes; its UNet and projectors train
    pipe = build_sfi_pipeline(config)
    id_loss = None
    if config.loss.id_weight > 0:
        from diffswap_igfi.sfi.losses import IdentityLoss

        id_loss = IdentityLoss(pipe.identity_encoder)
    model = SFITrainable(pipe, training_scheduler(pipe), config, id_loss)
    model.frozen.to(loop.accelerator.device)
    for name in ("unet", "id_projector", "clip_projector"):
        getattr(model, name).requires_grad_(name in config.train.train_modules)
    if config.lora.use:
        from diffswap_igfi.adapters.lora import add_lora

        model.unet.requires_grad_(False)
        add_lora(model.unet, config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
    if config.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    model = loop.setup(model, params, dataset, args.resume)

    trained = (pipe.unet, pipe.id_projector, pipe.clip_projector)
    for batch, seed in loop:
        if loop.step(model, batch, seed) and loop.due(config.train.validation_every):
            loop.on_main(lambda: validate(loop, pipe, trained, run_dir))
    if args.dump_params:
        loop.dump_params(model)
    loop.export(lambda folder: save_pipeline(pipe, folder, lora=config.lora.use), "pipeline",
                trained)
    loop.finish()
    return 0


def save_pipeline(pipe, folder: Path, *, lora: bool) -> None:
    """The pipeline folder; with LoRA, the UNet is saved with the LoRA folded in (a plain UNet
    every loader reads) and the LoRA weights alone go to ``folder/lora`` as well."""
    if not lora:
        pipe.save_pretrained(folder)
        return
    from diffswap_igfi.adapters.lora import merged_copy, save_lora

    trained = pipe.unet
    pipe.register_modules(unet=merged_copy(trained))
    try:
        pipe.save_pretrained(folder)
    finally:
        pipe.register_modules(unet=trained)
    save_lora(trained, Path(folder) / "lora")


def validate(loop, pipe, modules, run_dir: Path) -> None:
    """A swap grid on the shipped photos (source | target | swap): PNG and tensorboard."""
    from diffswap_igfi.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
    from diffswap_igfi.provenance.write import write_synthetic_image
    from diffswap_igfi.sfi.training import validation_grid

    grid = loop.with_ema(modules, lambda: validation_grid(pipe))
    step = loop.step_count
    write_synthetic_image(run_dir / "validation" / f"step-{step:08d}.png", grid, None,
                          engine="diffusion-validation",
                          digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA)
    tracker = loop.accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("validation/source|target|swap", grid, step, dataformats="HWC")


if __name__ == "__main__":
    sys.exit(main())

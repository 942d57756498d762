"""Train the SFI stage (styled face inpainting) by self-reconstruction.

    accelerate launch train/train_sfi.py --config configs/sfi/tiny.yaml --data DATA_DIR \
        --output RUN_DIR [--max-steps N] [--resume latest]

One training step, start to end:
1. A batch of B samples from ``SFIDataset`` (DATA_DIR from ``diffswap-igfi preprocess``): the
   aligned face crop (the target), the inpainting mask, 7 landmark heatmaps (the geometry), and
   an augmented copy of the same face (the source, which the model cannot copy pixel by pixel).
2. ``SFITrainable.forward`` (diffswap_igfi/sfi/training.py): the frozen VAE encodes the target
   and the masked target; ArcFace embeds the source, CLIP the face-blanked target, and the
   projectors turn both into cross-attention tokens. Noise is added at a random timestep; the
   UNet sees [noisy latents | mask | masked latents | geometry] and predicts the noise
   (diffusion loss). On a share of the batch the midpoint estimate of the clean face is
   decoded once and judged: its ArcFace embedding against the source's (identity), its 3DDFA_V2
   shape, pose and expression against the target's (tddfa), its eye landmarks (eye) and VGG16
   features (perceptual) against the target's, each when its weight is on. With
   ``model.condition: blurred`` the UNet sees the target's face blurred instead of blanked.
3. ``TrainLoop.step`` (diffswap_igfi/training/loop.py): backward; every accumulation cycle it
   clips, steps the optimizer, the LR schedule and the EMA, writes metrics.jsonl and
   tensorboard, and saves a checkpoint when due.

RUN_DIR receives metrics.jsonl, tensorboard events, checkpoints/ (atomic; ``--resume latest``
continues the newest complete one), validation/ grids, and at the end pipeline/: the EMA weights
as a DiffSwapIGFIPipeline folder that ``diffswap-igfi swap --checkpoint RUN_DIR/pipeline``
loads. The same code runs on one CPU, one GPU or many nodes (configs/accelerate/,
docs/training.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffswap_igfi.data.dataset import training_data
from diffswap_igfi.training.config import SFIConfig, config_to_dict
from diffswap_igfi.training.script import arguments, load_run_config, run


def main(argv=None) -> int:
    return run(train, arguments("Train the SFI stage."), argv)


def train(args: argparse.Namespace) -> int:
    config = load_run_config(args, SFIConfig)
    dataset = training_data(args.data, seed=config.train.seed, augment=config.augment,
                            reader=config.train.data_reader,
                            shuffle_buffer=config.train.shuffle_buffer,
                            crop_size=config.model.crop_size, fix=" or change model.crop_size")
    from diffswap_igfi.sfi.training import (SFITrainable, build_sfi_pipeline, midpoint_judges,
                                            training_scheduler)
    from diffswap_igfi.training.loop import TrainLoop, flat

    run_dir = Path(args.output)
    loop = TrainLoop(run_dir, config.train, config.optim, config.ema, project="sfi",
                     hparams=flat(config_to_dict(config)))

    # the pipeline the config describes; its UNet and projectors train
    pipe = build_sfi_pipeline(config)
    # the frozen judges of the decoded midpoint estimate: identity, 3DMM, eye, perceptual
    model = SFITrainable(pipe, training_scheduler(pipe), config,
                         judges=midpoint_judges(config, pipe))
    model.frozen.to(loop.accelerator.device)
    for name in ("unet", "id_projector", "clip_projector"):
        getattr(model, name).requires_grad_(name in config.train.train_modules)
    if config.lora.use:
        from diffswap_igfi.adapters.lora import add_lora

        model.unet.requires_grad_(False)
        add_lora(model.unet, config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
        # conv_in holds the geometry input channels (zero-initialised on SD): they must train
        model.unet.conv_in.requires_grad_(True)
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

    def run():
        with loop.autocast():  # DeepSpeed holds the UNet in bf16/fp16
            return validation_grid(pipe)

    grid = loop.with_ema(modules, run)
    step = loop.step_count
    write_synthetic_image(run_dir / "validation" / f"step-{step:08d}.png", grid, None,
                          engine="diffusion-validation",
                          digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA)
    tracker = loop.accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("validation/source|target|swap", grid, step, dataformats="HWC")


if __name__ == "__main__":
    sys.exit(main())

"""Train the JR stage (joint refinement) on top of a trained SFI pipeline.

    accelerate launch train/train_jr.py --config configs/jr/tiny.yaml --data DATA_DIR \
        --sfi-checkpoint SFI_RUN/pipeline --output RUN_DIR [--max-steps N] [--resume latest]

The frozen SFI pipeline makes JR's inputs on the fly (self-swaps for the residual map, cross
swaps for identity). RUN_DIR gets the same logs and checkpoints as the SFI trainer (shared
machinery: diffswap_igfi.training), RUN_DIR/jr (the refiner alone) and RUN_DIR/pipeline: the
SFI pipeline with the refiner in it, which `swap --checkpoint` runs as SFI then JR.
With `model.use_dictionary: true` JR's SFT fusion trains on the component dictionary of
`model.dictionary` (or one built from DATA_DIR into RUN_DIR/dictionary), and RUN_DIR/pipeline
carries that dictionary, so inference fuses it too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffswap_igfi.training.config import JRConfig, config_to_dict
from diffswap_igfi.training.script import arguments, load_run_config, run


def main(argv=None) -> int:
    parser = arguments("Train the JR stage.")
    parser.add_argument("--sfi-checkpoint", required=True,
                        help="the SFI pipeline folder (RUN/pipeline of train_sfi.py)")
    return run(train, parser, argv)


def train(args) -> int:
    config = load_run_config(args, JRConfig)
    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.jr.losses import ContextualLoss, JRGeneratorLoss, PatchDiscriminator
    from diffswap_igfi.jr.network import JRNet
    from diffswap_igfi.jr.training import (JRTrainable, export_with_refiner, jr_training_data,
                                           loss_weights, run_dictionary)
    from diffswap_igfi.sfi.losses import IdentityLoss, PerceptualLoss
    from diffswap_igfi.training.loop import TrainLoop, flat

    sfi = load_pipeline(args.sfi_checkpoint)
    sfi.set_progress_bar_config(disable=True)
    run_dir = Path(args.output)
    loop = TrainLoop(run_dir, config.train, config.optim, config.ema, project="jr",
                     hparams=flat(config_to_dict(config)))
    dataset = jr_training_data(args.data, seed=config.train.seed, augment=config.augment,
                               reader=config.train.data_reader,
                               shuffle_buffer=config.train.shuffle_buffer)
    sfi.to(loop.accelerator.device)
    m = config.model
    dictionary = run_dictionary(config, args.data, run_dir, loop.on_main)
    jr = JRNet(base_channels=m.base_channels, num_res_blocks=m.num_res_blocks,
               upscale=m.upscale, use_dictionary=dictionary is not None,
               **(dictionary.fusion_config if dictionary is not None else {}))
    if dictionary is not None:
        dictionary.to(loop.accelerator.device)
    discriminator = PatchDiscriminator() if config.loss.adversarial_weight > 0 else None
    w = config.loss
    identity = IdentityLoss(sfi.identity_encoder) if w.identity_weight > 0 else None
    perceptual = (PerceptualLoss(w.perceptual_weights, w.perceptual_layers)
                  if w.perceptual_weight > 0 else None)
    contextual = ContextualLoss(perceptual) if w.contextual_weight > 0 else None
    generator_loss = JRGeneratorLoss(loss_weights(config), identity=identity,
                                     perceptual=perceptual, contextual=contextual)
    model = JRTrainable(jr, sfi, config, generator_loss, discriminator, dictionary)
    params = [p for p in model.parameters() if p.requires_grad]
    model = loop.setup(model, params, dataset, args.resume)
    for batch, seed in loop:
        loop.step(model, batch, seed)
    loop.export(lambda folder: jr.save_pretrained(folder), "jr", [jr])
    loop.export(lambda folder: export_with_refiner(sfi, jr, dictionary, folder), "pipeline", [jr])
    loop.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())

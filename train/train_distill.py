"""Distil a trained SFI teacher into a few-step student (latent consistency distillation).

    accelerate launch train/train_distill.py --config configs/sfi/tiny_distill.yaml \
        --teacher TEACHER_RUN/pipeline --data DATA_DIR --output RUN_DIR [--max-steps N] \
        [--resume latest]

One training step, start to end:
1. A batch of B samples from ``SFIDataset`` (DATA_DIR from ``diffswap-igfi preprocess``), as
   train_sfi.py reads them: target crop, mask, geometry, augmented source.
2. ``LCMDistillTrainable.forward`` (diffswap_igfi/sfi/distill.py): the teacher's frozen VAE,
   encoders and projectors make the conditions; the target latents are noised to a timestep t
   of the skipping-step grid; the student's consistency estimate at t is pulled towards the
   target network's estimate at t - k, after one DDIM step of the identity-guided teacher
   (guidance folded into the student: it samples without a null-identity half).
3. ``TrainLoop.step`` (diffswap_igfi/training/loop.py): backward, clip, optimizer, LR schedule,
   EMA, metrics.jsonl (loss, consistency, teacher_gap, guidance), tensorboard, checkpoints;
   then the target network (an EMA of the student) follows the student.

RUN_DIR receives what train_sfi.py's runs do; pipeline/ is the student, an LCMStudentPipeline
folder with an LCMScheduler: ``diffswap-igfi swap --checkpoint RUN_DIR/pipeline [--steps 1..4]``
(its default: ``distill.default_steps``). docs/training.md, "Distillation".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffswap_igfi.data.dataset import training_data
from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.training.config import config_to_dict
from diffswap_igfi.training.script import arguments, load_run_config, run


def main(argv=None) -> int:
    parser = arguments("Distil an SFI teacher into a few-step LCM student.")
    parser.add_argument("--teacher", default=None,
                        help="the teacher's pipeline folder (overrides the config's teacher:)")
    return run(train, parser, argv)


def load_teacher(folder):
    """The teacher: an SFI DiffSwapIGFIPipeline folder (train_sfi.py's RUN/pipeline)."""
    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.errors import ConfigError
    from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline

    if not folder:
        raise ConfigError("distillation needs a teacher: pass --teacher RUN/pipeline (the "
                          "folder train/train_sfi.py exported) or set teacher: in the config")
    pipe = load_pipeline(folder)
    if type(pipe) is not DiffSwapIGFIPipeline:
        raise ModelNotFoundError(f"{folder} holds a {type(pipe).__name__}; the teacher must be "
                                 f"an SFI DiffSwapIGFIPipeline (train/train_sfi.py's export)")
    return pipe


def train(args: argparse.Namespace) -> int:
    from diffswap_igfi.sfi.distill import DistillConfig

    config = load_run_config(args, DistillConfig)
    teacher = load_teacher(args.teacher or config.teacher)
    dataset = training_data(args.data, seed=config.train.seed, augment=config.augment,
                            reader=config.train.data_reader,
                            shuffle_buffer=config.train.shuffle_buffer,
                            crop_size=teacher.config.crop_size)  # the teacher's crops
    from diffswap_igfi.sfi.distill import LCMDistillTrainable
    from diffswap_igfi.sfi.student import student_pipeline
    from diffswap_igfi.training.loop import TrainLoop, flat
    # train_sfi.py's export (LoRA folded in) and validation grid, from the same folder
    from train_sfi import save_pipeline, validate

    run_dir = Path(args.output)
    loop = TrainLoop(run_dir, config.train, config.optim, config.ema, project="distill",
                     hparams=flat(config_to_dict(config)))
    d = config.distill
    model = LCMDistillTrainable(teacher, d)
    model.frozen.to(loop.accelerator.device)
    if config.lora.use:  # LCM-LoRA: the student is the teacher's UNet plus a LoRA
        from diffswap_igfi.adapters.lora import add_lora

        model.unet.requires_grad_(False)
        add_lora(model.unet, config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
    if config.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    target = model.attach_target()
    if target is not None:
        target.unet.to(loop.accelerator.device)
        loop.accelerator.register_for_checkpointing(target)  # restored by --resume
    params = [p for p in model.parameters() if p.requires_grad]
    student = model.unet
    model = loop.setup(model, params, dataset, args.resume)
    trainable = loop.accelerator.unwrap_model(model)
    if loop.step_count and target is not None:
        # a checkpoint is written inside loop.step, before that step's target update below:
        # the update is a function of the saved target and the restored student, so redo it
        target.update()

    pipe = student_pipeline(teacher, student, num_ddim_timesteps=d.num_ddim_timesteps,
                            timestep_scaling=d.timestep_scaling, default_steps=d.default_steps,
                            distilled_guidance=(d.guidance_min, d.guidance_max),
                            clip_sample=d.clip_sample, sampler=d.sampler)
    student.train()  # the pipeline puts its modules in eval mode
    for batch, seed in loop:
        if loop.step(model, batch, seed):
            trainable.update_target()
            if loop.due(config.train.validation_every):
                loop.on_main(lambda: validate(loop, pipe, (student,), run_dir))
    if args.dump_params:
        loop.dump_params(model)
    loop.export(lambda folder: save_pipeline(pipe, folder, lora=config.lora.use), "pipeline",
                (student,))
    loop.finish()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

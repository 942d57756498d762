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
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from diffswap_igfi.errors import DiffSwapError, InputError
from diffswap_igfi.training.config import config_to_dict, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the SFI stage.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/sfi/tiny.yaml")
    parser.add_argument("--data", required=True, help="DATA_DIR from diffswap-igfi preprocess")
    parser.add_argument("--output", required=True, help="RUN_DIR for logs, checkpoints, export")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--resume", default=None,
                        help="'latest' (the newest complete checkpoint in RUN_DIR) or a folder")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    parser.add_argument("--dump-params", action="store_true",
                        help="each process writes a digest of its parameters (DDP checks)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except DiffSwapError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def train(args: argparse.Namespace) -> int:
    # Everything that can be wrong with the inputs fails here, before a model is built.
    config = load_config(args.config)
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise InputError(f"--max-steps must be positive, got {args.max_steps}")
        config.train.max_steps = args.max_steps
    from diffswap_igfi.data.dataset import SFIDataset

    dataset = SFIDataset(args.data, latent_factor=8, seed=config.train.seed,
                         augment=config.augment)
    if dataset.crop_size != config.model.crop_size:
        raise InputError(f"{args.data} holds {dataset.crop_size}px crops but the config trains "
                         f"at {config.model.crop_size}px: preprocess with --crop-size "
                         f"{config.model.crop_size} or change model.crop_size")
    run_dir = Path(args.output)

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    from diffswap_igfi.sfi.training import SFITrainable, build_sfi_pipeline, training_scheduler
    from diffswap_igfi.training.checkpoint import (load_checkpoint, resolve_resume,
                                                   save_checkpoint)
    from diffswap_igfi.training.logs import MetricsLog

    c = config.train
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # `--cpu` would silently start a single process
        mixed_precision=c.mixed_precision, gradient_accumulation_steps=c.gradient_accumulation_steps,
        log_with="tensorboard", project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    set_seed(c.seed)

    # Models: the pipeline the config describes; the UNet and projectors train.
    pipe = build_sfi_pipeline(config)
    id_loss = None
    if config.loss.id_weight > 0:
        from diffswap_igfi.sfi.losses import IdentityLoss

        id_loss = IdentityLoss(pipe.identity_encoder)
    model = SFITrainable(pipe, training_scheduler(pipe), config, id_loss)
    model.frozen.to(accelerator.device)
    for name in ("unet", "id_projector", "clip_projector"):
        getattr(model, name).requires_grad_(name in c.train_modules)
    if config.lora.use:
        from diffswap_igfi.adapters.lora import add_lora

        model.unet.requires_grad_(False)
        add_lora(model.unet, config.lora.rank, config.lora.alpha, tuple(config.lora.targets))
    if c.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.beta1, o.beta2),
                                  eps=o.eps, weight_decay=o.weight_decay)
    lr_schedule = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps,
                                num_training_steps=c.max_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=c.batch_size, shuffle=True,
                                         num_workers=c.num_workers,
                                         drop_last=len(dataset) >= c.batch_size)
    model, optimizer, loader, lr_schedule = accelerator.prepare(model, optimizer, loader,
                                                                lr_schedule)
    ema = EMAModel(params, decay=config.ema.decay) if config.ema.use else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step = 0
    checkpoint = resolve_resume(run_dir, args.resume)
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    metrics = MetricsLog(run_dir, accelerator.is_main_process)
    metrics.truncate_after(step)
    accelerator.init_trackers("sfi", config=_flat(config_to_dict(config)))

    steps_per_epoch = max(1, len(loader) // c.gradient_accumulation_steps)
    bar = tqdm(total=c.max_steps, initial=step, desc="training", unit="step",
               disable=not accelerator.is_local_main_process)
    micro = 0
    while step < c.max_steps:
        epoch = step // steps_per_epoch
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        skip = (step % steps_per_epoch) * c.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        started = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                seed = _noise_seed(c.seed, step, micro, accelerator.process_index)
                out = model(batch, torch.tensor([seed]))
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and o.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, o.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            micro = (micro + 1) % c.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step(params)
            values = accelerator.gather(torch.stack([out["loss"].detach(), out["diffusion"],
                                                     out["identity"]])[None]).mean(0)
            record = {"step": step, "loss": float(values[0]), "diffusion": float(values[1]),
                      "identity": float(values[2]), "lr": lr_schedule.get_last_lr()[0],
                      "seconds": time.perf_counter() - started}
            started = time.perf_counter()
            metrics.write(record)
            if step % c.log_every == 0:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if step % c.checkpoint_every == 0 or step == c.max_steps:
                save_checkpoint(accelerator, run_dir, step, keep=c.keep_checkpoints,
                                info={"loss": record["loss"]})
            if step % c.validation_every == 0 or step == c.max_steps:
                _validate(accelerator, pipe, ema, params, run_dir, step)
            if step >= c.max_steps:
                break
    bar.close()
    if args.dump_params:
        _dump_params(accelerator, model, run_dir)
    _export(accelerator, pipe, ema, params, run_dir)
    accelerator.end_training()
    return 0


def _noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


def _with_ema(pipe, ema, params, fn):
    """Run ``fn`` with the EMA weights in place, then put the trained weights back."""
    modules = (pipe.unet, pipe.id_projector, pipe.clip_projector)
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        return fn()
    finally:
        if ema is not None:
            ema.restore(params)
        for m, mode in zip(modules, modes):
            m.train(mode)


def _validate(accelerator, pipe, ema, params, run_dir: Path, step: int) -> None:
    """A swap grid on the shipped photos (source | target | swap), as PNG and in tensorboard."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import numpy as np
        import torch

        from diffswap_igfi.io.images import load_image
        from diffswap_igfi.io.samples import sample_path
        from diffswap_igfi.provenance.metadata import COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA
        from diffswap_igfi.provenance.write import write_synthetic_image
        from diffswap_igfi.training.logs import image_grid

        pipe.set_progress_bar_config(disable=True)
        source = load_image(sample_path("grace_hopper")).rgb
        target = load_image(sample_path("astronaut")).rgb

        def run():
            with torch.no_grad():
                return pipe(source, target, num_inference_steps=10, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0))

        out = _with_ema(pipe, ema, params, run)
        size = out.crops.shape[1]
        src_crop = pipe._builder.aligned(source, pipe._detector.detect(source)[0]).crop
        tgt_crop = pipe._builder.aligned(target, pipe._detector.detect(target)[0]).crop
        grid = image_grid([[np.asarray(src_crop)[:size, :size], tgt_crop, out.crops[0]]])
        path = run_dir / "validation" / f"step-{step:08d}.png"
        write_synthetic_image(path, grid, None, engine="diffusion-validation",
                              digital_source_type=COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA)
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation/source|target|swap", grid, step, dataformats="HWC")
    accelerator.wait_for_everyone()


def _dump_params(accelerator, model, run_dir: Path) -> None:
    import json

    import torch

    unwrapped = accelerator.unwrap_model(model)
    digest = hashlib.sha256()
    total = 0.0
    for name, p in sorted(unwrapped.named_parameters()):
        data = p.detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += float(data.double().sum())
    path = run_dir / f"params-rank{accelerator.process_index}.json"
    path.write_text(json.dumps({"sha256": digest.hexdigest(), "sum": total,
                                "world_size": accelerator.num_processes,
                                "torch_threads": torch.get_num_threads()}))


def _export(accelerator, pipe, ema, params, run_dir: Path) -> None:
    """The EMA weights as a pipeline folder, written under a temporary name and renamed."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final, tmp = run_dir / "pipeline", run_dir / ".tmp-pipeline"
        shutil.rmtree(tmp, ignore_errors=True)
        _with_ema(pipe, ema, params, lambda: pipe.save_pretrained(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        accelerator.print(f"exported {final}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())

"""The accelerate training loop shared by the SFI and JR trainers (launch-time checks: runtime.py).

A trainer builds its model (a module whose ``forward(batch, noise_seed)`` returns a dict with a
``loss``), its dataset and its export; ``TrainLoop`` does the rest once: the Accelerator (CPU
processes get ``cpu=True`` so several of them really run), optimizer and LR schedule, EMA,
gradient accumulation and clipping, deterministic per-step seeds, ``--resume`` from the newest
complete checkpoint with the data order of the uninterrupted run, metrics.jsonl, tensorboard,
atomic checkpoints, and an atomic export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from diffswap_igfi.training.config import EMAConfig, OptimConfig, RunConfig
from diffswap_igfi.training.logs import MetricsLog
from diffswap_igfi.training.runtime import (build_optimizer, check_deepspeed, misplaced_state,
                                            resolve_mixed_precision, using_deepspeed)


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A seed for one micro-batch, a pure function of where it is in the run."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def epoch_repeats(samples: int, processes: int, batch_size: int, accumulation: int) -> int:
    """How many times an epoch shows each sample so that every process gets at least one
    accumulation cycle of full batches: 1 unless the data set is smaller than one optimizer
    step's ``processes * batch_size * accumulation`` samples."""
    per_step = processes * batch_size * accumulation
    return max(1, -(-per_step // max(samples, 1)))


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"a.b": scalar} for tensorboard hyper-parameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


class TrainLoop:
    """``for batch, seed in loop: loop.step(model, batch, seed)`` until ``train.max_steps``.

    The dataset has ``__len__``, ``set_epoch(epoch)`` and ``set_repeat(times)`` (see
    ``data.dataset.SFIDataset``).
    """

    def __init__(self, run_dir: Path, train: RunConfig, optim: OptimConfig, ema: EMAConfig,
                 *, project: str, hparams: dict | None = None) -> None:
        from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        self.run_dir, self.train, self.optim, self.ema_config = Path(run_dir), train, optim, ema
        check_deepspeed(train, optim)
        precision, note = resolve_mixed_precision(train.mixed_precision)
        self.accelerator = Accelerator(
            # `--cpu` would silently start one process; DeepSpeed picks its own (CPU) device
            cpu=not torch.cuda.is_available() and not using_deepspeed(),
            mixed_precision=precision,
            # cycles of exactly `gradient_accumulation_steps` micro-batches, across epoch ends
            # (accelerate's default would cut a cycle short at the end of every epoch)
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=train.gradient_accumulation_steps, sync_with_dataloader=False),
            log_with="tensorboard", project_dir=str(self.run_dir),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                             *self._process_group_kwargs()])
        if note:
            self.accelerator.print(note)
        set_seed(train.seed)
        self.project, self.hparams = project, {**(hparams or {}), "mixed_precision": precision}
        self.step_count = 0
        self._micro = 0
        self._last: dict = {}

    @staticmethod
    def _process_group_kwargs() -> list:
        """DeepSpeed without CUDA: accelerate finds no backend, lets DeepSpeed form a gloo group
        of every process, yet records a world of one (every rank thought it was rank 0 of 1,
        read the whole data set, and DeepSpeed refused its batch size). Naming gloo makes
        accelerate take ranks and world size from that group."""
        from accelerate import InitProcessGroupKwargs

        if using_deepspeed() and not torch.cuda.is_available():
            return [InitProcessGroupKwargs(backend="gloo")]
        return []

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------------------ set-up
    def setup(self, model: torch.nn.Module, params: list, dataset, resume: str | None):
        """Optimizer, schedule, loader, EMA; then resume. Returns the prepared model.

        params: the parameters that train (the others of ``model`` are left out of
        checkpoints: a LoRA checkpoint holds the adapter, not the frozen UNet)."""
        from diffusers.optimization import get_scheduler

        from diffswap_igfi.training.ema import EMA

        t, o, acc = self.train, self.optim, self.accelerator
        self.params, self.dataset = params, dataset
        optimizer = build_optimizer(params, o)
        # stepped by us once per optimizer step: accelerate would step a prepared schedule
        # once per process, running it N times too fast on N processes
        self.schedule = get_scheduler(o.lr_scheduler, optimizer,
                                      num_warmup_steps=o.lr_warmup_steps,
                                      num_training_steps=t.max_steps)
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        if self.streaming:
            loader = self._stream_loader(dataset)
            model, self.optimizer = acc.prepare(model, optimizer)
        else:
            loader = self._index_loader(dataset)
            model, self.optimizer, loader = acc.prepare(model, optimizer, loader)
        self.loader = loader
        acc.register_for_checkpointing(self.schedule)
        self.trained_names = self._keep_trained_only(model)
        e = self.ema_config
        self.ema = (EMA(params, e.decay, device="cpu" if e.on_cpu else None,
                        every=e.update_every) if e.use else None)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        checkpoint = resolve_resume(self.run_dir, resume)
        if checkpoint is not None:
            self.step_count = load_checkpoint(acc, checkpoint, required=self.trained_names,
                                              partial=self.partial_checkpoints)
            wrong = misplaced_state(params, self.optimizer, self.ema)
            if wrong:
                raise ConfigError(f"resumed state is on the wrong device ({wrong[0]}; "
                                  f"{len(wrong)} in all): report this with the command line")
            acc.print(f"resumed from {checkpoint} at step {self.step_count}")
        self.metrics = MetricsLog(self.run_dir, acc.is_main_process)
        self.metrics.truncate_after(self.step_count)
        acc.init_trackers(self.project, config=self.hparams)
        return model

    def _index_loader(self, dataset) -> torch.utils.data.DataLoader:
        """Random access (``SFIDataset``): accelerate shards the sample indices per process."""
        t, acc = self.train, self.accelerator
        repeat = epoch_repeats(len(dataset), acc.num_processes, t.batch_size,
                               t.gradient_accumulation_steps)
        if repeat > 1:
            dataset.set_repeat(repeat)
            acc.print(f"data: {len(dataset) // repeat} samples are fewer than one optimizer step "
                      f"takes ({acc.num_processes} processes x batch {t.batch_size} x "
                      f"accumulation {t.gradient_accumulation_steps}): every epoch shows each "
                      f"sample {repeat} times, with its own augmentations")
        # drop_last: every process gets the same number of full batches (at least one
        # accumulation cycle per epoch, thanks to the repeats above)
        return torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=True,
                                           num_workers=t.num_workers, drop_last=True)

    def _stream_loader(self, stream) -> torch.utils.data.DataLoader:
        """A ``ShardStream``: every process and worker reads its own shards; the loader is
        not prepared (accelerate would make every process read everything), batches are
        moved to the device in ``__iter__``. Every reader gives the same whole number of
        batches per epoch."""
        t, acc = self.train, self.accelerator
        workers = max(1, t.num_workers)
        readers = acc.num_processes * workers
        stream.set_shard(acc.process_index, acc.num_processes)
        stream.shards_of(0, readers)  # fewer shards than readers: refused here, in one line
        quota = stream.total // readers // t.batch_size * t.batch_size
        self.stream_batches = workers * quota // t.batch_size  # per process and epoch
        if self.stream_batches < t.gradient_accumulation_steps:
            raise ConfigError(
                f"streaming {stream.total} samples to {readers} readers ({acc.num_processes} "
                f"processes x {workers} workers) leaves {self.stream_batches} batches of "
                f"{t.batch_size} per process and epoch, fewer than one optimizer step "
                f"(accumulation {t.gradient_accumulation_steps}): use train.data_reader: index")
        stream.samples_per_reader = quota
        return torch.utils.data.DataLoader(stream, batch_size=t.batch_size,
                                           num_workers=t.num_workers, drop_last=True)

    def _keep_trained_only(self, model: torch.nn.Module) -> set[str]:
        """Checkpoints hold the trained parameters (and buffers), not the frozen ones, which
        the trainer rebuilds from the config. Returns the names of the trained parameters."""
        unwrapped = self.accelerator.unwrap_model(model)
        frozen = {name for name, p in unwrapped.named_parameters() if not p.requires_grad}

        def drop_frozen(models, weights, output_dir) -> None:
            for i, state in enumerate(weights):
                weights[i] = {k: v for k, v in state.items() if k not in frozen}

        # DeepSpeed writes its own checkpoint files, whole
        self.partial_checkpoints = bool(frozen) and not self.deepspeed
        if self.partial_checkpoints:
            self.accelerator.register_save_state_pre_hook(drop_frozen)
        return {name for name, p in unwrapped.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------- looping
    def __iter__(self) -> Iterator[tuple[dict, torch.Tensor]]:
        from tqdm import tqdm

        t, acc = self.train, self.accelerator
        # micro-batches per process and epoch
        per_epoch = self.stream_batches if self.streaming else len(self.loader)
        if per_epoch < t.gradient_accumulation_steps:  # setup rules this out
            raise ConfigError(f"an epoch holds {per_epoch} batches per process, fewer than "
                              f"train.gradient_accumulation_steps "
                              f"{t.gradient_accumulation_steps}: lower it")
        self.bar = tqdm(total=t.max_steps, initial=self.step_count, desc=self.project,
                        unit="step", disable=not acc.is_local_main_process)
        self._started = time.perf_counter()
        # the run is one stream of micro-batches, epoch after epoch; an accumulation cycle may
        # span two epochs, and a checkpoint always falls between two cycles
        consumed = self.step_count * t.gradient_accumulation_steps
        while self.step_count < t.max_steps:
            epoch, skip = divmod(consumed, per_epoch)
            batches = self._epoch(epoch, skip)
            before, yielded = self.step_count, 0
            for batch in batches:
                seed = noise_seed(t.seed, self.step_count, self._micro, acc.process_index)
                if t.log_samples:
                    self._log_samples(batch, epoch)
                consumed += 1
                yielded += 1
                yield batch, torch.tensor([seed])
                if self.step_count >= t.max_steps:
                    break
            if yielded == 0 or (yielded >= t.gradient_accumulation_steps
                                and self.step_count == before):
                raise ConfigError(
                    f"epoch {epoch} gave {yielded} batches per process and no optimizer step "
                    f"(accumulation {t.gradient_accumulation_steps}): call loop.step(...) on "
                    f"every batch the loop yields")
        self.bar.close()

    def _epoch(self, epoch: int, skip: int):
        """The batches of ``epoch`` after the first ``skip`` (a resumed run)."""
        if self.streaming:
            from accelerate.utils import send_to_device

            self.dataset.set_batches_done(epoch, skip, self.train.batch_size)
            return (send_to_device(b, self.accelerator.device) for b in self.loader)
        self.dataset.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def _log_samples(self, batch: dict, epoch: int) -> None:
        """One line per micro-batch: the step it feeds, its epoch and a digest of each target
        crop (the stored sample; augmentations touch the source only)."""
        import json

        crops = batch["target"].detach().cpu().contiguous()
        digests = [hashlib.sha256(c.numpy().tobytes()).hexdigest()[:16] for c in crops]
        record = {"step": self.step_count + 1, "micro": self._micro, "epoch": epoch,
                  "samples": digests}
        path = self.run_dir / f"samples-rank{self.accelerator.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)  # the main process may not have yet
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, model: torch.nn.Module, batch: dict, seed: torch.Tensor) -> bool:
        """Forward, backward and (every accumulation cycle) an optimizer step with its
        bookkeeping. Returns True when an optimisation step completed."""
        acc, t = self.accelerator, self.train
        with acc.accumulate(model):
            with self.autocast():
                out = model(batch, seed)
            acc.backward(out["loss"])
            if acc.sync_gradients and self.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, self.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._micro = (self._micro + 1) % t.gradient_accumulation_steps
        if not acc.sync_gradients:
            return False
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        if not self.optimizer.step_was_skipped:  # fp16 overflow: the schedule waits too
            self.schedule.step()
        self.step_count += 1
        if self.ema is not None:
            self.ema.step()
        names = sorted(out)
        values = acc.gather(torch.stack([out[k].detach().float() for k in names])[None]).mean(0)
        record = {"step": self.step_count, **{k: float(v) for k, v in zip(names, values)},
                  "lr": lr,
                  "seconds": time.perf_counter() - self._started}
        self._started = time.perf_counter()
        self._last = record
        self.metrics.write(record)
        if self.step_count % t.log_every == 0:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step_count)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        if self.due(t.checkpoint_every):
            save_checkpoint(acc, self.run_dir, self.step_count, keep=t.keep_checkpoints,
                            info={"loss": record["loss"]})
        return True

    def autocast(self):
        """Under DeepSpeed fp16/bf16 the trained modules are cast to that dtype and nothing
        casts their inputs (the frozen VAE and encoders stay fp32): autocast does. Elsewhere
        accelerate's own autocast is already active inside the prepared model."""
        import contextlib

        precision = self.accelerator.mixed_precision
        if not self.deepspeed or precision not in ("fp16", "bf16"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.accelerator.device.type, dtype=dtype)

    def due(self, every: int) -> bool:
        """Whether a periodic action falls on the step just completed (and on the last one)."""
        return self.step_count % every == 0 or self.step_count == self.train.max_steps

    # ------------------------------------------------------------------------------ endings
    def with_ema(self, modules, fn: Callable):
        """Run ``fn`` with the EMA weights in place (modules in eval), then restore."""
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        if self.ema is not None:
            self.ema.store()
            self.ema.copy_to()
        try:
            return fn()
        finally:
            if self.ema is not None:
                self.ema.restore()
            for m, mode in zip(modules, modes):
                m.train(mode)

    def on_main(self, fn: Callable) -> None:
        """Run ``fn`` on the main process while the others wait."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            fn()
        self.accelerator.wait_for_everyone()

    def export(self, save: Callable[[Path], None], name: str, modules) -> Path:
        """``save(folder)`` with EMA weights, written under a temporary name and renamed."""
        final, tmp = self.run_dir / name, self.run_dir / f".tmp-{name}"

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            self.with_ema(modules, lambda: save(tmp))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.accelerator.print(f"exported {final}")

        self.on_main(write)
        return final

    def dump_params(self, model: torch.nn.Module) -> None:
        """Each process writes a digest of its parameters (to check DDP keeps them equal)."""
        import json

        unwrapped = self.accelerator.unwrap_model(model)
        digest = hashlib.sha256()
        for name, p in sorted(unwrapped.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        rank = self.accelerator.process_index
        (self.run_dir / f"params-rank{rank}.json").write_text(json.dumps(
            {"sha256": digest.hexdigest(), "world_size": self.accelerator.num_processes}))

    def finish(self) -> None:
        self.accelerator.end_training()

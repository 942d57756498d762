"""``ShardStream``: a DATA_DIR read shard by shard, for data sets too large to index.

``ShardIndex`` (random access) scans every shard's tar headers and keeps the offsets of every
sample in every process; with FFHQ-70k that is ~100 MB per process, and every node reads every
shard. ``ShardStream`` instead:

- splits shards across readers: reader ``g = rank * workers + worker`` of ``R = world_size *
  workers`` takes shards ``order[g::R]`` of an epoch's seeded shard order, so nodes, processes
  and DataLoader workers read disjoint files (a refusal when there are fewer shards than
  readers: preprocess with a smaller ``--shard-size``);
- reads each shard front to back (``tarfile`` streaming), holding at most ``shuffle_buffer``
  encoded samples (bounded memory, whatever the data set's size), and shuffles through that
  buffer with a generator seeded by (seed, epoch, reader);
- gives every reader the same number of samples per epoch (``samples_per_reader``; by default
  ``total // R``), wrapping round its own shards when they hold fewer, so every process sees
  the same number of batches (DDP needs that);
- resumes: ``set_position(epoch, done)`` makes each reader skip the ``done`` samples it already
  gave in that epoch, without decoding them. With a DataLoader of W workers and batch size b,
  after k batches worker w gave ``b * ceil((k - w) / W)`` samples (``reader_position``).

Items are ``{"__key__": str, field: decoded value}`` as ``ShardIndex`` gives them, or
``transform(sample, rng, index)`` of that (e.g. ``SFIDataset.make_sample``).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from diffswap_igfi.data.shards import decode, read_index
from diffswap_igfi.errors import InputError


def reader_position(batches: int, batch_size: int, worker: int, workers: int) -> int:
    """Samples DataLoader worker ``worker`` of ``workers`` gave after ``batches`` batches (the
    DataLoader takes batches from its workers in turn)."""
    workers = max(1, workers)
    return batch_size * max(0, -(-(batches - worker) // workers))


def read_tar(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field.ext: bytes}) for every sample of a shard, front to back."""
    current, fields = None, {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, field = member.name.rsplit("/", 1)[-1].partition(".")
                if key != current and current is not None:
                    yield current, fields
                    fields = {}
                current = key
                fields[field] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"{path} is unreadable ({e}): delete it and rerun "
                         f"`diffswap-igfi preprocess`") from None
    if current is not None:
        yield current, fields


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, data_dir: str | os.PathLike, *, seed: int = 0, shuffle_buffer: int = 256,
                 rank: int = 0, world_size: int = 1, samples_per_reader: int | None = None,
                 transform: Callable[[dict, np.random.Generator, int], dict] | None = None
                 ) -> None:
        self.data_dir = Path(data_dir)
        index = read_index(self.data_dir)
        self.shards = [(self.data_dir / e["name"], int(e["samples"]))
                       for e in index.get("shards", []) if e["samples"] > 0]
        self.total = sum(n for _, n in self.shards)
        self.crop_size = int(index["crop_size"])
        if not self.shards:
            raise InputError(f"data folder {self.data_dir} holds no samples: run "
                             f"`diffswap-igfi preprocess IN_DIR DATA_DIR` first")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.seed, self.buffer = int(seed), int(shuffle_buffer)
        self.rank, self.world_size = int(rank), int(world_size)
        self.samples_per_reader = samples_per_reader
        self.transform = transform
        self.epoch, self.done, self.batches = 0, 0, None

    def set_shard(self, rank: int, world_size: int) -> None:
        """This process's place among ``world_size`` (the training loop knows it)."""
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, done: int) -> None:
        """Start at ``epoch`` with ``done`` samples of it already given by every reader (call
        this before iterating)."""
        self.epoch, self.done, self.batches = int(epoch), int(done), None

    def set_batches_done(self, epoch: int, batches: int, batch_size: int) -> None:
        """Start at ``epoch`` after a DataLoader of this stream gave ``batches`` batches of
        ``batch_size``: each worker skips what it gave (``reader_position``)."""
        self.epoch, self.done, self.batches = int(epoch), 0, (int(batches), int(batch_size))

    def reader(self) -> tuple[int, int]:
        """(this reader's number, the number of readers) over processes and workers."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def per_reader(self, readers: int) -> int:
        return self.samples_per_reader or self.total // readers

    def shards_of(self, reader: int, readers: int) -> list[Path]:
        """This reader's shards in the current epoch."""
        if len(self.shards) < readers:
            raise InputError(f"{self.data_dir} holds {len(self.shards)} shards for {readers} "
                             f"readers (processes x DataLoader workers): preprocess with a "
                             f"smaller --shard-size, or use fewer workers")
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        return [self.shards[k][0] for k in order[reader::readers]]

    def __len__(self) -> int:
        """Samples per epoch of this process (its readers together), for DataLoader sizing."""
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        return self.per_reader(self.world_size * workers) * workers

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self.reader()
        mine, quota = self.shards_of(reader, readers), self.per_reader(readers)
        rng = np.random.default_rng([self.seed, self.epoch, reader])
        done = self.done
        if self.batches is not None:
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            done = reader_position(*self.batches, worker, workers)
        given = 0
        for key, fields in self._passes(mine, rng):
            if given >= quota:
                return
            given += 1
            if given <= done:
                continue  # resuming: skipped without decoding
            sample = {"__key__": key}
            for field, data in fields.items():
                sample[field.rsplit(".", 1)[0]] = decode(field, data)
            if self.transform is not None:
                index = self.epoch * readers * quota + reader * quota + given - 1
                sample = self.transform(sample, np.random.default_rng(
                    [self.seed, self.epoch, reader, given]), index)
            yield sample

    def _passes(self, paths: list[Path], rng: np.random.Generator) -> Iterator:
        """The reader's shards front to back, shuffled through the buffer, pass after pass
        (the quota stops it); a pass is flushed before the next, so a reader whose quota is
        its own sample count gives each sample exactly once."""
        while True:
            found = 0
            for item in self._shuffled((item for path in paths for item in read_tar(path)),
                                       rng):
                found += 1
                yield item
            if not found:
                raise InputError(f"shards {[p.name for p in paths]} hold no samples: rerun "
                                 f"`diffswap-igfi preprocess`")

    def _shuffled(self, stream: Iterator, rng: np.random.Generator) -> Iterator:
        """Shuffle through a buffer of ``self.buffer`` encoded samples, then drain it."""
        buffer: list = []
        for item in stream:
            if len(buffer) < self.buffer:
                buffer.append(item)
                continue
            k = int(rng.integers(len(buffer)))
            yield buffer[k]
            buffer[k] = item
        for k in rng.permutation(len(buffer)):
            yield buffer[k]

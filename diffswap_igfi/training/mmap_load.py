"""Start-up memory: models built without weights and filled from memory-mapped files.

Every training process builds the whole pipeline before moving it to its GPU. Built the usual
way (random init, then a copy of the checkpoint into it) that is ~7.5 GB of host memory per
process for SD-1.5 inpainting with a ViT-L CLIP (peak RSS, measured), 60 GB on an 8-GPU node. Here a module is
created on the meta device (no memory, no random init), and its parameters become the tensors
of a memory-mapped safetensors (or torch zip) file: their pages belong to the page cache, are
read on first touch and shared by every process of the node that maps the same file, until
``.to(cuda)`` copies them to the GPU. The mapping is private (copy-on-write): writing to a
parameter (an optimizer step on the CPU) copies that page and never changes the file.

``bench/bench_startup_memory.py`` measures the effect (peak RSS and PSS per rank).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


class WeightsMismatch(ValueError):
    """A weights file that does not fit the module built for it (keys or shapes)."""


def empty_module(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``factory()`` with its parameters on the meta device (buffers stay real: several are
    computed in ``__init__`` and are not in checkpoints)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def mmap_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (or a sharded one's ``.index.json``), or of a torch
    zip file (``.bin``/``.pt``/``.pth``, tensors only), memory-mapped and not copied."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(mmap_state_dict(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)  # mmap (MAP_PRIVATE) views, see module docstring
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def fill(module: torch.nn.Module, state: dict[str, torch.Tensor],
         dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Make ``state``'s tensors the parameters and buffers of ``module`` (built by
    ``empty_module``), without copying those already in ``dtype`` (default: as stored).

    Raises WeightsMismatch, naming a few keys, when keys or shapes differ or a parameter is
    left on the meta device."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise WeightsMismatch(f"missing {missing[:3]}, unexpected {unexpected[:3]}, other "
                              f"shapes {shapes[:3]} ({len(missing)}/{len(unexpected)}/"
                              f"{len(shapes)} in all)")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()]
            if t.is_meta]
    if left:
        raise WeightsMismatch(f"{len(left)} tensors have no weights, e.g. {left[:3]}")
    return module


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of the file mappings of this process (Linux /proc/self/maps)."""
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, end, parts[5]))
    return found


def file_backed_share(module: torch.nn.Module, path: str | Path | None = None) -> float:
    """The share (0..1, by bytes) of ``module``'s parameters whose memory lies in a mapping of
    ``path`` (any file when None): 1.0 right after ``fill`` from ``mmap_state_dict``, 0.0 for
    a module built and loaded the usual way."""
    target = None if path is None else str(Path(path).resolve())
    spans = [(s, e) for s, e, p in mapped_files() if target is None or p == target]
    total = backed = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        total += size
        ptr = p.data_ptr()
        if any(s <= ptr < e for s, e in spans):
            backed += size
    return backed / total if total else 0.0


def memory_now() -> dict[str, float]:
    """This process's memory in MiB: ``rss``, ``pss`` (shared pages divided among the processes
    that map them), ``private`` (pages only this process holds), ``file_rss`` (file-backed
    resident pages), ``peak_rss`` (VmHWM, the high-water mark). Linux only."""
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0]) / 1024
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("VmHWM", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    return {"rss": rollup["Rss"], "pss": rollup["Pss"],
            "private": rollup["Private_Clean"] + rollup["Private_Dirty"],
            "file_rss": status["RssFile"], "peak_rss": status["VmHWM"]}

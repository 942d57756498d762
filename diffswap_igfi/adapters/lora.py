"""LoRA on a diffusers UNet through peft (diffusers' own peft integration, ``unet.add_adapter``).

``add_lora`` wraps the attention projections; peft initialises every ``lora_B`` to zero, so a
freshly added LoRA leaves the UNet's output unchanged to the last bit. ``save_lora`` writes only
the LoRA tensors, in the layout diffusers' pipelines read (``pytorch_lora_weights.safetensors``,
keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, the LoRA config in the safetensors
metadata), so a stock pipeline can also take them with ``pipe.load_lora_weights(folder)``; plus a
small ``lora_config.json`` (rank, alpha, target modules) that ``load_lora`` checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from diffswap_igfi.errors import ConfigError, ModelNotFoundError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CONFIG_NAME = "lora_config.json"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_PREFIX = "unet."  # diffusers' pipelines keep a UNet's LoRA under this prefix
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, *,
             adapter_name: str = "default") -> None:
    """Add a LoRA adapter (rank ``rank``, scale ``alpha / rank``; alpha defaults to rank) to every
    module of ``unet`` whose name ends with one of ``target_modules``, and make it active.

    The base weights are not frozen here; training code freezes what it does not train.
    """
    if rank < 1:
        raise ConfigError(f"add_lora: rank must be >= 1, got {rank}")
    targets = _targets(target_modules)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                        target_modules=targets, init_lora_weights=True)
    if adapter_name in getattr(unet, "peft_config", {}):
        raise ConfigError(f"add_lora: the UNet already has a LoRA adapter named {adapter_name!r}")
    names = [name for name, _ in unet.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(f"add_lora: no module of the UNet matches target(s) {unmatched}")
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"add_lora: cannot add LoRA to {targets}: "
                          f"{str(exc).splitlines()[0]}") from exc


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``unet`` (what an optimizer trains)."""
    return [p for name, p in unet.named_parameters() if ".lora_" in name]


def lora_settings(unet: nn.Module, adapter_name: str = "default") -> dict:
    """{"rank", "alpha", "target_modules"} of the UNet's LoRA adapter ``adapter_name``."""
    config = getattr(unet, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ConfigError(f"the UNet has no LoRA adapter named {adapter_name!r}; "
                          f"call add_lora first")
    return {"rank": int(config.r), "alpha": float(config.lora_alpha),
            "target_modules": _targets(config.target_modules)}


def save_lora(unet: nn.Module, path: Path, *, adapter_name: str = "default") -> Path:
    """Write the UNet's LoRA weights (only those) to the folder ``path``; return the folder.

    Files: ``pytorch_lora_weights.safetensors`` and ``lora_config.json``.
    """
    settings = lora_settings(unet, adapter_name)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    tensors = {_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {f"{_PREFIX}r": settings["rank"], f"{_PREFIX}lora_alpha": settings["alpha"],
                f"{_PREFIX}target_modules": settings["target_modules"]}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_NAME),
                                metadata={"format": "pt", _METADATA_KEY: json.dumps(metadata)})
    (path / CONFIG_NAME).write_text(json.dumps({**settings, "weights": WEIGHTS_NAME}, indent=2)
                                    + "\n", encoding="utf-8")
    return path


def load_lora(unet: nn.Module, path: Path, *, adapter_name: str = "default") -> None:
    """Load a LoRA written by ``save_lora`` into ``unet`` and make it active.

    Adds the adapter if the UNet has none of that name; if it has one, its rank, alpha and targets
    must match the file's. Raises ModelNotFoundError for a missing folder or file, ConfigError for
    an unreadable config or weights that do not fit the UNet (other targets, ranks or widths).
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise ModelNotFoundError(f"LoRA file not found: {needed} (write one with save_lora)")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        settings = {"rank": int(saved["rank"]), "alpha": float(saved["alpha"]),
                    "target_modules": _targets(saved["target_modules"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{config_path}: not a LoRA config ({exc})") from exc

    added = adapter_name not in getattr(unet, "peft_config", {})
    if added:
        add_lora(unet, settings["rank"], settings["alpha"], settings["target_modules"],
                 adapter_name=adapter_name)
    elif (existing := lora_settings(unet, adapter_name)) != settings:
        raise ConfigError(f"{path}: LoRA {settings} does not match the UNet's adapter "
                          f"{adapter_name!r} {existing}")
    try:
        _load_state(unet, path, weights_path, settings, adapter_name)
    except ConfigError:
        if added:  # leave the UNet as it was
            unet.delete_adapters(adapter_name)
        raise
    unet.set_adapter(adapter_name)


def _load_state(unet: nn.Module, path: Path, weights_path: Path, settings: dict,
                adapter_name: str) -> None:
    try:
        tensors = safetensors.torch.load_file(str(weights_path))
    except (safetensors.SafetensorError, OSError) as exc:
        raise ConfigError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    foreign = [k for k in tensors if not k.startswith(_PREFIX) or ".lora_" not in k]
    if foreign:
        raise ConfigError(f"{weights_path}: not a UNet LoRA file (e.g. key {foreign[0]!r})")
    state = {k.removeprefix(_PREFIX): v for k, v in tensors.items()}
    expected = set(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ConfigError(f"{path}: LoRA weights do not match targets {settings['target_modules']}"
                          f" on this UNet ({len(odd)} keys differ, e.g. {odd[0]!r})")
    try:
        set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    except RuntimeError as exc:  # size mismatch: a LoRA for another UNet width
        raise ConfigError(f"{path}: LoRA weights do not fit this UNet: "
                          f"{str(exc).strip().splitlines()[-1].strip()}") from exc


def _targets(target_modules: Sequence[str] | str) -> list[str]:
    """Target module suffixes as a sorted list (peft stores a set)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = sorted({str(t) for t in target_modules})
    if not targets:
        raise ConfigError("LoRA: target_modules is empty")
    return targets


def merged_copy(unet):
    """A copy of ``unet`` with its LoRA weights folded into the base weights and the adapter
    layers removed: a plain UNet2DConditionModel that saves and loads like any other."""
    import copy

    merged = copy.deepcopy(unet)
    merged.fuse_lora(lora_scale=1.0)
    merged.unload_lora()
    return merged

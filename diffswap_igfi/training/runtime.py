"""What a training run is launched with, checked before the loop starts: the mixed precision
(config or launcher), DeepSpeed's settings against ours, the optimizer (AdamW or 8-bit AdamW),
and where the resumed state sits."""

from __future__ import annotations

import os

import torch

from diffswap_igfi.errors import ConfigError
from diffswap_igfi.training.config import OptimConfig, RunConfig


def resolve_mixed_precision(configured: str, environ=os.environ) -> tuple[str, str | None]:
    """The precision to train in, and a line to print when it is not the config's.

    ``accelerate launch --mixed_precision X`` and an accelerate YAML's ``mixed_precision`` reach
    the script as ACCELERATE_MIXED_PRECISION. A launcher asking for fp16/bf16 is honoured; its
    "no" is also what it passes when nothing was asked, so it cannot switch a bf16 config off
    (set ``train.mixed_precision: "no"`` for that)."""
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched in ("", "no") or launched == configured:
        return configured, None
    if launched not in ("fp16", "bf16"):
        raise ConfigError(f"the launcher asks for mixed precision {launched!r}; this trainer "
                          f"supports no, fp16 and bf16: change the accelerate config")
    return launched, (f"mixed precision: {launched} from the launcher (the training config "
                      f"says {configured})")


def using_deepspeed(environ=os.environ) -> bool:
    """Whether ``accelerate launch`` asked for DeepSpeed."""
    return environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_deepspeed(train: RunConfig, optim: OptimConfig, environ=os.environ) -> None:
    """DeepSpeed takes accumulation and clipping from its own config and would silently
    replace ours: refuse when they disagree (leave them out of the accelerate YAML)."""
    if not using_deepspeed(environ):
        return
    accumulation = environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if accumulation.isdigit() and int(accumulation) != train.gradient_accumulation_steps:
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps "
                          f"{accumulation}, the training config "
                          f"{train.gradient_accumulation_steps}: remove it from the accelerate "
                          f"YAML (ours is used) or make them equal")
    clipping = environ.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clipping != "auto" and float(clipping) != optim.max_grad_norm:
        raise ConfigError(f"the DeepSpeed config sets gradient_clipping {clipping}, the training "
                          f"config optim.max_grad_norm {optim.max_grad_norm}: make them equal")


def build_optimizer(params: list, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer state 2 bytes/parameter instead of 8)."""
    kwargs = {"lr": optim.learning_rate, "betas": (optim.beta1, optim.beta2), "eps": optim.eps,
              "weight_decay": optim.weight_decay}
    if optim.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError("optim.optimizer adamw_8bit needs bitsandbytes (CUDA only): pip "
                              "install 'diffswap-igfi[bnb]', or use adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def misplaced_state(params: list, optimizer: torch.optim.Optimizer, ema) -> list[str]:
    """Training state that is not on its parameter's device: the optimizer's moments (torch
    moves them on load; checked anyway) and the EMA copies. Empty when all is well."""
    found = []
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for param in params:
        for name, value in inner.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.device != param.device:
                found.append(f"optimizer {name} on {value.device}, its parameter on "
                             f"{param.device}")
    if ema is not None:
        found += ema.misplaced()
    return found

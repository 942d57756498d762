"""Exponential moving average of the trained parameters, in fp32, where you choose to keep it.

diffusers' ``EMAModel`` keeps its copy in the parameters' dtype and on the device it was loaded
on: after ``--resume`` on a GPU the copy sits on the CPU (accelerate loads registered objects
there) and the first update fails; under DeepSpeed bf16 the copy is bf16. This one keeps
``shadow`` in fp32 on ``device`` (the parameters' own device by default, or ``"cpu"`` to free
GPU memory), loads a saved state onto that place, and can update every ``every`` optimizer
steps (decay raised to that power) so a CPU copy costs one transfer per ``every`` steps.

The decay follows ``EMAModel``'s default warm-up: ``min(decay, (1 + s) / (10 + s))`` at update
``s`` (0 at the first, which copies the weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class EMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, *,
                 device: str | torch.device | None = None, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.params = list(params)
        self.decay, self.every = float(decay), int(every)
        self.device = None if device is None else torch.device(device)
        self.shadow = [p.detach().to(self.place(p), torch.float32, copy=True)
                       for p in self.params]
        self.optimization_step = 0
        self._stored: list[torch.Tensor] | None = None

    def place(self, param: torch.Tensor) -> torch.device:
        """Where the copy of ``param`` lives."""
        return self.device or param.device

    def current_decay(self) -> float:
        """The decay of one update at the current optimizer step (before ``every``)."""
        s = self.optimization_step - 1
        return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def step(self) -> None:
        """Call once per optimizer step; averages every ``every``-th call."""
        self.optimization_step += 1
        if self.optimization_step % self.every and self.optimization_step > 1:
            return
        weight = 1.0 - self.current_decay() ** self.every
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), weight)

    # --------------------------------------------------------------- swapping weights in and out
    @torch.no_grad()
    def store(self) -> None:
        self._stored = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the averages into the parameters (cast to their dtype and device)."""
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)

    @torch.no_grad()
    def restore(self) -> None:
        if self._stored is None:
            raise RuntimeError("EMA.restore without EMA.store")
        for saved, param in zip(self._stored, self.params):
            param.copy_(saved)
        self._stored = None

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every,
                "optimization_step": self.optimization_step,
                "shadow": [s.detach().cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Copy a saved state into this EMA's own tensors, so it stays on its device in fp32
        whatever device the state was loaded onto."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(shadow)} tensors, this run trains "
                             f"{len(self.shadow)} parameters")
        for mine, saved in zip(self.shadow, shadow):
            if mine.shape != saved.shape:
                raise ValueError(f"EMA state shape {tuple(saved.shape)} does not fit a "
                                 f"parameter of shape {tuple(mine.shape)}")
            mine.copy_(saved)
        self.optimization_step = int(state["optimization_step"])

    def misplaced(self) -> list[str]:
        """Copies not where they belong (device or dtype): empty when all is well."""
        return [f"EMA copy {i} on {s.device} {s.dtype}, expected {self.place(p)} float32"
                for i, (s, p) in enumerate(zip(self.shadow, self.params))
                if s.device != self.place(p) or s.dtype != torch.float32]

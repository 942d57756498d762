"""The JR (joint refinement) stage: JR-Net, DFDNet-style component dictionaries, and its losses.

Names are imported lazily, so ``import diffswap_igfi.jr.arguments`` (the CLI) does not load
torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "dictionary": ["ComponentDictionary", "ComponentEncoder", "add_build_dictionaries_arguments",
                   "build_dictionaries", "build_dictionaries_from_shards", "kmeans",
                   "run_build_dictionaries"],
    "losses": ["ContextualLoss", "JRGeneratorLoss", "JRLossWeights", "PatchDiscriminator",
               "contextual_loss", "discriminator_loss", "generator_adversarial_loss",
               "jr_identity_loss", "r1_penalty", "reconstruction_loss"],
    "network": ["COMPONENTS", "JRNet", "component_boxes"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'diffswap_igfi.jr' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffswap_igfi.jr.{_WHERE[name]}"), name)

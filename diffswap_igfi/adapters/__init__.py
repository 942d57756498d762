"""Adapters for stock diffusers pipelines.

- ``identity_adapter``: an IP-Adapter-style identity adapter (projector + decoupled
  cross-attention processors) attached to any compatible pipeline with one call.
- ``lora``: LoRA on a UNet through peft, saved as LoRA-only safetensors.
"""

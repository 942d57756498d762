"""Converters from other projects' released checkpoints to our diffusers-style folders."""

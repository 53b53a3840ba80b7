"""Flax NNX modules: architectures only (no losses, optimizers, data or logging)."""

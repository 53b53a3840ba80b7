"""Build a network by name and options: the one place that maps a config's `model.name` to a class.

    net = registry.build("nafnet", rngs=nnx.Rngs(0), width=16, context_dim=64)
    net = registry.build_from_config(config.model, config.dtype, nnx.Rngs(0))

Named variants (sizes) live in the model modules themselves (e.g. `clip.get_config("ViT-B-32")`);
this table only says which class a name builds.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

# name -> (module, class). Imported lazily, so asking for one network never imports the others.
MODELS = {
    "unet": ("uir_jax.models.unet", "ConditionalUNet"),  # IR-SDE denoiser (U-Net)
    "cnafnet": ("uir_jax.models.nafnet", "ConditionalNAFNet"),  # IR-SDE denoiser (NAFNet)
    "nafnet": ("uir_jax.models.nafnet", "NAFNet"),  # direct regression
}


def model_class(name: str) -> type:
  if name not in MODELS:
    raise ValueError(f"unknown model name {name!r}; expected one of "
                     f"{', '.join(repr(n) for n in MODELS)}")
  module, cls = MODELS[name]
  return getattr(importlib.import_module(module), cls)


def build(name: str, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> nnx.Module:
  """The network `name` (see MODELS) with constructor `options` (lists become tuples)."""
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  return model_class(name)(**options, rngs=rngs, dtype=jnp.dtype(dtype))


def build_from_config(model: Mapping[str, Any], dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
  """The network a config's `model` block describes (`name` plus constructor options)."""
  options = dict(model)
  return build(options.pop("name"), rngs=rngs, dtype=dtype, **options)

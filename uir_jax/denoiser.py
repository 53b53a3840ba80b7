"""The sampler's view of a denoiser network: `eps_fn` adapters for `IRSDE.sample`.

    eps_fn, eps_args = make_eps_fn(unet, text_context=degradation, image_context=content)
    out = sde.sample(eps_fn, lq, key, eps_args=eps_args)

Outside `uir_jax.diffusion` because it merges a Flax NNX graph (diffusion imports no model code).
Shared by the trainers' evaluation, `restore.Restorer`, the exporter and the benchmarks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Array = jax.Array


@functools.cache
def denoiser_eps_fn(graphdef: Any) -> Callable[..., Array]:
  """An `eps_fn(x, mu, t, state, text_context, image_context)` for `IRSDE.sample`.

  One function object per model graph (cached), so `IRSDE.sample` compiles once per shape.
  `text_context` is DA-CLIP's degradation embedding and `image_context` its content embedding
  (either may be None, matching the model's `use_degra_context` / `use_image_context`).
  `state` is an `nnx.State` or a tuple of states (e.g. (params, rest) from `nnx.split`).
  """

  def eps_fn(x, mu, t, state, text_context, image_context):
    states = state if isinstance(state, tuple) else (state,)
    model = nnx.merge(graphdef, *states)
    return model(x, mu, t, text_context=text_context, image_context=image_context)

  return eps_fn


def make_eps_fn(model: nnx.Module, *, text_context: Array | None = None,
                image_context: Array | None = None) -> tuple[Callable[..., Array], tuple]:
  """(eps_fn, eps_args) ready for `IRSDE.sample(eps_fn, mu, key, eps_args=eps_args)`."""
  graphdef, state = nnx.split(model)
  return denoiser_eps_fn(graphdef), (state, text_context, image_context)

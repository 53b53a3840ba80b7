"""Prediction-type and classifier-free-guidance adapters, usable around any model function.

A network trained on y_t = α_t y_0 + σ_t ε predicts one of (`PREDICTIONS`):

    "eps"  ε̂                          (IR-SDE, SD 1.5 / 2.1-base)
    "x0"   ŷ_0                        (data prediction)
    "v"    v̂ = α_t ε − σ_t y_0         (SD 2.x 768; diffusers' `get_velocity`)

Any one determines the others given y_t: y_0 = (y_t − σ ε)/α, ε = (y_t − α y_0)/σ, and for v
(α² + σ² = 1 for variance-preserving processes, where these are diffusers' formulas; the general
forms below divide by α² + σ²) y_0 = (α y_t − σ v)/(α² + σ²), ε = (σ y_t + α v)/(α² + σ²).

Classifier-free guidance: ε̂ = ε_u + s (ε_c − ε_u), optionally rescaled towards the conditional
output's per-sample std (Lin et al. 2023; diffusers' `rescale_noise_cfg`):
ε̂ ← φ ε̂ std(ε_c)/std(ε̂) + (1 − φ) ε̂, std over all but the batch axis.

The model-function adapters (`PredictionAdapter`, `ClassifierFreeGuidance`) are frozen
dataclasses: equal settings compare equal, so they can be static arguments of `sample_loop`
without recompiling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PREDICTIONS = ("eps", "x0", "v")


def _check(prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def velocity(x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
  """The v target α ε − σ y_0 (training; diffusers' `get_velocity`)."""
  return alpha * eps - sigma * x0


def to_x0(out: Array, x: Array, alpha: Array, sigma: Array, prediction: str) -> Array:
  """ŷ_0 from a model output of type `prediction` at y_t = x (α, σ broadcastable to x)."""
  _check(prediction)
  if prediction == "x0":
    return out
  if prediction == "eps":
    return (x - sigma * out) / alpha
  return (alpha * x - sigma * out) / (alpha**2 + sigma**2)


def to_eps(out: Array, x: Array, alpha: Array, sigma: Array, prediction: str) -> Array:
  """ε̂ from a model output of type `prediction` at y_t = x (α, σ broadcastable to x)."""
  _check(prediction)
  if prediction == "eps":
    return out
  if prediction == "x0":
    return (x - alpha * out) / sigma
  return (sigma * x + alpha * out) / (alpha**2 + sigma**2)


def convert(out: Array, x: Array, alpha: Array, sigma: Array, src: str, dst: str) -> Array:
  """A model output of type `src` as type `dst` (each of `PREDICTIONS`)."""
  _check(src)
  _check(dst)
  if src == dst:
    return out
  if dst == "x0":
    return to_x0(out, x, alpha, sigma, src)
  if dst == "eps":
    return to_eps(out, x, alpha, sigma, src)
  return velocity(to_x0(out, x, alpha, sigma, src), to_eps(out, x, alpha, sigma, src), alpha,
                  sigma)


@dataclasses.dataclass(frozen=True)
class PredictionAdapter:
  """`model_fn` (output type `src`) seen as a model of type `dst`.

  Call as `adapter(x, t, alphas, sigmas, *args)`: `alphas`, `sigmas` are the process's tables
  indexed by the timestep (traced arrays, e.g. [T + 1]); t is an int array [B]; x [B, ...] is in
  the process's frame (offset removed). The wrapped model is called as `model_fn(x, t, *args)`.
  """

  model_fn: Callable[..., Array]
  src: str
  dst: str

  def __post_init__(self):
    _check(self.src)
    _check(self.dst)

  def __call__(self, x: Array, t: Array, alphas: Array, sigmas: Array, *args: Any) -> Array:
    out = self.model_fn(x, t, *args)
    shape = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma = alphas[t].reshape(shape), sigmas[t].reshape(shape)
    return convert(out, x, alpha.astype(x.dtype), sigma.astype(x.dtype), self.src, self.dst)


def guide(out_uncond: Array, out_cond: Array, scale: Array | float,
          rescale: float = 0.0) -> Array:
  """Classifier-free guidance out_u + s (out_c − out_u), [B, ...] each; `rescale` φ in [0, 1]
  pulls the result's per-sample std towards the conditional output's (0: off)."""
  guided = out_uncond + scale * (out_cond - out_uncond)
  if rescale:
    axes = tuple(range(1, guided.ndim))
    # A ratio of two stds over the same axes: the ddof convention (torch's unbiased std) cancels.
    ratio = jnp.std(out_cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    guided = rescale * (guided * ratio) + (1.0 - rescale) * guided
  return guided


@dataclasses.dataclass(frozen=True)
class ClassifierFreeGuidance:
  """`model_fn(x, t, context, *args)` guided: call as `cfg(x, t, cond, uncond, scale, *args)`.

  `cond` / `uncond` are the conditioning pytrees of the two branches (same structure and shapes,
  e.g. the prompt's and the empty prompt's text embeddings); `scale` s is traced, so changing it
  does not recompile. `batched` runs both branches in one call on a 2B batch [uncond; cond] (as
  diffusers' pipelines do); otherwise two calls (half the peak activation memory).
  """

  model_fn: Callable[..., Array]
  rescale: float = 0.0
  batched: bool = True

  def __call__(self, x: Array, t: Array, cond: Any, uncond: Any, scale: Array | float,
               *args: Any) -> Array:
    if self.batched:
      both = lambda u, c: jnp.concatenate([u, c], axis=0)
      out = self.model_fn(both(x, x), both(t, t), jax.tree.map(both, uncond, cond), *args)
      out_uncond, out_cond = jnp.split(out, 2, axis=0)
    else:
      out_uncond = self.model_fn(x, t, uncond, *args)
      out_cond = self.model_fn(x, t, cond, *args)
    return guide(out_uncond, out_cond, scale, self.rescale)

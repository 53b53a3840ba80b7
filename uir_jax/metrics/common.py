"""Pieces the network-based metrics (FID, DISTS) share: exact convolutions and input checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Metric networks run at full float32 precision on every backend: TPUs (and GPUs with TF32) would
# otherwise multiply in reduced precision by default, and a metric must not change with the chip.
PRECISION = jax.lax.Precision.HIGHEST


def exact_conv(din: int, dout: int, kernel: int | tuple[int, int], *, rngs: nnx.Rngs,
               stride: int = 1, padding: int | tuple[int, int] = 0,
               use_bias: bool = True) -> nnx.Conv:
  """nn.Conv2d-like NHWC convolution at full precision; `kernel` / `padding` may be (h, w)."""
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return nnx.Conv(din, dout, kernel_size=(kh, kw), strides=(stride, stride),
                  padding=((ph, ph), (pw, pw)), use_bias=use_bias, precision=PRECISION,
                  rngs=rngs)


def check_rgb_batch(name: str, images, min_size: int = 1) -> jax.Array:
  """[B, H, W, 3] float32 images, or a ValueError that says what is wrong."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} expects RGB batches [B, H, W, 3], got shape {images.shape}")
  if min(images.shape[1:3]) < min_size:
    raise ValueError(f"{name} needs images of at least {min_size}x{min_size} pixels, got "
                     f"{images.shape[1]}x{images.shape[2]}")
  return images


def jit_pair_metric(model: nnx.Module) -> Callable[[Any, Any], jax.Array]:
  """`f(x, y) == model(x, y)` for a full-reference metric module (LPIPS, DISTS), jitted over its
  split state: one graph walk instead of one per call, one compilation per input shape (faster
  than the eager op-by-op run even for a single call)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x, y: nnx.merge(graphdef, s)(x, y))
  return lambda x, y: fn(state, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))

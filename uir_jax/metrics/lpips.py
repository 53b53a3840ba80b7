"""LPIPS (Zhang et al. 2018), v0.1 with the AlexNet trunk: the perceptual metric of the
reference's `test.py` (`lpips.LPIPS(net='alex')`, inputs mapped to [-1, 1]; spec §8.2).

    from uir_jax.convert.lpips import load_lpips
    metric = load_lpips("lpips_alex.pth")        # see load_lpips for the accepted files
    d = metric(restored, gt)                      # [B] distances, images NHWC in [0, 1]

The network is the `lpips` package's: a scaling layer, torchvision AlexNet `features` up to each of
its five ReLUs, per-layer channel unit-normalisation (`x / (||x|| + 1e-10)`), squared differences,
a bias-free 1x1 "lin" head per layer (dropout is inactive at evaluation), spatial means, summed.
Weights: none ship with uir-jax; `load_lpips` reads the user's files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import conv

# The lpips package's ScalingLayer: (x - shift) / scale on [-1, 1] inputs (ImageNet statistics).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)


def _max_pool(x):
  """nn.MaxPool2d(kernel_size=3, stride=2): no padding, floor mode."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def _unit_normalize(x, eps: float = 1e-10):
  return x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + eps)


class LPIPS(nnx.Module):
  """LPIPS v0.1, AlexNet trunk. `__call__(x, y)` on NHWC images in [0, 1] -> [B] distances."""

  def __init__(self, *, rngs: nnx.Rngs):
    # torchvision AlexNet `features.{0,3,6,8,10}`.
    self.convs = nnx.List([
        conv(3, 64, 11, stride=4, padding=2, rngs=rngs),
        conv(64, 192, 5, padding=2, rngs=rngs),
        conv(192, 384, 3, padding=1, rngs=rngs),
        conv(384, 256, 3, padding=1, rngs=rngs),
        conv(256, 256, 3, padding=1, rngs=rngs),
    ])
    self.lins = nnx.List([nnx.Linear(c, 1, use_bias=False, rngs=rngs) for c in CHANNELS])

  def features(self, images):
    """The five ReLU outputs for NHWC images in [0, 1]."""
    x = (2.0 * images - 1.0 - jnp.asarray(_SHIFT)) / jnp.asarray(_SCALE)
    feats = []
    for i, layer in enumerate(self.convs):
      if i in (1, 2):
        x = _max_pool(x)
      x = jax.nn.relu(layer(x))
      feats.append(x)
    return feats

  def __call__(self, x, y):
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two RGB batches [B, H, W, 3] of one shape, got {x.shape} "
                       f"and {y.shape}")
    if min(x.shape[1:3]) < 32:  # conv1 (11, stride 4) and two 3x3/2 pools need this much
      raise ValueError(f"LPIPS needs images of at least 32x32 pixels, got {x.shape[1:3]}")
    total = 0.0
    for fx, fy, lin in zip(self.features(x), self.features(y), self.lins, strict=True):
      diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
      total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
    return total

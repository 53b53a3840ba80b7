"""DISTS (Ding et al. 2020), Deep Image Structure and Texture Similarity, as `dists-pytorch`
(`DISTS_pytorch.DISTS`) computes it.

    from uir_jax.convert.dists import load_dists
    metric = load_dists("vgg16-397923af.pth")  # torchvision VGG16 + the package's alpha/beta
    d = metric(restored, gt)                    # [B] distances, NHWC images in [0, 1]; 0 = same

The network: ImageNet mean/std normalisation, torchvision VGG16 `features` with each max pool
replaced by an "L2 pool" (squares, a 3x3 Hanning [1, 2, 1]^2 / 16 depthwise blur at stride 2 with
one pixel of zero padding, square root of (that + 1e-12)); six feature sets: the raw input image
and the ReLUs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (3 + 64 + 128 + 256 + 512 + 512 = 1475
channels). Per channel, from spatial means, variances and the covariance of the two images,
structure S1 = (2 mx my + c) / (mx^2 + my^2 + c) and texture S2 = (2 cxy + c) / (vx + vy + c),
c = 1e-6; DISTS = 1 - sum(alpha S1 + beta S2) with alpha, beta (the learned weights, 1475 each)
divided by their joint sum. Images are not resized (piq's variant shrinks those over 256 pixels;
the original does not). Weights: none ship with uir-jax; `load_dists` reads the user's files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.metrics.common import PRECISION, check_rgb_batch, exact_conv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNELS = (3, 64, 128, 256, 512, 512)  # input image, then the five stages
# torchvision `vgg16().features` index of each conv, grouped by DISTS stage (indices 4, 9, 16, 23,
# the max pools, become L2 pools).
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
_C = 1e-6


def l2pool_filter() -> np.ndarray:
  """The 3x3 L2-pool window: outer product of np.hanning(5)[1:-1] = [0.5, 1, 0.5], summing to 1."""
  a = np.hanning(5)[1:-1]
  g = a[:, None] * a[None, :]
  return (g / g.sum()).astype(np.float32)


def _l2pool(x):
  """sqrt(depthwise blur(x^2) + 1e-12) at stride 2, padding 1: an antialiased pool whose output
  is an RMS (keeps texture energy that a max pool aliases)."""
  c = x.shape[-1]
  window = jnp.tile(jnp.asarray(l2pool_filter())[:, :, None, None], (1, 1, 1, c))
  out = jax.lax.conv_general_dilated(x * x, window, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=c, precision=PRECISION)
  return jnp.sqrt(out + 1e-12)


class DISTS(nnx.Module):
  """DISTS: `__call__(x, y)` on NHWC images in [0, 1] -> [B] distances (`features` for the six
  feature sets). Parameters: `convs` (the 13 VGG16 convolutions, torchvision order), `alpha` and
  `beta` ([1475] each, un-normalised, as shipped)."""

  def __init__(self, *, rngs: nnx.Rngs):
    ins = (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512)
    outs = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    self.convs = nnx.List([exact_conv(i, o, 3, padding=1, rngs=rngs)
                           for i, o in zip(ins, outs, strict=True)])
    # dists-pytorch initialises these around 0.1 before loading its trained values.
    self.alpha = nnx.Param(jnp.full((sum(CHANNELS),), 0.1, jnp.float32))
    self.beta = nnx.Param(jnp.full((sum(CHANNELS),), 0.1, jnp.float32))

  def features(self, images):
    """[B, H, W, 3] in [0, 1] -> [images, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
    h = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    feats, n = [images], 0  # the first "feature" is the un-normalised input itself
    for s, stage in enumerate(STAGES):
      if s:
        h = _l2pool(h)
      for _ in stage:
        h = jax.nn.relu(self.convs[n](h))
        n += 1
      feats.append(h)
    return feats

  def __call__(self, x, y):
    x = check_rgb_batch("DISTS", x)
    y = check_rgb_batch("DISTS", y)
    if x.shape != y.shape:
      raise ValueError(f"DISTS expects two batches of one shape, got {x.shape} and {y.shape}")
    total = jnp.sum(self.alpha[...]) + jnp.sum(self.beta[...])
    splits = np.cumsum(CHANNELS)[:-1]
    alphas = jnp.split(self.alpha[...] / total, splits)
    betas = jnp.split(self.beta[...] / total, splits)
    structure = texture = 0.0
    for fx, fy, a, b in zip(self.features(x), self.features(y), alphas, betas, strict=True):
      mx, my = jnp.mean(fx, axis=(1, 2)), jnp.mean(fy, axis=(1, 2))  # [B, C]
      vx = jnp.mean((fx - mx[:, None, None]) ** 2, axis=(1, 2))
      vy = jnp.mean((fy - my[:, None, None]) ** 2, axis=(1, 2))
      cov = jnp.mean(fx * fy, axis=(1, 2)) - mx * my
      structure = structure + jnp.sum(a * (2 * mx * my + _C) / (mx**2 + my**2 + _C), axis=-1)
      texture = texture + jnp.sum(b * (2 * cov + _C) / (vx + vy + _C), axis=-1)
    return 1.0 - (structure + texture)

"""FID (Heusel et al. 2017) with pytorch-fid's Inception-v3: 2048-d pool features in Flax NNX and
the Fréchet distance between two Gaussians fitted to them, in float64 on the host.

    from uir_jax.convert.fid import load_inception
    net = load_inception("pt_inception-2015-12-05-6726825d.pth")   # the user's file
    extract = FeatureExtractor(net, batch_size=16)                 # jitted, batched
    fid = fid_from_features(extract(restored), extract(gt))         # NHWC images in [0, 1]

The network is pytorch-fid's `InceptionV3([3])` (`fid_inception_v3()`): inputs resized to 299 x 299
bilinearly (`F.interpolate(..., align_corners=False)`, no antialiasing) and mapped to [-1, 1];
torchvision's Inception-v3 trunk up to `Mixed_7c` with the "FID" blocks that mimic the TensorFlow
graph of the 2015-12-05 weights (average pools that ignore zero padding in the A/C/E_1 blocks, a
max pool in the last E block); a global average pool. Convolutions are bias-free and followed by
a frozen BatchNorm (eps 1e-3) and a ReLU. Weights: none ship with uir-jax; `load_inception` reads
them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.metrics.common import PRECISION, check_rgb_batch, exact_conv

SIZE = 299  # pytorch-fid's resize target
DIMS = 2048


# ----------------------------------------------------------------------------------------------
# Resizing and pooling, as PyTorch computes them.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of `F.interpolate(mode='bilinear', align_corners=False)` (no
  antialiasing) along one axis: source coordinate (i + 0.5) * in / out - 0.5, clamped at 0."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(images: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """[B, H, W, C] -> [B, out_h, out_w, C], PyTorch's bilinear (align_corners=False) resize."""
  wh = jnp.asarray(bilinear_weights(images.shape[1], out_h))
  ww = jnp.asarray(bilinear_weights(images.shape[2], out_w))
  x = jnp.einsum("oh,bhwc->bowc", wh, images, precision=PRECISION)
  return jnp.einsum("pw,bowc->bopc", ww, x, precision=PRECISION)


def _max_pool(x, stride: int, pad: int = 0):
  """nn.MaxPool2d(3, stride, padding=pad): padded cells never win (-inf)."""
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def _avg_pool_exclude_pad(x):
  """F.avg_pool2d(3, stride=1, padding=1, count_include_pad=False): TensorFlow's SAME average
  pool, which the 2015 graph uses, divides by the number of real pixels in each window."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  count = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                (1, 3, 3, 1), (1, 1, 1, 1), p)
  return total / count


# ----------------------------------------------------------------------------------------------
# Blocks (attribute names are torchvision's, so the key map is the identity).
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nnx.Module):
  """Bias-free conv -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""

  def __init__(self, din: int, dout: int, kernel, *, rngs: nnx.Rngs, stride: int = 1,
               padding=0):
    self.conv = exact_conv(din, dout, kernel, stride=stride, padding=padding, use_bias=False,
                           rngs=rngs)
    self.bn = nnx.BatchNorm(dout, use_running_average=True, epsilon=1e-3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool (zero padding excluded)-1x1."""

  def __init__(self, din: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(din, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(din, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(din, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(din, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    pool = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

  def __init__(self, din: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(din, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(din, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b..e: factorised 7x7 branches (1x7 / 7x1) and an avg pool excluding padding."""

  def __init__(self, din: int, c7: int, *, rngs: nnx.Rngs):
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 conv
    self.branch1x1 = BasicConv2d(din, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(din, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, row[0], padding=row[1], rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(din, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, row[0], padding=row[1], rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, col[0], padding=col[1], rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, row[0], padding=row[1], rngs=rngs)
    self.branch_pool = BasicConv2d(din, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      d = layer(d)
    pool = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b7, d, pool], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

  def __init__(self, din: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(din, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(din, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b / 7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The pool is an average
  excluding padding in Mixed_7b and a 3x3/1 max pool in Mixed_7c (`max_pool=True`), as the 2015
  TensorFlow graph has it (pytorch-fid's FIDInceptionE_1 / _2)."""

  def __init__(self, din: int, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(din, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(din, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(din, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(din, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool(x, 1, pad=1) if self.max_pool else _avg_pool_exclude_pad(x)
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3: `__call__(images [B, H, W, 3] in [0, 1]) -> [B, 2048]`."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True, rngs=rngs)

  def preprocess(self, images):
    """[B, H, W, 3] in [0, 1] -> [B, 299, 299, 3] in [-1, 1] (pytorch-fid's resize_input and
    normalize_input, in that order)."""
    images = check_rgb_batch("FID Inception", images)
    return 2.0 * resize_bilinear(images, SIZE, SIZE) - 1.0

  def trunk(self, x):
    """[B, H, W, 3] network input (already preprocessed) -> [B, 2048] pool features."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x, 2)))
    x = _max_pool(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1)

  def __call__(self, images):
    return self.trunk(self.preprocess(images))


class FeatureExtractor:
  """Jitted, batched pool features: `extractor(images [N, H, W, 3] in [0, 1]) -> [N, 2048]`.

  The resize to 299 is compiled once per input size and the network once for [batch_size, 299,
  299, 3] (a short last batch is zero-padded and its padding rows dropped), so a test set of many
  image sizes compiles the network once. The model is split into (graphdef, state) once, as the
  rest of uir-jax does, instead of `nnx.jit`'s graph walk per call.
  """

  def __init__(self, model: InceptionV3, batch_size: int = 16):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    graphdef, state = nnx.split(model)
    self._state = state
    self._preprocess = jax.jit(lambda s, x: nnx.merge(graphdef, s).preprocess(x))
    self._trunk = jax.jit(lambda s, x: nnx.merge(graphdef, s).trunk(x))

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      images = images[None]
    check_rgb_batch("FID Inception", images[:1] if len(images) else images)
    out = []
    for start in range(0, len(images), self.batch_size):
      x = self._preprocess(self._state, images[start:start + self.batch_size])
      n = x.shape[0]
      if n < self.batch_size:
        x = jnp.concatenate([x, jnp.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
      out.append(np.asarray(self._trunk(self._state, x))[:n])
    return np.concatenate(out) if out else np.zeros((0, DIMS), np.float32)


# ----------------------------------------------------------------------------------------------
# The Fréchet distance (host, float64).
# ----------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) of [N, D] features in float64, N - 1 normalised (np.cov)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"FID needs at least two feature vectors [N >= 2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, as pytorch-fid computes it.

  `scipy.linalg.sqrtm` of the product; if that is not finite (a singular product), eps is added to
  both diagonals and it is recomputed; an imaginary part that rounding leaves is dropped, unless
  it is large (|Im diag| > 1e-3), which is an error.
  """
  from scipy import linalg

  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                   np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances "
                     f"{s1.shape}, {s2.shape}")
  covmean = linalg.sqrtm(s1 @ s2)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
  """FID between two sets of [N, D] features (N >= 2 each), float64.

  With at least D + 1 vectors per set this is `frechet_distance` of their statistics (pytorch-fid's
  computation). With fewer, both covariances are singular and scipy's sqrtm of their D x D product
  is both slow (tens of seconds at D = 2048 on a CPU) and numerically poor; the same quantity is
  then computed exactly from the centred features A1 [N1, D], A2 [N2, D]: the eigenvalues of
  S1 S2 are the squared singular values of A1 A2^T / sqrt((N1 - 1)(N2 - 1)), so
  Tr (S1 S2)^(1/2) is their (nuclear) sum.
  """
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  mu1, s1 = feature_statistics(f1)
  mu2, s2 = feature_statistics(f2)
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f"feature sizes differ: {f1.shape} vs {f2.shape}")
  d = f1.shape[1]
  if min(len(f1), len(f2)) > d:
    return frechet_distance(mu1, s1, mu2, s2)
  a1, a2 = f1 - mu1, f2 - mu2
  singular = np.linalg.svd(a1 @ a2.T, compute_uv=False)
  tr_covmean = singular.sum() / np.sqrt((len(f1) - 1) * (len(f2) - 1))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


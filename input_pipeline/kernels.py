"""Blur kernels of the wild degradation pipeline (spec §7.3) as pure TensorFlow graph ops.

Kernel SIZE is random (odd k in 5..19), but tf.data graphs want static shapes, so every kernel
lives on a fixed `GRID` x `GRID` (21 x 21) grid: a centred k x k kernel zero-padded to 21 x 21 gives
exactly the same correlation (cv2.filter2D) and the same Wiener filter. All randomness goes through
stateless ops seeded by an int32[2] seed, so one seed gives one kernel, eagerly or in `tf.data.map`.

Coordinates follow BasicSR's `mesh_grid`: x is the column offset, y the row offset from the centre.

The PSF kernel type and the under-display filter need PSF banks (the reference's `psf.pkl` and
`ucdpsf.pkl`, not shipped). Without a bank the psf type is skipped (its probability renormalised
away) and the under-display filter is a no-op; `load_psf_bank` / `load_udc_bank` read .npz banks.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

GRID = 21  # Static kernel grid; kernels are centred in it and zero outside their k x k support.
RADIUS = GRID // 2

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso", "defocus", "box", "line", "psf")
# Spec §7.3 table (`predefined_mixed_kernel`).
KERNEL_PROBS = (0.35, 0.20, 0.10, 0.03, 0.10, 0.03, 0.10, 0.03, 0.03, 0.03)
# Multiplicative kernel noise, applied to the Gaussian and generalized Gaussian types only.
KERNEL_NOISE_RANGE = (0.9, 1.1)
BETAG_RANGE = (0.5, 2.0)
BETAP_RANGE = (1.0, 1.5)


# Grid coordinates as NumPy constants (cheaper to trace and to run than building them per kernel).
_AX = np.arange(-RADIUS, RADIUS + 1, dtype=np.float32)
_YY, _XX = np.meshgrid(_AX, _AX, indexing="ij")
_CHEBYSHEV = np.maximum(np.abs(_XX), np.abs(_YY))  # The centred k x k square is where this <= k//2.
_R2 = _XX * _XX + _YY * _YY


def _coords():
  """x (column offset) and y (row offset) on the 21 x 21 grid, float32 [21, 21] each."""
  return tf.constant(_XX), tf.constant(_YY)


def support_mask(k):
  """1 inside the centred k x k square of the 21 x 21 grid, else 0. k: odd int (tensor ok)."""
  half = tf.cast(k, tf.float32) // 2.0
  return tf.cast(tf.constant(_CHEBYSHEV) <= half, tf.float32)


def _normalise(kernel):
  return kernel / tf.reduce_sum(kernel)


def _quad_form(sigma_x, sigma_y, theta):
  """x^T Sigma^-1 x on the grid, Sigma = R diag(sx^2, sy^2) R^T (BasicSR `sigma_matrix2`)."""
  sx2 = tf.square(tf.cast(sigma_x, tf.float32))
  sy2 = tf.square(tf.cast(sigma_y, tf.float32))
  c, s = tf.cos(tf.cast(theta, tf.float32)), tf.sin(tf.cast(theta, tf.float32))
  # Sigma^-1 = R diag(1/sx^2, 1/sy^2) R^T, written out to avoid a 2x2 matrix inverse.
  a = c * c / sx2 + s * s / sy2
  b = c * s * (1.0 / sx2 - 1.0 / sy2)
  d = s * s / sx2 + c * c / sy2
  xx, yy = _coords()
  return a * xx * xx + 2.0 * b * xx * yy + d * yy * yy


def gaussian_kernel(k, sigma_x, sigma_y=None, theta=0.0):
  """Bivariate Gaussian exp(-q/2) (isotropic when sigma_y is None). -> float32 [21, 21], sum 1."""
  sigma_y = sigma_x if sigma_y is None else sigma_y
  q = _quad_form(sigma_x, sigma_y, theta)
  return _normalise(tf.exp(-0.5 * q) * support_mask(k))


def generalized_gaussian_kernel(k, sigma_x, sigma_y, theta, beta):
  """exp(-q^beta / 2). -> float32 [21, 21], sum 1."""
  q = _quad_form(sigma_x, sigma_y, theta)
  return _normalise(tf.exp(-0.5 * tf.pow(q, tf.cast(beta, tf.float32))) * support_mask(k))


def plateau_kernel(k, sigma_x, sigma_y, theta, beta):
  """1 / (q^beta + 1). -> float32 [21, 21], sum 1."""
  q = _quad_form(sigma_x, sigma_y, theta)
  return _normalise(1.0 / (tf.pow(q, tf.cast(beta, tf.float32)) + 1.0) * support_mask(k))


def defocus_kernel(k):
  """Uniform disk: skimage `disk(centre, k//2 + 1)` on a k x k grid, corners zeroed for k <= 5.

  skimage's disk is strict (x^2 + y^2 < r^2), so with r = k//2 + 1 it always fits the k x k grid;
  for k <= 5 it fills the whole square and the reference zeroes the four corners to keep it round.
  """
  k = tf.cast(k, tf.float32)
  half = k // 2.0
  disk = tf.cast(tf.constant(_R2) < tf.square(half + 1.0), tf.float32) * support_mask(k)
  corner = tf.cast(tf.constant((np.abs(_XX) == np.abs(_YY)) & (_R2 > 0)) &
                   (tf.constant(_CHEBYSHEV) == half), tf.float32)
  disk = tf.where(k <= 5.0, disk * (1.0 - corner), disk)
  return _normalise(disk)


def box_kernel(k):
  """All ones / k^2 inside the k x k support."""
  return _normalise(support_mask(k))


def _bessel_j1(x):
  return tf.math.special.bessel_j1(x)


def sinc_kernel(k, cutoff):
  """`circular_lowpass_kernel`: omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi).

  Not non-negative (that is the point: it rings); normalised to sum 1. -> float32 [21, 21].
  """
  cutoff = tf.cast(cutoff, tf.float32)
  r = tf.constant(np.sqrt(_R2))
  safe_r = tf.where(r > 0, r, tf.ones_like(r))  # Avoid 0/0; the centre is replaced below.
  vals = cutoff * _bessel_j1(cutoff * safe_r) / (2.0 * math.pi * safe_r)
  vals = tf.where(r > 0, vals, tf.fill(tf.shape(r), cutoff * cutoff / (4.0 * math.pi)))
  return _normalise(vals * support_mask(k))


# --- Motion (line) kernels: a constant bank built once with numpy (not in the hot path). ---------


def _bresenham(r0, c0, r1, c1):
  """Pixels of the digital line from (r0, c0) to (r1, c1), both ends included (skimage `line`)."""
  rows, cols = [], []
  steep = abs(r1 - r0) > abs(c1 - c0)
  if steep:
    r0, c0, r1, c1 = c0, r0, c1, r1
  dr, dc = abs(r1 - r0), abs(c1 - c0)
  sr = 1 if r1 > r0 else -1
  sc = 1 if c1 > c0 else -1
  d = 2 * dr - dc
  r, c = r0, c0
  for _ in range(dc + 1):
    rows.append(c if steep else r)
    cols.append(r if steep else c)
    while d >= 0:
      r += sr
      d -= 2 * dc
    c += sc
    d += 2 * dr
  return np.asarray(rows), np.asarray(cols)


def _line_anchors(k):
  """(start, end) pixels of the 4*(k//2) full-length lines of a k x k grid, as the reference's
  `LineDictionary` draws them.

  Every line joins a border pixel to its point reflection through the centre. The direction
  matters: the digital line of a segment whose exact path passes through half pixels depends on
  which end Bresenham starts from, so the start pixels are the reference's: left column rows
  1..k-1 (going right), then bottom row columns 1..k//2 (going up), then top row columns
  0..k//2-1 (going down).
  """
  n1 = k - 1
  starts = [(i, 0) for i in range(1, k)]
  starts += [(n1, j) for j in range(1, k // 2 + 1)]
  starts += [(0, j) for j in range(k // 2)]
  return [((r, c), (n1 - r, n1 - c)) for r, c in starts]


def line_kernels_np(k):
  """All 4*(k//2) motion lines of a k x k grid (reference `LineDictionary` + skimage `line`).

  -> float32 [n, k, k], each normalised to sum 1, ordered by angle in [0, 180).
  """
  lines = []
  for (r0, c0), (r1, c1) in _line_anchors(k):
    # Angle with y pointing up (row index grows downwards), folded into the half-turn [0, 180).
    angle = math.degrees(math.atan2(r0 - r1, c1 - c0)) % 180.0
    kern = np.zeros((k, k), np.float32)
    rr, cc = _bresenham(r0, c0, r1, c1)
    kern[rr, cc] = 1.0
    lines.append((angle, kern / kern.sum()))
  lines.sort(key=lambda t: t[0])
  return np.stack([kern for _, kern in lines])


LINE_SIZES = (5, 7, 9, 11, 13, 15)  # Effective sizes: k > 15 is replaced by k - 10.


def _line_bank():
  kernels, offsets, counts = [], [], []
  for k in LINE_SIZES:
    bank = line_kernels_np(k)
    offsets.append(sum(counts))
    counts.append(len(bank))
    pad = RADIUS - k // 2
    kernels.append(np.pad(bank, ((0, 0), (pad, pad), (pad, pad))))
  return np.concatenate(kernels), np.asarray(offsets, np.int32), np.asarray(counts, np.int32)


_LINE_BANK, _LINE_OFFSETS, _LINE_COUNTS = _line_bank()


def line_kernel(k, angle_index):
  """Motion kernel: the `angle_index`-th line (mod the count) of the effective size for k."""
  k = tf.convert_to_tensor(k, tf.int32)
  k_eff = tf.where(k > 15, k - 10, k)
  slot = (k_eff - 5) // 2
  count = tf.gather(tf.constant(_LINE_COUNTS), slot)
  index = tf.gather(tf.constant(_LINE_OFFSETS), slot) + tf.math.floormod(angle_index, count)
  return tf.gather(tf.constant(_LINE_BANK), index)


# --- PSF banks (user provided). ---------------------------------------------------------------


def _fit_to_grid(kernel):
  """Downscale (area) a 2-D kernel that exceeds 21 px, then centre-pad it to 21 x 21; sum 1."""
  kernel = np.asarray(kernel, np.float32)
  if kernel.ndim != 2:
    raise ValueError(f"PSF kernels must be 2-D, got shape {kernel.shape}")
  h, w = kernel.shape
  if max(h, w) > GRID:
    scale = GRID / max(h, w)
    size = (max(1, int(h * scale)), max(1, int(w * scale)))
    kernel = tf.image.resize(kernel[..., None], size, method="area").numpy()[..., 0]
    h, w = kernel.shape
  top, left = (GRID - h) // 2, (GRID - w) // 2
  out = np.zeros((GRID, GRID), np.float32)
  out[top:top + h, left:left + w] = kernel
  total = out.sum()
  if not np.isfinite(total) or total <= 0:
    raise ValueError("PSF kernel has a non-positive or non-finite sum")
  return out / total


def load_psf_bank(path):
  """Blur-PSF bank from an .npz of 2-D kernels (any sizes) -> tf.float32 [N, 21, 21], each sum 1."""
  with np.load(path) as data:
    kernels = [_fit_to_grid(data[name]) for name in data.files]
  if not kernels:
    raise ValueError(f"PSF bank {path} holds no kernels")
  return tf.constant(np.stack(kernels))


def load_udc_bank(path):
  """Under-display-camera PSFs from an .npz of [h, w, 3] / [3, h, w] arrays -> f32 [N, h, w, 3].

  PSFs of different sizes are centre-padded to the largest; each channel is normalised to sum 1
  (the reference multiplies by its pickled PSFs as stored; normalising keeps the filter from
  changing the mean brightness, and changes nothing for PSFs that already sum to 1).
  """
  with np.load(path) as data:
    psfs = [np.asarray(data[name], np.float32) for name in data.files]
  if not psfs:
    raise ValueError(f"UDC bank {path} holds no PSFs")
  fixed = []
  for p in psfs:
    if p.ndim != 3 or 3 not in (p.shape[0], p.shape[-1]):
      raise ValueError(f"UDC PSFs must be [h, w, 3] or [3, h, w], got shape {p.shape}")
    fixed.append(p if p.shape[-1] == 3 else np.transpose(p, (1, 2, 0)))
  h = max(p.shape[0] for p in fixed)
  w = max(p.shape[1] for p in fixed)
  out = np.zeros((len(fixed), h, w, 3), np.float32)
  for i, p in enumerate(fixed):
    top, left = (h - p.shape[0]) // 2, (w - p.shape[1]) // 2
    out[i, top:top + p.shape[0], left:left + p.shape[1]] = p / p.sum(axis=(0, 1), keepdims=True)
  return tf.constant(out)


# --- Random kernels. -------------------------------------------------------------------------


def _uniform(seed, lo, hi):
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi, dtype=tf.float32)


def random_kernel_size(seed, max_radius):
  """k uniform over {2v+1 : v = 2..max_radius-1}, int32 scalar (5..19 for 10, 5..9 for 5)."""
  if max_radius < 3 or 2 * max_radius - 1 > GRID:
    raise ValueError(f"max_radius must be in [3, {(GRID + 1) // 2}], got {max_radius}")
  v = tf.random.stateless_uniform([], seed, minval=2, maxval=max_radius, dtype=tf.int32)
  return 2 * v + 1


def kernel_type_probs(has_psf_bank):
  """The §7.3 type probabilities; without a PSF bank the psf type is dropped, the rest rescaled."""
  probs = np.asarray(KERNEL_PROBS, np.float64)
  if not has_psf_bank:
    probs[KERNEL_TYPES.index("psf")] = 0.0
  return probs / probs.sum()


def _categorical(seed, probs):
  """Index drawn from fixed probabilities with one stateless uniform (inverse CDF)."""
  cdf = tf.constant(np.cumsum(probs)[:-1], tf.float32)
  u = _uniform(seed, 0.0, 1.0)
  return tf.reduce_sum(tf.cast(u >= cdf, tf.int32))


def random_mixed_kernel(seed, k, blur_range, *, psf_bank=None, return_type=False):
  """`predefined_mixed_kernel(k, blur_range)`: a random kernel of the §7.3 table. -> [21, 21].

  With return_type=True also returns the int32 index into KERNEL_TYPES. The draw runs in one
  tf.function per PSF bank (traced once, shared by every blur of every chain: tracing the ten
  families is a large part of a chain's trace time).
  """
  lo, hi = float(blur_range[0]), float(blur_range[1])
  if not 0 < lo <= hi:
    raise ValueError(f"blur_range must satisfy 0 < lo <= hi, got {blur_range}")
  key = id(psf_bank)
  if key not in _MIXED_FNS:
    signature = [tf.TensorSpec([2], tf.int32), tf.TensorSpec([], tf.int32),
                 tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32)]
    fn = tf.function(lambda s, kk, a, b: _mixed_kernel(s, kk, a, b, psf_bank),
                     input_signature=signature, autograph=False,
                     experimental_attributes={"_noinline": True})
    _MIXED_FNS[key] = (fn, psf_bank)  # The bank stays alive with the entry: ids stay unique.
  kernel, kind = _MIXED_FNS[key][0](tf.cast(seed, tf.int32), tf.cast(k, tf.int32),
                                    tf.constant(lo, tf.float32), tf.constant(hi, tf.float32))
  kernel = tf.ensure_shape(kernel, [GRID, GRID])
  return (kernel, kind) if return_type else kernel


_MIXED_FNS = {}


def _mixed_kernel(seed, k, lo, hi, psf_bank):
  s = tf.random.experimental.stateless_split(seed, 8)
  sx, sy = _uniform(s[1], lo, hi), _uniform(s[2], lo, hi)
  theta = _uniform(s[3], -math.pi, math.pi)
  # Both beta draws follow BasicSR: below 1 or above 1 with p 0.5 each.
  low_half = _uniform(s[4], 0.0, 1.0) < 0.5
  u_beta = _uniform(s[5], 0.0, 1.0)
  beta_g = tf.where(low_half, BETAG_RANGE[0] + u_beta * (1.0 - BETAG_RANGE[0]),
                    1.0 + u_beta * (BETAG_RANGE[1] - 1.0))
  beta_p = tf.where(low_half, BETAP_RANGE[0] + u_beta * (1.0 - BETAP_RANGE[0]),
                    1.0 + u_beta * (BETAP_RANGE[1] - 1.0))
  noise = tf.random.stateless_uniform([GRID, GRID], s[6], *KERNEL_NOISE_RANGE)
  angle_index = tf.random.stateless_uniform([], s[7], minval=0, maxval=1 << 20, dtype=tf.int32)

  def noisy(kern):
    return _normalise(kern * noise)

  branches = [
      lambda: noisy(gaussian_kernel(k, sx)),
      lambda: noisy(gaussian_kernel(k, sx, sy, theta)),
      lambda: noisy(generalized_gaussian_kernel(k, sx, sx, 0.0, beta_g)),
      lambda: noisy(generalized_gaussian_kernel(k, sx, sy, theta, beta_g)),
      lambda: plateau_kernel(k, sx, sx, 0.0, beta_p),
      lambda: plateau_kernel(k, sx, sy, theta, beta_p),
      lambda: defocus_kernel(k),
      lambda: box_kernel(k),
      lambda: line_kernel(k, angle_index),
  ]
  if psf_bank is not None:
    bank = tf.convert_to_tensor(psf_bank, tf.float32)
    branches.append(lambda: tf.gather(bank, tf.math.floormod(angle_index, tf.shape(bank)[0])))
  kind = _categorical(s[0], kernel_type_probs(psf_bank is not None)[: len(branches)])
  return tf.switch_case(kind, branches), kind


def random_sinc_kernel(seed, k):
  """Sinc kernel with omega_c ~ U(pi/3, pi) if k < 13 else U(pi/5, pi)."""
  u = _uniform(seed, 0.0, 1.0)
  lo = tf.where(tf.cast(k, tf.int32) < 13, math.pi / 3.0, math.pi / 5.0)
  return sinc_kernel(k, lo + u * (math.pi - lo))


def random_blur_kernel(seed, max_radius, sinc_prob, blur_range, *, psf_bank=None):
  """Kernel of `random_blur`: (kernel [21, 21], k, support, is_sinc).

  k (int32) is the drawn size, which decides the Wiener branch; support (int32, odd) is the side of
  the centred square outside which the kernel is zero: k, except motion lines for k > 15 (k - 10)
  and PSF-bank kernels (the whole grid). Filtering only needs to cover the support.
  """
  s = tf.random.experimental.stateless_split(seed, 4)
  k = random_kernel_size(s[0], max_radius)
  is_sinc = _uniform(s[1], 0.0, 1.0) < sinc_prob

  def mixed():
    kernel, kind = random_mixed_kernel(s[3], k, blur_range, psf_bank=psf_bank, return_type=True)
    support = tf.where(kind == KERNEL_TYPES.index("line"), tf.where(k > 15, k - 10, k), k)
    return kernel, tf.where(kind == KERNEL_TYPES.index("psf"), GRID, support)

  kernel, support = tf.cond(is_sinc, lambda: (random_sinc_kernel(s[2], k), k), mixed)
  return tf.ensure_shape(kernel, [GRID, GRID]), k, support, is_sinc

"""Wild synthetic degradations (spec §7) as pure TensorFlow graph ops for `tf.data.Dataset.map`.

Images are float32 [H, W, 3] RGB in [0, 1]. The reference works in BGR; every op here is either
channel-order agnostic or uses RGB luminance weights where cv2 used BGR2GRAY, so an RGB image sees
what its BGR twin sees there. Randomness goes only through stateless ops seeded by an int32[2] seed
(sub-seeds via `stateless_fold_in`), so one seed gives one output, eagerly or inside tf.data, in any
number of parallel map calls. No py_function, no OpenCV: everything is a TF graph op.

Every degradation op has the registry signature `op(image, seed, **params) -> (image, words)`, with
`words` a bool[4] mask over `DEGRADATION_WORDS` (what the op added, following the reference's
`deg_list`: resizing counts as 'blur'; sinc kernels and Wiener deconvolution as 'ringing artifact';
a noise step always says 'noise', even in the rare draw where neither noise type fires, and the
under-display filter adds no word, both as in the reference).

Pipelines are built from three combinators over "steps" `step(image, words, seed, ctx)`:
`chain` (in order), `shuffled` (a random permutation per example: the wild paper's random-shuffle
strategy) and `gated` (apply with a probability, or else another step). `random_degrade` is the
three-stage chain of spec §7.2 built from them; `input_pipeline.registry.build_pipeline` builds
other chains from configs with the same combinators and the same seed plumbing.

Speed (one CPU core, 256 x 256; figures in benchmarks/RESULTS.md): kernels live on a static
21 x 21 grid (see `kernels.py`) and are applied by FFT correlation over their support on a 5-smooth
padded size (TF's direct depthwise convolution is ~10x slower even at 5 x 5). Each shuffled stage
is one non-inlined function called once per position (see `shuffled`), which keeps the graph,
its trace time and tf.data's per-pipeline optimisation time small. Poisson noise on natural images
(vals = 256) is drawn exactly by a bucketed inverse-CDF table (`_poisson_256`), ~3x cheaper than
tf.random.stateless_poisson's per-element rejection sampling.

Known deviations from the reference (cv2): bicubic resizing uses TF's Keys cubic (a = -0.5)
where cv2 uses a = -0.75 (max difference ~0.02 on natural images; an exact cv2 cubic costs ~2 ms
more per resize on one core); JPEG goes through TF's libjpeg with the same quality and 4:2:0
chroma subsampling (mean difference to cv2 ~1/255).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from input_pipeline import kernels

DEGRADATION_WORDS = ("blur", "ringing artifact", "noise", "jpeg block")
BLUR, RINGING, NOISE, JPEG = range(4)

RESIZE_METHODS = ("area", "bicubic", "bilinear")  # cv2 INTER_AREA, INTER_CUBIC, INTER_LINEAR.

# `random_degrade`'s knobs and the reference defaults (spec §7.2). As in the reference, stage 2
# uses half of blur_prob and noise_prob, stage 3 the full blur_prob and jpeg_prob; udc_prob is the
# under-display filter's chance when a stage-1/2 blur did not fire (needs a UDC bank).
DEFAULT_PROBS = {"blur_prob": 0.8, "resize_prob": 0.8, "noise_prob": 0.4, "jpeg_prob": 0.4,
                 "udc_prob": 0.2}

STAGE_OPS = (("blur", "resize", "noise", "jpeg"), ("blur", "noise"), ("blur", "resize", "jpeg"))


# --- Small helpers. -------------------------------------------------------------------------------


def sub_seed(seed, n):
  """Independent sub-seed number n of an int32[2] seed."""
  return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int32), n)


def _uniform(seed, lo=0.0, hi=1.0):
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi, dtype=tf.float32)


def word_mask(*indices):
  """bool[4] with the given DEGRADATION_WORDS indices set."""
  mask = np.zeros(len(DEGRADATION_WORDS), bool)
  mask[list(indices)] = True
  return tf.constant(mask)


def no_words():
  return tf.zeros([len(DEGRADATION_WORDS)], tf.bool)


def _check_prob(name, p):
  if not 0.0 <= float(p) <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_range(name, r, lo=0.0):
  if len(r) != 2 or not lo <= float(r[0]) <= float(r[1]):
    raise ValueError(f"{name} must be (lo, hi) with {lo} <= lo <= hi, got {r}")


def _as_image(image):
  image = tf.convert_to_tensor(image)
  if image.shape.rank is not None and (image.shape.rank != 3 or image.shape[-1] not in (3, None)):
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  return tf.cast(image, tf.float32)


# --- Padding and filtering. -----------------------------------------------------------------------


def _reflect_indices(n, pad, symmetric):
  """Source indices of a length-n axis padded by `pad` on both sides (any pad, even > n).

  reflect-101 (cv2 default, numpy 'reflect'): c b | a b c | b a;
  symmetric (numpy 'symmetric'):               b a | a b c | c b.
  """
  i = tf.range(-pad, n + pad)
  if symmetric:
    period = 2 * n
    m = tf.math.floormod(i, period)
    return tf.where(m < n, m, period - 1 - m)
  period = tf.maximum(2 * (n - 1), 1)
  m = tf.math.floormod(i, period)
  return tf.minimum(tf.where(m < n, m, period - m), n - 1)


def _mirror(x, pad, symmetric, axis):
  """Reflect-101 / symmetric padding of axis 0 or 1 by pad < that axis' size, from reversed edge
  slices: concat and reverse run at copy speed, ~3x faster than tf.pad's MirrorPad on one core."""
  n, o = tf.shape(x)[axis], (0 if symmetric else 1)
  if axis == 0:
    lo, hi = x[o:pad + o], x[n - pad - o:n - o]
  else:
    lo, hi = x[:, o:pad + o], x[:, n - pad - o:n - o]
  return tf.concat([tf.reverse(lo, [axis]), x, tf.reverse(hi, [axis])], axis)


def pad_image(image, pad, symmetric=False):
  """Pad [H, W, C] by `pad` on each side; reflect-101 (cv2 BORDER_DEFAULT) or numpy 'symmetric'.

  Edge slices (fast) when the pad fits the image (pad < size for reflect-101, <= size for
  symmetric); otherwise a gather of the periodic extension, which is what numpy's repeated
  reflection gives for any pad (resized images can be small).
  """
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  limit = tf.minimum(shape[0], shape[1]) - (0 if symmetric else 1)

  def sliced():
    return _mirror(_mirror(image, pad, symmetric, 0), pad, symmetric, 1)

  def gathered():
    out = tf.gather(image, _reflect_indices(shape[0], pad, symmetric), axis=0)
    return tf.gather(out, _reflect_indices(shape[1], pad, symmetric), axis=1)

  out = tf.cond(pad <= limit, sliced, gathered)
  return tf.ensure_shape(out, [None, None, image.shape[-1]])


def _smooth_sizes(limit=1 << 14):
  """Sorted 2^a 3^b 5^c up to `limit`: FFT lengths the CPU FFT handles fastest."""
  out = {1}
  for p in (2, 3, 5):
    for v in sorted(out):
      while v * p <= limit:
        v *= p
        out.add(v)
  return np.asarray(sorted(out), np.int32)


_SMOOTH = _smooth_sizes()


def _fft_size(n):
  """Smallest 5-smooth length >= n (int32 tensor)."""
  table = tf.constant(_SMOOTH)
  return tf.gather(table, tf.searchsorted(table, tf.reshape(n, [1]), side="left")[0])


def _dft_matrix(n, length, r):
  """exp(-2 pi i f a / n) for frequencies f < length and taps a = -r..r: complex64 [length, 2r+1].

  The phase is reduced mod n in float64 first, so it stays exact for any FFT length.
  """
  f = tf.cast(tf.range(length), tf.float64)[:, None]
  a = tf.cast(tf.range(-r, r + 1), tf.float64)[None, :]
  n = tf.cast(n, tf.float64)
  phase = (-2.0 * math.pi / n) * tf.math.floormod(f * a, n)
  return tf.complex(tf.cast(tf.cos(phase), tf.float32), tf.cast(tf.sin(phase), tf.float32))


def _direct_correlate(image, kernel):
  """Correlation with a small static [k, k] kernel: reflect-101 pad, then TF's depthwise conv."""
  k = kernel.shape[0]
  padded = pad_image(image, k // 2)
  weights = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded[None], weights, [1, 1, 1, 1], "VALID")[0]
  return tf.ensure_shape(out, image.shape)


# Supports up to this size are correlated directly (depthwise conv), larger ones through the FFT:
# on one core at 256 x 256 (padding included) the direct form costs 0.40 ms at 5 x 5, and about
# as much as the FFT (~1.1 ms at any size) by 9 x 9 (benchmarks/RESULTS.md).
DIRECT_MAX_SUPPORT = 7


def filter2d(image, kernel, support=None):
  """cv2.filter2D(image, -1, kernel): correlation with reflect-101 borders. [H, W, 3] -> same.

  kernel: static odd square [n, n]. support: optional odd int (tensor ok) <= n; the kernel must be
  zero outside its centred support x support square, and only that square is used.

  Supports up to DIRECT_MAX_SUPPORT go through TF's depthwise convolution on the reflect-padded
  image; larger ones through the FFT, whose cost hardly depends on the kernel size. The image is
  reflect-padded by at least r (the support's radius) on every side up to a 5-smooth size; the
  circular wrap-around only reaches pixels more than r outside the image, so the cropped result
  equals the direct correlation up to float rounding. The kernel's spectrum comes from two small
  DFT matmuls (its support is at most 21 x 21) instead of a full-size FFT of a mostly-zero array.
  """
  image = _as_image(image)
  kernel = tf.convert_to_tensor(kernel, tf.float32)
  n, n2 = kernel.shape
  if n is None or n2 is None or n % 2 == 0 or n != n2:
    raise ValueError(f"kernel must be a static odd square, got shape {kernel.shape}")
  c = n // 2
  if support is None:
    if n <= DIRECT_MAX_SUPPORT:
      return _direct_correlate(image, kernel)
    return _fft_correlate(image, kernel, tf.constant(c))
  r = tf.minimum(tf.cast(support, tf.int32) // 2, c)
  # Branch 0: the FFT; branch a: the direct form with the centred (2a+1)^2 crop, one per small
  # radius (a 5 x 5 support run as 7 x 7 would cost the 7 x 7 time).
  radii = range(1, min(c, DIRECT_MAX_SUPPORT // 2) + 1)
  branches = [lambda: _fft_correlate(image, kernel, r)]
  branches += [lambda a=a: _direct_correlate(image, kernel[c - a:c + a + 1, c - a:c + a + 1])
               for a in radii]
  index = tf.where((r >= 1) & (r <= len(radii)), r, 0)
  return tf.ensure_shape(tf.switch_case(index, branches), image.shape)


def _fft_correlate(image, kernel, r):
  """filter2d's FFT path: correlation with the centred (2r+1)^2 part of a static odd kernel.

  The image is reflect-padded by r and zero-padded by the FFT itself (`fft_length`) to a 5-smooth
  size: the kept outputs only read the r pixels beyond each edge, never the zeros.
  """
  c = kernel.shape[0] // 2
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  hp, wp = _fft_size(h + 2 * r), _fft_size(w + 2 * r)
  x = tf.ensure_shape(tf.transpose(pad_image(image, r), [2, 0, 1]), [3, None, None])
  kern = tf.cast(kernel[c - r:c + r + 1, c - r:c + r + 1], tf.complex64)
  spectrum = tf.matmul(tf.matmul(_dft_matrix(hp, hp, r), kern),
                       _dft_matrix(wp, wp // 2 + 1, r), transpose_b=True)
  size = tf.stack([hp, wp])
  out = tf.signal.irfft2d(tf.signal.rfft2d(x, fft_length=size) * tf.math.conj(spectrum)[None],
                          fft_length=size)
  return tf.ensure_shape(tf.transpose(out[:, r:r + h, r:r + w], [1, 2, 0]), image.shape)


def wiener_deconv(image, kernel, k_reg=0.006, pad=20):
  """Wiener deconvolution of each channel: conj(F_k) / (|F_k|^2 + K) (spec §7.3 step 4).

  The image is numpy-'symmetric' padded by `pad`; the kernel (normalised) is zero-padded to the
  padded size with its centre moved to the origin (what the reference's centre-pad + ifftshift
  does for odd kernels). Real part, padding cropped. No clipping: the overshoot around edges is the
  ringing this op exists to make. The padded size is used exactly (no FFT-friendly rounding): the
  circular boundary is part of the reference's output.
  """
  image = _as_image(image)
  kernel = tf.convert_to_tensor(kernel, tf.float32)
  kernel = kernel / tf.reduce_sum(kernel)
  kh, kw = kernel.shape
  if kh is None or kw is None or kh % 2 == 0 or kh != kw:
    raise ValueError(f"kernel must be a static odd square, got shape {kernel.shape}")
  padded = pad_image(image, pad, symmetric=True)
  hp, wp = tf.shape(padded)[0], tf.shape(padded)[1]
  kpad = tf.pad(kernel, [[0, hp - kh], [0, wp - kw]])
  kpad = tf.roll(kpad, shift=[-(kh // 2), -(kw // 2)], axis=[0, 1])
  fk = tf.signal.rfft2d(kpad)
  filt = tf.math.conj(fk) / tf.cast(tf.square(tf.abs(fk)) + k_reg, tf.complex64)
  fx = tf.signal.rfft2d(tf.transpose(padded, [2, 0, 1]))
  out = tf.signal.irfft2d(fx * filt[None], fft_length=tf.stack([hp, wp]))
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.transpose(out[:, pad:pad + h, pad:pad + w], [1, 2, 0])
  return tf.ensure_shape(out, image.shape)


# --- Blur ops. ------------------------------------------------------------------------------------


def random_blur(image, seed, *, max_radius=10, sinc_prob=0.1, deblur_prob=0.1,
                blur_range=(0.2, 2.2), psf_bank=None):
  """`random_blur` (spec §7.3): random kernel, filter2D, maybe Wiener ringing. -> (image, words).

  Words: 'blur', plus 'ringing artifact' for a sinc kernel or a Wiener deconvolution.
  """
  _check_prob("sinc_prob", sinc_prob)
  _check_prob("deblur_prob", deblur_prob)
  image = _as_image(image)
  kernel, k, support, is_sinc = kernels.random_blur_kernel(
      sub_seed(seed, 0), max_radius, sinc_prob, blur_range, psf_bank=psf_bank)
  blurred = filter2d(image, kernel, support)
  # Wiener only for small non-sinc kernels (k in {5, 7}).
  do_wiener = (~is_sinc) & (k < 8) & (_uniform(sub_seed(seed, 1)) < deblur_prob)

  def deconvolve():
    out = wiener_deconv(blurred, kernel)
    p = _uniform(sub_seed(seed, 3), 0.1, 0.5)
    blend = _uniform(sub_seed(seed, 2)) < 0.1
    return tf.where(blend, p * blurred + (1.0 - p) * out, out)

  out = tf.cond(do_wiener, deconvolve, lambda: blurred)
  ringing = is_sinc | do_wiener
  words = word_mask(BLUR) | (word_mask(RINGING) & ringing)
  return tf.ensure_shape(out, image.shape), words


def under_display_filter(image, seed, *, udc_bank):
  """Under-display-camera PSF (spec §7.4): FFT-filter each channel, blend with p ~ U(0.1, 0.5).

  udc_bank: float32 [N, h, w, 3] (`kernels.load_udc_bank`). The PSF is centre-padded or
  centre-cropped to the image size and ifftshifted. No clip (the reference's clip discards its
  result) and no word (the reference adds none). -> (image, words).
  """
  image = _as_image(image)
  bank = tf.convert_to_tensor(udc_bank, tf.float32)
  index = tf.random.stateless_uniform([], sub_seed(seed, 0), minval=0, maxval=tf.shape(bank)[0],
                                      dtype=tf.int32)
  psf = tf.gather(bank, index)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ph, pw = tf.shape(psf)[0], tf.shape(psf)[1]
  top, left = tf.maximum(ph - h, 0) // 2, tf.maximum(pw - w, 0) // 2
  psf = psf[top:top + tf.minimum(ph, h), left:left + tf.minimum(pw, w)]
  ph, pw = tf.shape(psf)[0], tf.shape(psf)[1]
  pt, pl = (h - ph) // 2, (w - pw) // 2  # Odd differences put the extra pixel bottom/right.
  psf = tf.pad(psf, [[pt, h - ph - pt], [pl, w - pw - pl], [0, 0]])
  psf = tf.roll(psf, shift=[-(h // 2), -(w // 2)], axis=[0, 1])  # np.fft.ifftshift
  fx = tf.signal.rfft2d(tf.transpose(image, [2, 0, 1]))
  fk = tf.signal.rfft2d(tf.transpose(psf, [2, 0, 1]))
  filtered = tf.transpose(tf.signal.irfft2d(fx * fk, fft_length=tf.stack([h, w])), [1, 2, 0])
  p = _uniform(sub_seed(seed, 1), 0.1, 0.5)
  return tf.ensure_shape(p * filtered + (1.0 - p) * image, image.shape), no_words()


# --- Resize. --------------------------------------------------------------------------------------


def resize(image, size, method):
  """tf.image.resize without antialiasing, standing in for cv2.resize.

  bilinear matches cv2 INTER_LINEAR (half-pixel centres, no antialias); area is the pixel-area
  average like INTER_AREA; bicubic uses Keys a = -0.5 where cv2 uses a = -0.75 (slightly less
  sharpening overshoot). The parameter ranges are the reference's.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
  return tf.image.resize(_as_image(image), size, method=method, antialias=False)


def random_resize(image, seed, *, size=None, scale_range=(0.5, 1.4)):
  """`random_resize`: to `size` (h, w) if given, else (int(h/s), int(w/s)) with s ~ U(scale_range).

  The interpolation is uniform over area / bicubic / bilinear. -> ([h', w', 3], words: 'blur',
  as the reference folds resizing into blur).
  """
  image = _as_image(image)
  if size is None:
    _check_range("scale_range", scale_range, lo=1e-6)
    s = _uniform(sub_seed(seed, 0), *scale_range)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    size = tf.maximum(tf.cast(tf.floor(hw / s), tf.int32), 1)
  method = tf.random.stateless_uniform([], sub_seed(seed, 1), minval=0, maxval=3, dtype=tf.int32)
  branches = [lambda m=m: resize(image, size, m) for m in RESIZE_METHODS]
  out = tf.ensure_shape(tf.switch_case(method, branches), [None, None, 3])
  return out, word_mask(BLUR)


# --- Noise, JPEG, quantisation. -------------------------------------------------------------------


def _luma(image):
  """cv2 BGR2GRAY weights applied to RGB channels: [H, W, 3] -> [H, W, 1]."""
  return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def standard_normal(shape, seed):
  """float32 N(0, 1) draws of `shape` by Box-Muller from one stateless uniform draw.

  About half the CPU cost of tf.random.stateless_normal (0.94 vs 1.98 ms for 256 x 256 x 3 on one
  core). The uniforms have 23 bits, so |z| <= sqrt(2 ln 2^23) = 5.65: the tail beyond that
  (probability 1.6e-8) is cut, far below anything 1-5/255 noise on 8-bit images can show.
  """
  n = tf.reduce_prod(shape)
  half = (n + 1) // 2
  u = tf.random.stateless_uniform(tf.stack([2, half]), seed)
  radius = tf.sqrt(-2.0 * tf.math.log1p(-u[0]))  # 1 - u in (0, 1]: finite
  angle = (2.0 * math.pi) * u[1]
  z = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)[:n]
  return tf.reshape(z, shape)


def add_gaussian_noise(image, seed, *, sigma_range=(1.0, 5.0), gray_prob=0.4):
  """Gaussian noise, sigma ~ U(sigma_range) / 255; gray (one channel) w.p. gray_prob; clipped."""
  _check_prob("gray_prob", gray_prob)
  _check_range("sigma_range", sigma_range)
  image = _as_image(image)
  sigma = _uniform(sub_seed(seed, 0), *sigma_range) / 255.0
  gray = _uniform(sub_seed(seed, 1)) < gray_prob
  shape = tf.shape(image)
  noise = tf.cond(
      gray,
      lambda: tf.broadcast_to(standard_normal(shape[:2], sub_seed(seed, 2))[..., None], shape),
      lambda: standard_normal(shape, sub_seed(seed, 2)))
  return tf.clip_by_value(image + noise * sigma, 0.0, 1.0)


# Exact Poisson sampling by table inverse CDF for the common case vals = 256 (an image with more
# than 128 distinct levels: every natural photo). X = #{k : F(k) < u} with u = r / 2^23 and r a
# uniform 23-bit integer (the resolution of a float32 uniform in [0, 1)), so the comparison is done
# on integers: F(k) < r / 2^23  <=>  C(k) = floor(F(k) 2^23) + 1 <= r. The r range is cut into
# 1024 buckets of 8192; per (level, bucket) one int32 packs the count below the bucket (lo) and the
# one CDF step inside it, if any (almost always: one gather and one compare per pixel). Buckets
# with two or more steps (far tails, ~1% of draws) are flagged and those pixels count over the
# whole CDF row. The same draw as searching the full table: exact up to the float64 CDF.
_POISSON_K = 512  # P(X >= 512) for the largest rate 256 is ~1e-50.
_BUCKET_BITS, _FRAC_BITS = 10, 13
_TABLES = {}


def _poisson_tables(vals=256):
  """(packed [256 * 1024] int32, cdf [256, K] int32) for rates level * vals / 255."""
  if vals not in _TABLES:
    rates = np.arange(256) * vals / 255.0
    k = np.arange(_POISSON_K)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    with np.errstate(divide="ignore", invalid="ignore"):  # rate 0: log 0 = -inf, 0 * -inf
      log_rate = np.log(rates)[:, None]
      logpmf = np.where(k[None] > 0, k[None] * log_rate, 0.0) - rates[:, None] - log_fact[None]
    cdf = np.cumsum(np.exp(logpmf), axis=1)  # float64 [256, K]; rate 0: all mass at 0.
    c = np.minimum(np.floor(cdf * 2.0 ** 23) + 1, 2 ** 23 + 1).astype(np.int64)
    c[:, -1] = 2 ** 23 + 1  # Everything at or above K - 1 is K - 1 (mass ~0).
    m, width = 1 << _BUCKET_BITS, 1 << _FRAC_BITS
    starts = np.arange(m) * width
    lo = np.stack([np.searchsorted(row, starts, side="right") for row in c])
    hi = np.stack([np.searchsorted(row, starts + width - 1, side="right") for row in c])
    step = np.take_along_axis(c, np.minimum(lo, _POISSON_K - 1), axis=1) - starts[None]
    thr = np.where(hi > lo, step, width)
    packed = np.where(hi - lo >= 2, -1, (lo << (_FRAC_BITS + 1)) | thr).astype(np.int32)
    _TABLES[vals] = (packed.reshape(-1), c.astype(np.int32))
  return _TABLES[vals]


def _poisson_256(levels, seed):
  """Exact Poisson(levels * 256 / 255) draws for int32 levels in [0, 255], any shape -> float32."""
  packed, cdf = _poisson_tables(256)
  flat = tf.reshape(levels, [-1])
  r = tf.random.stateless_uniform(tf.shape(flat), seed, minval=0, maxval=1 << 23, dtype=tf.int32)
  bucket = tf.bitwise.right_shift(r, _FRAC_BITS)
  entry = tf.gather(tf.constant(packed), flat * (1 << _BUCKET_BITS) + bucket)
  frac = tf.bitwise.bitwise_and(r, (1 << _FRAC_BITS) - 1)
  thr = tf.bitwise.bitwise_and(entry, (1 << (_FRAC_BITS + 1)) - 1)
  x = tf.bitwise.right_shift(entry, _FRAC_BITS + 1) + tf.cast(frac >= thr, tf.int32)
  tails = tf.where(entry < 0)  # [n, 1]
  rows = tf.gather(tf.constant(cdf), tf.gather_nd(flat, tails))
  counts = tf.reduce_sum(tf.cast(rows <= tf.gather_nd(r, tails)[:, None], tf.int32), axis=1)
  x = tf.tensor_scatter_nd_update(x, tails, counts)
  return tf.reshape(tf.cast(x, tf.float32), tf.shape(levels))


def _poisson_noise(src, seed):
  """BasicSR `generate_poisson_noise` without the scale, for src [H, W, C] in [0, 1]."""
  levels = tf.cast(tf.clip_by_value(tf.round(src * 255.0), 0.0, 255.0), tf.int32)
  # Distinct values by a 256-bin histogram (cheaper than tf.unique); vals = 2^ceil(log2(count)),
  # exactly: the number of powers of two below the count (no float log whose rounding could push
  # an exact power of two up a step).
  hist = tf.math.bincount(tf.reshape(levels, [-1]), minlength=256, maxlength=256)
  unique = tf.reduce_sum(tf.cast(hist > 0, tf.int32))
  vals_log2 = tf.reduce_sum(tf.cast(tf.constant([2 ** i for i in range(8)]) < unique, tf.int32))
  vals = tf.cast(tf.bitwise.left_shift(1, vals_log2), tf.float32)
  img = tf.cast(levels, tf.float32) / 255.0
  counts = tf.cond(
      vals_log2 == 8, lambda: _poisson_256(levels, seed),
      lambda: tf.random.stateless_poisson(tf.shape(img), seed, img * vals, dtype=tf.float32))
  return counts / vals - img


def add_poisson_noise(image, seed, *, scale_range=(0.01, 0.5), gray_prob=0.4):
  """Poisson noise (BasicSR `generate_poisson_noise`, spec §7.4); clipped.

  The image (or, w.p. gray_prob, its luma, one noise field for all channels) is rounded to /255
  levels; vals = 2^ceil(log2(#distinct levels));
  noise = (Poisson(img * vals) / vals - img) * scale, scale ~ U(scale_range).
  """
  _check_prob("gray_prob", gray_prob)
  _check_range("scale_range", scale_range)
  image = _as_image(image)
  scale = _uniform(sub_seed(seed, 0), *scale_range)
  gray = _uniform(sub_seed(seed, 1)) < gray_prob
  noise = tf.cond(gray,
                  lambda: tf.broadcast_to(_poisson_noise(_luma(image), sub_seed(seed, 2)),
                                          tf.shape(image)),
                  lambda: _poisson_noise(image, sub_seed(seed, 2)))
  return tf.clip_by_value(image + noise * scale, 0.0, 1.0)


def quantize(image):
  """clip(round(img * 255), 0, 255) / 255 (round half to even, like np.round)."""
  return tf.clip_by_value(tf.round(_as_image(image) * 255.0), 0.0, 255.0) / 255.0


def random_noise(image, seed, *, gauss_prob=0.6, poisson_prob=0.4):
  """`random_noise` (spec §7.4): Gaussian w.p. gauss_prob, independently Poisson w.p.
  poisson_prob, then 8-bit quantisation. -> (image, words: 'noise', always, as the reference)."""
  _check_prob("gauss_prob", gauss_prob)
  _check_prob("poisson_prob", poisson_prob)
  image = _as_image(image)
  do_gauss = _uniform(sub_seed(seed, 0)) < gauss_prob
  do_poisson = _uniform(sub_seed(seed, 1)) < poisson_prob
  out = tf.cond(do_gauss, lambda: add_gaussian_noise(image, sub_seed(seed, 2)), lambda: image)
  out = tf.cond(do_poisson, lambda: add_poisson_noise(out, sub_seed(seed, 3)), lambda: out)
  return tf.ensure_shape(quantize(out), image.shape), word_mask(NOISE)


def jpeg(image, quality):
  """JPEG round trip like cv2.imencode/imdecode: clip, round to uint8, YCbCr 4:2:0 (libjpeg)."""
  image = _as_image(image)
  u8 = tf.cast(quantize(tf.clip_by_value(image, 0.0, 1.0)) * 255.0, tf.uint8)
  out = tf.image.adjust_jpeg_quality(u8, tf.cast(quality, tf.int32))
  return tf.ensure_shape(tf.cast(out, tf.float32) / 255.0, image.shape)


def random_jpeg(image, seed, quality_range=(60, 95)):
  """JPEG with quality int(U(quality_range)) (at most 100). -> (image, words: 'jpeg block')."""
  lo, hi = quality_range
  if not 0 <= lo <= hi <= 100:
    raise ValueError(f"quality_range must satisfy 0 <= lo <= hi <= 100, got {quality_range}")
  q = tf.cast(tf.floor(_uniform(sub_seed(seed, 0), float(lo), float(hi))), tf.int32)
  return jpeg(image, tf.minimum(q, 100)), word_mask(JPEG)


# --- Combinators: steps are fn(image, words, seed, ctx) -> (image, words). ------------------------


def leaf(op, **params):
  """A step running op(image, seed, **params) -> (image, words) and or-ing its words in.

  A `size="input"` parameter is replaced by the pipeline input's (h, w) (resize back).
  """

  def step(img, words, seed, ctx):
    kw = dict(params)
    if isinstance(kw.get("size"), str):
      if kw["size"] != "input":
        raise ValueError(f"size must be (h, w) or 'input', got {kw['size']!r}")
      kw["size"] = ctx["size"]
    out, new = op(img, seed, **kw)
    return tf.ensure_shape(out, [None, None, 3]), words | new

  return step


def gated(step, prob, otherwise=None):
  """Apply `step` w.p. `prob`, else `otherwise` (a step, or nothing).

  prob: a float, or the name of a shared gate in ctx["gates"] (one draw per example, used by
  several steps: the wild chain's resize flag).
  """
  if isinstance(prob, str):
    name = prob
  else:
    _check_prob("prob", prob)
    name = None

  def run(img, words, seed, ctx):
    if name is not None:
      if name not in ctx["gates"]:
        raise ValueError(f"unknown gate {name!r}; declared: {sorted(ctx['gates'])}")
      fire = ctx["gates"][name]
    else:
      fire = _uniform(sub_seed(seed, 0)) < prob
    orelse = (lambda: (img, words)) if otherwise is None else \
        (lambda: otherwise(img, words, sub_seed(seed, 2), ctx))
    img, words = tf.cond(fire, lambda: step(img, words, sub_seed(seed, 1), ctx), orelse)
    return tf.ensure_shape(img, [None, None, 3]), words

  return run


def chain(steps):
  """Apply `steps` in order; step i gets sub-seed i."""
  steps = list(steps)

  def run(img, words, seed, ctx):
    for i, step in enumerate(steps):
      img, words = step(img, words, sub_seed(seed, i), ctx)
    return img, words

  return run


def random_permutation(seed, n):
  """A uniformly random permutation of range(n) from a stateless seed. -> int32 [n]."""
  return tf.argsort(tf.random.stateless_uniform([n], seed), stable=True)


def _ctx_signature(ctx):
  return {"size": tf.TensorSpec([2], tf.int32),
          "gates": {k: tf.TensorSpec([], tf.bool) for k in sorted(ctx["gates"])}}


def _ctx_args(ctx):
  return {"size": tf.cast(ctx["size"], tf.int32), "gates": ctx["gates"]}


def shuffled(steps, record=None):
  """Apply `steps` in a random order (sub-seed 0 draws it; step j always gets sub-seed j + 1, so
  its own randomness does not depend on its position). If `record` is a list, the order tensor is
  appended to it (for tests).

  One "dispatch" tf.function (a switch_case over the steps, traced once per set of gate names,
  not inlined) called at each position. Not a tf.while_loop: Grappler's shape inference through
  a loop whose body switches between shape-keeping steps and a resize to a static size (the wild
  chain's resize back to a statically shaped input) wrongly pins the loop image to that size and
  fails at run time (TF 2.21). Not inlined copies per position either: those multiply the
  trace time and Grappler's time on every new tf.data pipeline.
  """
  steps = list(steps)
  if not steps:
    raise ValueError("shuffled needs at least one step")
  cache = {}

  def dispatch(index, img, words, seed, ctx):
    branches = [lambda s=s, j=j: s(img, words, sub_seed(seed, j + 1), ctx)
                for j, s in enumerate(steps)]
    img, words = tf.switch_case(index, branches)
    return tf.ensure_shape(img, [None, None, 3]), words

  def run(img, words, seed, ctx):
    order = random_permutation(sub_seed(seed, 0), len(steps))
    if record is not None:
      record.append(order)
    key = tuple(sorted(ctx["gates"]))
    if key not in cache:
      signature = (tf.TensorSpec([], tf.int32), tf.TensorSpec([None, None, 3], tf.float32),
                   tf.TensorSpec([len(DEGRADATION_WORDS)], tf.bool), tf.TensorSpec([2], tf.int32),
                   _ctx_signature(ctx))
      cache[key] = tf.function(dispatch, input_signature=signature, autograph=False,
                               experimental_attributes={"_noinline": True})
    seed = tf.cast(seed, tf.int32)
    for position in range(len(steps)):
      img, words = cache[key](order[position], img, words, seed, _ctx_args(ctx))
      img = tf.ensure_shape(img, [None, None, 3])
    return img, words

  return run


def run_pipeline(step, image, seed, *, gates=None, final_quantize=True):
  """Run a step on one image: draws the shared gates, then quantises to 8 bits.

  gates: {name: probability}, drawn from sub-seeds 1000 + i of the seed (names sorted).
  -> (image [H, W, 3] float32, words bool[4]).
  """
  image = _as_image(image)
  seed = tf.cast(seed, tf.int32)
  gates = gates or {}
  ctx = {"size": tf.shape(image)[:2], "gates": {}}
  for i, name in enumerate(sorted(gates)):
    _check_prob(f"gate {name!r}", gates[name])
    ctx["gates"][name] = _uniform(sub_seed(seed, 1000 + i)) < gates[name]
  img, words = step(image, no_words(), sub_seed(seed, 0), ctx)
  img = quantize(img) if final_quantize else img
  return tf.ensure_shape(img, image.shape), words


# --- The three-stage shuffled pipeline. -----------------------------------------------------------


def _bound(op, **fixed):
  return lambda img, seed, **kw: op(img, seed, **fixed, **kw)


def wild_chain(*, blur_prob=0.8, resize_prob=0.8, noise_prob=0.4, jpeg_prob=0.4, udc_prob=0.2,
               psf_bank=None, udc_bank=None, record=None):
  """The step and gates of `random_degrade` (spec §7.2). -> (step, gates)."""
  probs = dict(blur_prob=blur_prob, resize_prob=resize_prob, noise_prob=noise_prob,
               jpeg_prob=jpeg_prob, udc_prob=udc_prob)
  for name, value in probs.items():
    _check_prob(name, value)
  udc = None
  if udc_bank is not None and udc_prob > 0:
    udc = gated(leaf(_bound(under_display_filter, udc_bank=udc_bank)), udc_prob)

  def blur(prob, with_udc, **kw):
    return gated(leaf(random_blur, psf_bank=psf_bank, **kw), prob, udc if with_udc else None)

  stage1 = shuffled([
      blur(blur_prob, True, max_radius=10, sinc_prob=0.1, deblur_prob=0.1, blur_range=(0.2, 2.2)),
      gated(leaf(random_resize), "resize"),
      gated(leaf(random_noise), noise_prob),
      gated(leaf(random_jpeg, quality_range=(60, 95)), jpeg_prob),
  ], record)
  stage2 = shuffled([
      blur(blur_prob * 0.5, True, max_radius=5, sinc_prob=0.1, deblur_prob=0.1,
           blur_range=(0.2, 1.5)),
      gated(leaf(random_noise), noise_prob * 0.5),
  ], record)
  stage3 = shuffled([
      blur(blur_prob, False, max_radius=10, sinc_prob=0.8, deblur_prob=0.1, blur_range=(0.2, 1.0)),
      gated(leaf(random_resize, size="input"), "resize"),
      gated(leaf(random_jpeg, quality_range=(80, 100)), jpeg_prob),
  ], record)
  return chain([stage1, stage2, stage3]), {"resize": resize_prob}


def random_degrade(image, seed, *, psf_bank=None, udc_bank=None, **probs):
  """Wild degradation pipeline (spec §7.2). image float32 [H, W, 3] in [0, 1], seed int32[2].

  Three stages, each in a random order: (blur | UDC, resize down, noise, JPEG 60-95),
  (blur | UDC, noise), (sinc-heavy blur, resize back to (H, W), JPEG 80-100); one shared resize
  flag; final 8-bit quantisation. `probs` overrides DEFAULT_PROBS (unknown names are errors).
  -> (lq [H, W, 3] float32 in [0, 1], words tf.bool[4] over DEGRADATION_WORDS).
  """
  unknown = set(probs) - set(DEFAULT_PROBS)
  if unknown:
    raise ValueError(f"unknown random_degrade probabilities {sorted(unknown)}; "
                     f"known: {sorted(DEFAULT_PROBS)}")
  probs = {**DEFAULT_PROBS, **probs}
  # One chain per (probabilities, banks): its steps are tf.functions, traced on first use, so
  # rebuilding it per call would retrace every time (seconds per eager call).
  key = (tuple(sorted(probs.items())), id(psf_bank), id(udc_bank))
  if key not in _CHAINS:
    if len(_CHAINS) >= 16:
      _CHAINS.pop(next(iter(_CHAINS)))
    # The banks are kept alive with the entry, so their ids cannot be reused while it exists.
    _CHAINS[key] = (wild_chain(psf_bank=psf_bank, udc_bank=udc_bank, **probs), psf_bank, udc_bank)
  (step, gates), _, _ = _CHAINS[key]
  return run_pipeline(step, image, seed, gates=gates)


_CHAINS = {}


def degradation_text(mask):
  """Join the DEGRADATION_WORDS set in a bool[4] mask with ", " -> tf.string scalar."""
  selected = tf.boolean_mask(tf.constant(DEGRADATION_WORDS), tf.cast(mask, tf.bool))
  return tf.strings.reduce_join(selected, separator=", ")

"""TF degradation ops (input_pipeline/degradations.py, spec §7) and the registry (registry.py).

Every op runs eagerly and inside `tf.data.Dataset.map` (the two must agree) and is compared with
a NumPy (or OpenCV, when installed) reference written here from the spec, or with the statistics
its parameters imply. The whole chain is checked for shape, dtype, range, determinism, random stage
order, word frequencies and the PSNR distribution it produces on scikit-image's sample photos.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from input_pipeline import degradations as deg  # noqa: E402
from input_pipeline import kernels, registry  # noqa: E402


def _np(x):
  return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, x)


def _in_map(fn, *args):
  """fn(*args) inside Dataset.map (graph mode, tf.data's executor) -> numpy."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
  return _np(next(iter(ds)))


def _agree(a, b):
  if np.issubdtype(np.asarray(a).dtype, np.floating):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
  else:
    np.testing.assert_array_equal(a, b)


def _both(fn, *args):
  """fn eagerly and inside Dataset.map; asserts they agree; returns the eager result."""
  eager = _np(fn(*(tf.convert_to_tensor(a) for a in args)))
  tf.nest.map_structure(_agree, eager, _in_map(fn, *args))
  return eager


def _seed(a, b=0):
  return np.array([a, b], np.int32)


def _psnr(a, b):
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return 10 * math.log10(1.0 / max(mse, 1e-12))


def _photos():
  from skimage import data

  return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def _photo_crop(h, w, index=0, seed=0):
  p = _photos()[index % 4]
  rng = np.random.default_rng(seed)
  y, x = rng.integers(p.shape[0] - h + 1), rng.integers(p.shape[1] - w + 1)
  return p[y:y + h, x:x + w, :3].astype(np.float32) / 255.0


def _np_correlate(img, kernel):
  """cv2.filter2D by definition: reflect-101 padding (np 'reflect') + direct correlation."""
  n = kernel.shape[0]
  r = n // 2
  pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  h, w = img.shape[:2]
  out = np.zeros(img.shape, np.float64)
  for i in range(n):
    for j in range(n):
      out += kernel[i, j] * pad[i:i + h, j:j + w]
  return out


# --- Padding and filtering. -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 9), (30, 17)])
@pytest.mark.parametrize("pad", [1, 5, 10, 20])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pad_image_matches_numpy(shape, pad, symmetric):
  img = np.random.default_rng(0).uniform(size=shape + (3,)).astype(np.float32)
  ref = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric" if symmetric else "reflect")
  out = _both(lambda x: deg.pad_image(x, pad, symmetric), img)
  np.testing.assert_array_equal(out, ref)  # pad > size included (repeated reflection)


@pytest.mark.parametrize("n", [3, 5, 7, 9, 21])  # <= 7: depthwise conv; > 7: FFT
@pytest.mark.parametrize("shape", [(37, 53), (8, 11), (3, 4)])
def test_filter2d_equals_reflect101_direct_correlation(n, shape):
  rng = np.random.default_rng(n)
  img = rng.uniform(size=shape + (3,)).astype(np.float32)
  kernel = rng.uniform(-0.2, 1.0, size=(n, n)).astype(np.float32)  # asymmetric, signed
  kernel /= kernel.sum()
  out = _both(lambda x, k: deg.filter2d(x, k), img, kernel)
  assert out.shape == img.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, _np_correlate(img, kernel), atol=2e-5)
  cv2 = pytest.importorskip("cv2")
  if min(shape) > n // 2:  # cv2 reflects once: only comparable while the pad fits
    np.testing.assert_allclose(out, cv2.filter2D(img, -1, kernel), atol=2e-5)


def test_filter2d_support_crops_the_grid_kernel():
  rng = np.random.default_rng(1)
  img = rng.uniform(size=(40, 31, 3)).astype(np.float32)
  small = rng.uniform(size=(7, 7)).astype(np.float32)
  small /= small.sum()
  grid = np.zeros((21, 21), np.float32)
  grid[7:14, 7:14] = small
  ref = _np_correlate(img, small)
  for support in (7, 13, 21):  # the direct branch (7) and the FFT (13, 21)
    out = _both(lambda x, k, s: deg.filter2d(x, k, s), img, grid, np.int32(support))
    np.testing.assert_allclose(out, ref, atol=2e-5)
  for support in (1, 3, 5):  # smaller supports use only the centre of the grid kernel
    a = support // 2
    crop = grid[10 - a:11 + a, 10 - a:11 + a]
    out = _both(lambda x, k, s: deg.filter2d(x, k, s), img, grid, np.int32(support))
    np.testing.assert_allclose(out, _np_correlate(img, crop), atol=2e-5)
  with pytest.raises(ValueError, match="odd square"):
    deg.filter2d(img, np.ones((4, 4), np.float32))


def _np_wiener(img, kernel, k_reg=0.006, pad=20):
  """The reference `wiener_filter` per channel (spec §7.3 step 4), with numpy's FFT."""
  out = []
  for c in range(img.shape[-1]):
    x = np.pad(img[..., c].astype(np.float64), pad, mode="symmetric")
    kern = kernel / kernel.sum()
    sz = (x.shape[0] - kern.shape[0], x.shape[1] - kern.shape[1])
    kern = np.pad(kern, (((sz[0] + 1) // 2, sz[0] // 2), ((sz[1] + 1) // 2, sz[1] // 2)))
    fk = np.fft.fft2(np.fft.ifftshift(kern))
    y = np.real(np.fft.ifft2(np.fft.fft2(x) * np.conj(fk) / (np.abs(fk) ** 2 + k_reg)))
    out.append(y[pad:-pad, pad:-pad])
  return np.stack(out, -1)


@pytest.mark.parametrize("shape", [(48, 64), (33, 27)])
def test_wiener_deconv_matches_numpy_reference(shape):
  img = _photo_crop(*shape, index=1)
  kernel = kernels.gaussian_kernel(5, 1.2, 0.7, 0.5).numpy()
  blurred = deg.filter2d(img, kernel).numpy()
  out = _both(lambda x, k: deg.wiener_deconv(x, k), blurred, kernel)
  np.testing.assert_allclose(out, _np_wiener(blurred, kernel), atol=1e-4)


def test_wiener_deconvolution_of_a_blurred_step_edge_rings():
  img = np.full((32, 64, 3), 0.2, np.float32)
  img[:, 32:] = 0.8
  kernel = kernels.gaussian_kernel(7, 1.5).numpy()
  blurred = deg.filter2d(img, kernel).numpy()
  assert blurred.min() >= 0.2 - 1e-5 and blurred.max() <= 0.8 + 1e-5  # blur never overshoots
  out = _both(lambda x, k: deg.wiener_deconv(x, k), blurred, kernel)
  edge = out[8:24, 24:40]
  overshoot, undershoot = edge.max() - 0.8, 0.2 - edge.min()
  assert overshoot > 0.02 and undershoot > 0.02, (overshoot, undershoot)  # ringing both sides
  # ... and it oscillates: the profile across the edge changes direction more than once.
  profile = out[16, 20:44, 0]
  assert np.sum(np.diff(np.sign(np.diff(profile))) != 0) >= 2
  # Deconvolution sharpens: the edge is steeper than after the blur.
  assert np.max(np.diff(out[16, :, 0])) > 1.3 * np.max(np.diff(blurred[16, :, 0]))


def test_random_blur_words_and_branches():
  img = _photo_crop(40, 48)
  sinc = _both(lambda x, s: deg.random_blur(x, s, sinc_prob=1.0), img, _seed(1))
  assert sinc[1].tolist() == [True, True, False, False]
  plain = _np(deg.random_blur(img, _seed(1), sinc_prob=0.0, deblur_prob=0.0))
  assert plain[1].tolist() == [True, False, False, False]
  assert plain[0].min() >= -1e-6 and plain[0].max() <= 1 + 1e-6  # non-negative kernels
  # max_radius 4: k in {5, 7}, so a non-sinc blur always deconvolves with deblur_prob 1.
  wiener = _np(deg.random_blur(img, _seed(2), max_radius=4, sinc_prob=0.0, deblur_prob=1.0))
  assert wiener[1].tolist() == [True, True, False, False]
  assert _psnr(plain[0], img) < 40 and not np.allclose(plain[0], sinc[0])


# --- Noise. ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 96, 3), (33, 7)])  # odd count: one draw of a pair unused
def test_standard_normal_box_muller_statistics(shape):
  z = _both(lambda s: deg.standard_normal(tf.constant(shape), s), _seed(11))
  assert z.shape == shape and z.dtype == np.float32 and np.isfinite(z).all()
  z = z.ravel()
  n = z.size
  assert abs(z.mean()) < 4 / np.sqrt(n) and abs(z.std() - 1) < 4 / np.sqrt(2 * n)
  if n > 10000:
    assert abs(np.mean(z ** 4) - 3.0) < 0.25  # normal kurtosis (sd of the estimate ~0.06)
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.006
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.03
  assert np.abs(z).max() <= np.sqrt(2 * 23 * np.log(2)) + 1e-4


def test_gaussian_noise_statistics():
  img = np.full((96, 96, 3), 0.5, np.float32)
  color = _both(lambda x, s: deg.add_gaussian_noise(x, s, sigma_range=(3.0, 3.0), gray_prob=0.0),
                img, _seed(3))
  noise = (color - img) * 255.0
  assert abs(noise.std() - 3.0) < 0.1 and abs(noise.mean()) < 0.05
  corr = np.corrcoef(noise.reshape(-1, 3).T)
  assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.05  # independent channels
  gray = _both(lambda x, s: deg.add_gaussian_noise(x, s, sigma_range=(3.0, 3.0), gray_prob=1.0),
               img, _seed(3))
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  assert abs(((gray - img) * 255.0).std() - 3.0) < 0.15
  # sigma ~ U(1, 5): the per-example std spans the range; gray w.p. 0.4.
  seeds = np.stack([np.arange(60), np.full(60, 9)], 1).astype(np.int32)
  small = np.full((32, 32, 3), 0.5, np.float32)
  out = next(iter(tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: deg.add_gaussian_noise(small, s)).batch(60))).numpy()
  stds = ((out - small) * 255.0).std(axis=(1, 2, 3))
  assert 0.85 < stds.min() < 1.6 and 4.4 < stds.max() < 5.2
  gray_frac = np.mean([np.array_equal(o[..., 0], o[..., 1]) for o in out])
  assert 0.2 < gray_frac < 0.6


def test_poisson_noise_statistics():
  # Every /255 level present (vals = 256): noise = Poisson(l*256/255)/256 - l/255, variance
  # rate / 256^2 = l / (255 * 256), times scale^2.
  levels = np.arange(256, dtype=np.float32) / 255.0
  img = np.broadcast_to(levels[None, :, None], (96, 256, 3)).copy()
  scale = 0.5
  out = _both(lambda x, s: deg.add_poisson_noise(x, s, scale_range=(scale, scale), gray_prob=0.0),
              img, _seed(4))
  noise = (out - img) / scale
  mid = slice(32, 224)  # no clipping this far from 0 and 1 (> 4 sd)
  var = noise[:, mid].var(axis=(0, 2))  # per level (column)
  expected = np.arange(256)[mid] / (255.0 * 256.0)
  ratio = var / expected
  assert abs(ratio.mean() - 1.0) < 0.03, ratio.mean()
  assert abs(noise[:, mid].mean()) < 3 * math.sqrt(expected.mean() / noise[:, mid].size)
  # Two distinct levels -> vals = 2: variance rate / 4 with rate = l * 2 / 255.
  two = np.where(np.arange(64)[None, :, None] < 32, 64 / 255.0, 192 / 255.0)
  two = np.broadcast_to(two, (64, 64, 3)).astype(np.float32)
  out2 = _both(lambda x, s: deg.add_poisson_noise(x, s, scale_range=(0.05, 0.05), gray_prob=0.0),
               two, _seed(5))
  noise2 = (out2 - two) / 0.05
  for cols, level in ((slice(0, 32), 64), (slice(32, 64), 192)):
    rate = level * 2 / 255.0
    assert abs(noise2[:, cols].var() / (rate / 4.0) - 1.0) < 0.08
  # Gray Poisson: one field on the luma, repeated over the channels.
  gray = _both(lambda x, s: deg.add_poisson_noise(x, s, scale_range=(0.3, 0.3), gray_prob=1.0),
               img, _seed(6))
  d = gray - img
  np.testing.assert_allclose(d[..., 0], d[..., 1], atol=1e-6)
  assert d.std() > 0.001


def test_poisson_table_sampler_is_exact_inverse_cdf():
  # The bucketed table sampler (vals = 256) must give exactly #{k : C(k) <= r} for its 23-bit
  # uniform r, i.e. the full-table inverse CDF, including the flagged far-tail buckets; and its
  # histogram must match scipy's Poisson pmf (chi-square, per rate).
  from scipy import stats

  packed, cdf = deg._poisson_tables()
  levels = np.random.RandomState(0).randint(0, 256, 200000).astype(np.int32)
  seed = tf.constant([5, 9])
  x = deg._poisson_256(tf.constant(levels), seed).numpy()
  r = tf.random.stateless_uniform([levels.size], seed, minval=0, maxval=1 << 23,
                                  dtype=tf.int32).numpy()
  np.testing.assert_array_equal(x, (cdf[levels] <= r[:, None]).sum(1))
  assert (packed[levels * 1024 + (r >> 13)] < 0).sum() > 100  # the tail path ran
  for level in (1, 30, 255):
    draws = deg._poisson_256(tf.fill([200000], level), tf.constant([level, 3])).numpy()
    pmf = stats.poisson.pmf(np.arange(600), level * 256 / 255)
    keep = pmf * draws.size > 5
    observed = np.bincount(draws.astype(int), minlength=600)[:600][keep]
    expected = pmf[keep] * draws.size
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, (level, chi2)


def test_random_noise_quantises_and_always_says_noise():
  img = _photo_crop(32, 40, index=2)
  for s in range(4):
    out, words = _both(lambda x, sd: deg.random_noise(x, sd), img, _seed(s, 1))
    assert words.tolist() == [False, False, True, False]
    np.testing.assert_allclose(out * 255.0, np.round(out * 255.0), atol=1e-3)
    assert out.min() >= 0 and out.max() <= 1
  none, _ = _both(lambda x, sd: deg.random_noise(x, sd, gauss_prob=0.0, poisson_prob=0.0), img,
                  _seed(0))
  np.testing.assert_array_equal(none, np.round(img * 255.0) / 255.0)


# --- JPEG and resize. -----------------------------------------------------------------------------


def test_jpeg_quality_controls_the_loss():
  img = _photo_crop(96, 96, index=0, seed=3)
  q10 = _both(lambda x: deg.jpeg(x, 10), img)
  q95 = _both(lambda x: deg.jpeg(x, 95), img)
  p10, p95 = _psnr(q10, img), _psnr(q95, img)
  # Measured on this textured crop: ~27.2 dB at q10, ~36.4 dB at q95, i.e. ~8x the squared error.
  assert p95 > 33 and p95 - p10 > 6, (p10, p95)
  assert q10.dtype == np.float32 and q10.shape == img.shape
  out, words = _both(lambda x, s: deg.random_jpeg(x, s, (60, 95)), img, _seed(1))
  assert words.tolist() == [False, False, False, True] and p10 < _psnr(out, img) < p95 + 1
  cv2 = pytest.importorskip("cv2")
  u8 = np.ascontiguousarray(np.round(img[..., ::-1] * 255.0)).astype(np.uint8)
  _, buf = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), 50])
  ref = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1] / 255.0
  assert np.abs(deg.jpeg(img, 50).numpy() - ref).mean() < 2.0 / 255.0  # same libjpeg path


def test_resize_matches_cv2_and_random_sizes():
  cv2 = pytest.importorskip("cv2")
  img = _photo_crop(48, 64, index=3)
  for method, flag in (("bilinear", cv2.INTER_LINEAR), ("area", cv2.INTER_AREA),
                       ("bicubic", cv2.INTER_CUBIC)):
    for size in ((24, 32), (37, 50), (80, 90)):
      out = _both(lambda x, m=method, sz=size: deg.resize(x, sz, m), img)
      diff = np.abs(out - cv2.resize(img, size[::-1], interpolation=flag))
      if method == "bicubic":  # Keys a = -0.5 against cv2's a = -0.75: close, not equal
        assert diff.max() < 0.05 and diff.mean() < 0.004, (size, diff.max(), diff.mean())
      else:
        assert diff.max() < 1e-5, (method, size, diff.max())
  seeds = np.stack([np.arange(80), np.full(80, 3)], 1).astype(np.int32)
  shapes = [tuple(t.numpy()) for t in tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: tf.shape(deg.random_resize(img, s)[0]))]
  hs = np.array([s[0] for s in shapes])
  assert hs.min() >= int(48 / 1.4) and hs.max() <= 96 and hs.max() - hs.min() > 30
  back, words = _both(lambda x, s: deg.random_resize(x, s, size=(48, 64)), img[:20, :30], _seed(1))
  assert back.shape == img.shape and words.tolist() == [True, False, False, False]


# --- Under-display filter. --------------------------------------------------------------------


def test_under_display_filter():
  delta = np.zeros((1, 9, 9, 3), np.float32)
  delta[0, 4, 4] = 1.0
  odd = _photo_crop(31, 41, index=1)
  out, words = _both(lambda x, s: deg.under_display_filter(x, s, udc_bank=delta), odd, _seed(0))
  np.testing.assert_allclose(out, odd, atol=1e-5)  # a centred delta PSF changes nothing
  assert not words.any()
  # With an even side, the reference's centre-pad + ifftshift puts the delta one pixel off the
  # origin: the image moves by one pixel (kept: it is what the reference computes).
  img = _photo_crop(30, 41, index=1)
  out = _both(lambda x, s: deg.under_display_filter(x, s, udc_bank=delta)[0], img, _seed(0))
  blend = (out - img) / np.where(np.abs(np.roll(img, -1, 0) - img) > 0.05,
                                 np.roll(img, -1, 0) - img, np.nan)
  assert 0.1 <= np.nanmedian(blend) <= 0.5 and np.nanstd(blend) < 1e-3
  rng = np.random.default_rng(0)
  psf = rng.uniform(size=(1, 45, 12, 3)).astype(np.float32)  # taller, narrower than the image
  psf /= psf.sum(axis=(1, 2), keepdims=True)
  out = _both(lambda x, s: deg.under_display_filter(x, s, udc_bank=psf)[0], img, _seed(0))
  # NumPy reference: crop / pad the PSF to the image (extra pixel bottom/right), ifftshift, FFT.
  h, w = img.shape[:2]
  p = psf[0][(45 - h) // 2:(45 - h) // 2 + h]
  p = np.pad(p, ((0, 0), ((w - 12) // 2, w - 12 - (w - 12) // 2), (0, 0)))
  filt = np.stack([np.real(np.fft.ifft2(np.fft.fft2(img[..., c]) *
                                        np.fft.fft2(np.fft.ifftshift(p[..., c]))))
                   for c in range(3)], -1)
  blend = (out - img) / (filt - img)  # out = p * filt + (1 - p) * img, p ~ U(0.1, 0.5)
  mask = np.abs(filt - img) > 0.05
  assert 0.1 <= np.median(blend[mask]) <= 0.5
  np.testing.assert_allclose(blend[mask], np.median(blend[mask]), atol=2e-3)


# --- Combinators and the chain. -----------------------------------------------------------------


def test_stage_order_varies_across_seeds_and_changes_the_output():
  record = []
  step, gates = deg.wild_chain(record=record)
  img = tf.zeros([16, 16, 3])

  @tf.function
  def orders(seed):
    del record[:]
    deg.run_pipeline(step, img, seed, gates=gates)
    return list(record)

  firsts = [tuple(orders(tf.constant([s, 0]))[0].numpy()) for s in range(40)]
  assert all(sorted(o) == [0, 1, 2, 3] for o in firsts)
  assert len(set(firsts)) >= 14  # of 24 permutations
  assert {o[0] for o in firsts} == {0, 1, 2, 3}
  assert tuple(orders(tf.constant([3, 0]))[0].numpy()) == firsts[3]  # per-seed deterministic

  # Two non-commuting ops in a shuffle: both orders occur, each about half the time.
  halve = deg.leaf(lambda x, s: (x * 0.5, deg.word_mask(deg.BLUR)))
  shift = deg.leaf(lambda x, s: (x + 0.25, deg.word_mask(deg.NOISE)))
  seeds = np.stack([np.arange(64), np.zeros(64)], 1).astype(np.int32)
  one = np.zeros([2, 2, 3], np.float32)
  outs = next(iter(tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: deg.run_pipeline(deg.shuffled([halve, shift]), one, s, final_quantize=False)[0]
  ).batch(64))).numpy()[:, 0, 0, 0]
  assert set(np.round(outs, 6)) == {0.125, 0.25}  # (0*0.5)+0.25 vs (0+0.25)*0.5
  assert 16 < np.sum(outs == 0.25) < 48


def _chain_in_map(pairs, fn=deg.random_degrade):
  """fn(image, seed) over (image, seed) pairs of any sizes, in ONE tf.data pipeline (each new
  pipeline of the whole chain costs seconds of graph optimisation)."""
  ds = tf.data.Dataset.from_generator(
      lambda: iter(pairs), output_signature=(tf.TensorSpec([None, None, 3], tf.float32),
                                             tf.TensorSpec([2], tf.int32)))
  return [_np(out) for out in ds.map(fn)]


def test_random_degrade_output_contract_eager_and_in_map():
  pairs = [(_photo_crop(*shape, index=shape[0]), _seed(s, 7))
           for shape in ((37, 53), (64, 64), (20, 90)) for s in range(3)]
  eager = [_np(deg.random_degrade(img, seed)) for img, seed in pairs]
  mapped = _chain_in_map(pairs)
  for (img, _), (lq, words), (lq_map, words_map) in zip(pairs, eager, mapped, strict=True):
    assert lq.shape == img.shape and lq.dtype == np.float32
    assert lq.min() >= 0.0 and lq.max() <= 1.0
    np.testing.assert_allclose(lq * 255.0, np.round(lq * 255.0), atol=1e-3)  # 8-bit grid
    assert words.shape == (4,) and words.dtype == bool
    text = deg.degradation_text(words).numpy().decode()
    assert text == ", ".join(w for w, on in zip(deg.DEGRADATION_WORDS, words, strict=True) if on)
    # The graph may round a float op differently from eager mode; after the final 8-bit
    # quantisation that can flip a rare pixel by one level, never more.
    np.testing.assert_array_equal(words_map, words)
    diff = np.abs(lq_map - lq)
    assert diff.max() <= 1.0 / 255.0 + 1e-6 and (diff > 0).mean() < 0.01


def test_random_degrade_determinism_and_overrides():
  img = _photo_crop(48, 40, index=2)
  a = _np(deg.random_degrade(img, _seed(5, 5)))
  b = _np(deg.random_degrade(img, _seed(5, 5)))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  mapped = _chain_in_map([(img, _seed(s, 5)) for s in (5, 6, 5, 7, 8, 9)])
  np.testing.assert_array_equal(mapped[0][0], mapped[2][0])  # same seed, same pipeline
  np.testing.assert_array_equal(mapped[0][1], mapped[2][1])
  assert len({m[0].tobytes() for m in mapped}) == 5  # every other seed differs
  assert np.abs(mapped[0][0] - a[0]).max() <= 1.0 / 255.0 + 1e-6
  assert deg.random_degrade(img, tf.constant([5, 5], tf.int64))[0].shape == img.shape
  off = dict(blur_prob=0.0, resize_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)
  lq, words = _np(deg.random_degrade(img, _seed(1), **off))
  np.testing.assert_array_equal(lq, np.round(img * 255.0) / 255.0)
  assert not words.any() and deg.degradation_text(words).numpy() == b""
  with pytest.raises(ValueError, match="unknown random_degrade"):
    deg.random_degrade(img, _seed(0), blurr_prob=0.1)
  with pytest.raises(ValueError, match="probability"):
    deg.random_degrade(img, _seed(0), jpeg_prob=1.5)


def test_psnr_distribution_on_sample_photos():
  """PSNR(LQ, GT) of ~200 wild-chain samples on 64-128 px crops of scikit-image's photos.

  Measured with this seed: mean ~30.6 dB, p10 ~24.2 dB, p90 ~37.2 dB (wide by design: an example
  draws anything from a single mild JPEG to blur + resize + noise + JPEG). The band asserted below
  is what "mild, diverse degradations" (wild paper §3.2) means in numbers and what a broken op
  would leave: sigma or Poisson rate off by 255, a missing kernel normalisation or a wrong resize
  would drag the mean under ~20 dB, a chain that skipped its ops would push it over ~40 dB, and a
  chain without randomness would collapse the p10-p90 spread. The word frequencies follow from
  the stage probabilities: P(noise) = 1 - 0.6 * 0.8 = 0.52, P(jpeg) = 1 - 0.6^2 = 0.64.
  """
  rng = np.random.default_rng(0)
  photos = _photos()
  crops = []
  for i in range(200):
    p = photos[i % 4]
    h, w = rng.integers(64, 129, size=2)
    y, x = rng.integers(p.shape[0] - h + 1), rng.integers(p.shape[1] - w + 1)
    crops.append(p[y:y + h, x:x + w, :3].astype(np.float32) / 255.0)
  ds = tf.data.Dataset.from_generator(
      lambda: iter(crops), output_signature=tf.TensorSpec([None, None, 3], tf.float32))
  ds = ds.enumerate().map(
      lambda i, x: deg.random_degrade(x, tf.stack([tf.constant(2024), tf.cast(i, tf.int32)])),
      num_parallel_calls=2, deterministic=True)
  psnrs, words = [], []
  for (lq, wd), gt in zip(ds, crops, strict=True):
    psnrs.append(_psnr(lq.numpy(), gt))
    words.append(wd.numpy())
  psnrs, freq = np.array(psnrs), np.mean(words, 0)
  mean, p10, p90 = psnrs.mean(), np.percentile(psnrs, 10), np.percentile(psnrs, 90)
  print(f"PSNR(LQ, GT) over {len(psnrs)} crops: mean {mean:.2f} dB, p10 {p10:.2f}, p90 {p90:.2f}; "
        f"word frequencies {dict(zip(deg.DEGRADATION_WORDS, freq.round(3), strict=True))}")
  assert 25.0 < mean < 36.0
  assert 18.0 < p10 < p90 < 46.0 and p90 - p10 > 8.0
  assert freq[0] > 0.95  # a blur or a resize almost always fires
  assert abs(freq[2] - 0.52) < 0.11 and abs(freq[3] - 0.64) < 0.11
  assert 0.5 < freq[1] < 0.9  # ringing: mostly stage-3 sinc kernels (0.8 * 0.8)


# --- Registry. ---------------------------------------------------------------------------------


@pytest.mark.slow  # two whole chains traced and optimised by tf.data (~20 s on 2 shared cores)
def test_wild_spec_is_random_degrade_bit_for_bit():
  img = _photo_crop(40, 44, index=1)
  spec_fn = registry.build_pipeline(registry.wild_spec())
  named = registry.get_pipeline("wild")

  def all_three(x, s):
    return deg.random_degrade(x, s), spec_fn(x, s), named(x, s)

  outs = _chain_in_map([(img, _seed(s, 4)) for s in range(10)], all_three)
  for ref, from_spec, from_name in outs:
    for other in (from_spec, from_name):
      np.testing.assert_array_equal(other[0], ref[0])
      np.testing.assert_array_equal(other[1], ref[1])
  assert len({o[0][0].tobytes() for o in outs}) == 10
  # Overrides reach the chain: no noise, no JPEG, ever.
  quiet = registry.get_pipeline("wild", jpeg_prob=0.0, noise_prob=0.0)
  for s in range(6):
    lq, words = _np(quiet(img, _seed(s, 4)))
    assert not words[2:].any() and lq.shape == img.shape


@pytest.mark.slow  # three more whole chains (~15 s)
def test_wild_spec_with_udc_bank_matches_random_degrade():
  img = _photo_crop(24, 24, index=3)
  bank = np.random.default_rng(0).uniform(size=(2, 7, 7, 3)).astype(np.float32)
  bank /= bank.sum(axis=(1, 2), keepdims=True)
  probs = dict(blur_prob=0.0, udc_prob=1.0)  # every stage-1/2 blur slot is a UDC filter
  spec_fn = registry.build_pipeline(registry.wild_spec(**probs), udc_bank=bank)
  for s in range(3):
    a = _np(deg.random_degrade(img, _seed(s), udc_bank=bank, **probs))
    b = _np(spec_fn(img, _seed(s)))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  # The bank matters: without it the same draws leave the UDC slots empty.
  plain = _np(registry.build_pipeline(registry.wild_spec(**probs))(img, _seed(0)))[0]
  assert not np.array_equal(plain, _np(spec_fn(img, _seed(0)))[0])


def test_custom_spec_in_dataset_map():
  spec = {"gates": {"g": 1.0}, "steps": [
      {"op": "blur", "prob": "g", "sinc_prob": 0.0, "deblur_prob": 0.0, "blur_range": [1.0, 2.0]},
      {"op": "shuffle", "steps": [{"op": "gaussian_noise", "sigma_range": [20, 20]},
                                  {"op": "jpeg", "quality_range": [20, 30]}]},
      {"op": "chain", "prob": 0.0, "else": {"op": "quantize"}, "steps": [{"op": "noise"}]},
  ], "quantize": False}
  pipeline = registry.get_pipeline(spec)
  img = _photo_crop(32, 32)
  lq, words = _both(pipeline, img, _seed(3))
  assert words.tolist() == [True, False, True, True]
  assert lq.shape == img.shape and _psnr(lq, img) < 30
  np.testing.assert_allclose(lq * 255, np.round(lq * 255), atol=1e-3)  # the "else" quantised


def test_registry_errors_and_registration():
  with pytest.raises(ValueError, match=r"unknown degradation op 'bluur'.*'blur'.*'wild'"):
    registry.get_pipeline("bluur")
  with pytest.raises(ValueError, match=r"unknown degradation op 'nope'"):
    registry.get_pipeline([{"op": "nope"}])
  with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sigma'\]"):
    registry.get_pipeline([{"op": "blur", "sigma": 2.0}])
  with pytest.raises(ValueError, match="undeclared gate"):
    registry.get_pipeline([{"op": "resize", "prob": "resize"}])
  with pytest.raises(ValueError, match="probability"):
    registry.get_pipeline([{"op": "jpeg", "prob": 2.0}])
  with pytest.raises(ValueError, match="'else' needs a 'prob'"):
    registry.get_pipeline([{"op": "jpeg", "else": {"op": "noise"}}])
  with pytest.raises(ValueError, match="steps"):
    registry.get_pipeline([{"op": "shuffle"}])
  with pytest.raises(ValueError, match="unknown pipeline spec key"):
    registry.get_pipeline({"steps": [], "quantise": True})
  with pytest.raises(ValueError, match="already registered"):
    registry.register("blur")(deg.random_blur)

  name = "_test_only_mild_chain"
  registry.register(name, replace=True)([{"op": "jpeg", "quality_range": (90, 95)}])
  assert name in registry.registered()
  img = _photo_crop(24, 24)
  direct = _np(registry.get_pipeline(name)(img, _seed(1)))
  nested = _np(registry.get_pipeline([{"op": name}])(img, _seed(1)))
  assert direct[1].tolist() == [False, False, False, True]
  assert _psnr(direct[0], img) > 30 and nested[0].shape == img.shape


def test_config_dict_specs():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"pipeline": {"gates": {"r": 0.5}, "steps": [
      {"op": "resize", "prob": "r"}, {"op": "resize", "prob": "r", "size": "input"},
      {"op": "noise", "prob": 0.5}]}})
  pipeline = registry.get_pipeline(cfg.pipeline)
  img = _photo_crop(30, 30)
  shapes = {_np(pipeline(img, _seed(s)))[0].shape for s in range(6)}
  assert shapes == {img.shape}  # resized down and back up together, via the shared gate

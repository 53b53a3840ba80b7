"""NumPy/OpenCV reference degradation chain (benchmarks/numpy_degradations.py) and a statistical
cross-check against the TF chain (input_pipeline.degradations.random_degrade)."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "numpy_degradations.py"
_spec = importlib.util.spec_from_file_location("numpy_degradations", _PATH)
nd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nd)


def _crops(n, size, seed=0):
  """Random crops of scikit-image's bundled photos, float32 RGB [0, 1]."""
  from skimage import data

  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = photos[i % len(photos)]
    y, x = rng.integers(p.shape[0] - size), rng.integers(p.shape[1] - size)
    out.append(p[y:y + size, x:x + size].astype(np.float32) / 255.0)
  return np.stack(out)


def _psnr(a, b):
  mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
  return 10 * math.log10(1.0 / max(mse, 1e-12))


def test_output_shape_range_grid_and_words():
  imgs = _crops(12, 48)
  rng = np.random.default_rng(1)
  for img in imgs:
    lq, words = nd.random_degrade_np(img, rng)
    assert lq.shape == img.shape and lq.dtype == np.float32
    assert lq.min() >= 0.0 and lq.max() <= 1.0
    np.testing.assert_allclose(lq * 255, np.round(lq * 255), atol=1e-3)  # on the /255 grid
    assert words.shape == (4,) and words.dtype == bool
    text = nd.degradation_text_np(words)
    expected = [w for w, on in zip(nd.DEGRADATION_WORDS, words, strict=True) if on]
    assert text == ", ".join(expected) and len(expected) == int(words.sum())
    if not words.any():  # nothing applied: only the final quantisation
      np.testing.assert_array_equal(lq, np.round(img * 255) / 255)


def test_deterministic_for_fixed_seed():
  img = _crops(1, 40)[0]
  outs = [nd.random_degrade_np(img, np.random.default_rng(7)) for _ in range(2)]
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  others = [nd.random_degrade_np(img, np.random.default_rng(s))[0] for s in range(8, 12)]
  assert any(not np.array_equal(outs[0][0], o) for o in others)


def test_word_frequencies_match_stage_probabilities():
  # P(noise) = 1 − (1−0.4)(1−0.2); P(jpeg) = 1 − 0.6²; P(blur) ≥ P(resize flag or a blur) ≈ 0.99.
  img = _crops(1, 24)[0]
  rng = np.random.default_rng(3)
  words = np.stack([nd.random_degrade_np(img, rng)[1] for _ in range(300)])
  freq = words.mean(0)
  assert abs(freq[2] - 0.52) < 0.09, freq
  assert abs(freq[3] - 0.64) < 0.09, freq
  assert freq[0] > 0.95, freq
  assert 0.4 < freq[1] < 0.85, freq  # stage-3 sinc (0.8·0.8) dominates ringing


@pytest.mark.parametrize("k", [5, 7, 13, 19])
def test_kernels_normalised(k):
  rng = np.random.default_rng(k)
  assert nd.sinc_kernel(k, 2.0).sum() == pytest.approx(1.0)
  assert nd.disk_kernel(k).sum() == pytest.approx(1.0)
  for _ in range(30):
    kern = nd.mixed_kernel(k, (0.2, 2.2), rng)
    assert kern.sum() == pytest.approx(1.0) and (kern >= 0).all()
    assert kern.shape[0] == kern.shape[1] and kern.shape[0] % 2 == 1
  assert (nd.disk_kernel(5)[[0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()


def test_sinc_centre_is_the_limit_and_bessel_fallback():
  # The centre value ω²/(4π) must continue the off-centre formula ω·J1(ωr)/(2πr) as r → 0.
  w, r = 2.5, 1e-4
  assert w * nd._j1_integral(np.array(w * r)) / (2 * np.pi * r) == pytest.approx(
      w ** 2 / (4 * np.pi), rel=1e-6)
  x = np.linspace(0, 45, 200)
  sp = pytest.importorskip("scipy.special")
  np.testing.assert_allclose(nd._j1_integral(x), sp.j1(x), atol=1e-10)


def test_wiener_deconvolution_undoes_blur():
  img = _crops(1, 64, seed=5)[0]
  kern = nd._quad_form(7, 1.5, 1.5, 0.0)
  kern = np.exp(-0.5 * kern)
  kern /= kern.sum()
  blurred = nd.filter2d(img, kern)
  restored = nd.wiener_deconv(blurred, kern)
  inner = (slice(8, -8), slice(8, -8))
  assert _psnr(restored[inner], img[inner]) > _psnr(blurred[inner], img[inner]) + 2.0


def test_bad_arguments():
  with pytest.raises(ValueError, match="image must be"):
    nd.random_degrade_np(np.zeros((8, 8), np.float32), np.random.default_rng(0))
  with pytest.raises(ValueError, match="rng"):
    nd.random_degrade_np(np.zeros((8, 8, 3), np.float32), 0)


@pytest.mark.slow
def test_psnr_statistics_match_tf_chain():
  try:
    from input_pipeline import degradations
  except ImportError as e:
    pytest.skip(f"input_pipeline.degradations (engineer E's TF chain) not importable: {e}")
  import tensorflow as tf

  n = 100
  imgs = _crops(n, 64, seed=11)
  rng = np.random.default_rng(0)
  psnr_np = [_psnr(nd.random_degrade_np(img, rng)[0], img) for img in imgs]

  def one(i, img):
    lq, words = degradations.random_degrade(img, tf.stack([tf.constant(123, tf.int32), i]))
    return lq, words

  ds = tf.data.Dataset.from_tensor_slices(imgs).enumerate().map(
      lambda i, img: one(tf.cast(i, tf.int32), img))
  lqs, words_tf = zip(*[(lq.numpy(), w.numpy()) for lq, w in ds], strict=True)
  psnr_tf = [_psnr(lq, img) for lq, img in zip(lqs, imgs, strict=True)]
  assert np.stack(lqs).shape == imgs.shape
  m_np, m_tf = float(np.mean(psnr_np)), float(np.mean(psnr_tf))
  # Means of ~100 samples (std ≈ 4 dB each) agree to within 3 dB when the chains match.
  assert abs(m_np - m_tf) < 3.0, (m_np, m_tf)
  assert abs(np.mean(np.stack(words_tf), 0)[3] - 0.64) < 0.15  # jpeg frequency of the TF chain

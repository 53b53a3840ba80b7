"""Blur kernels of the wild degradation pipeline (input_pipeline/kernels.py, spec §7.3).

Each kernel family is checked eagerly and inside `tf.data.Dataset.map` (the two must agree
exactly), against closed-form NumPy / SciPy / scikit-image references built here from the spec's
formulas, and for the properties the chain relies on: sum 1, zero outside the drawn k x k support,
symmetry of the isotropic families, the type and size frequencies of the random draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from input_pipeline import kernels  # noqa: E402

GRID, R = kernels.GRID, kernels.RADIUS


def _in_map(fn, *args):
  """fn(*args) evaluated inside Dataset.map (graph mode, tf.data's executor) -> numpy."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
  out = next(iter(ds))
  return tf.nest.map_structure(lambda t: t.numpy(), out)


def _agree(a, b):
  """Integers and bools exactly; floats to float32 rounding (graph mode may fold constants)."""
  if np.issubdtype(np.asarray(a).dtype, np.floating):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  else:
    np.testing.assert_array_equal(a, b)


def _both(fn, *args):
  """fn eagerly and inside Dataset.map; asserts they agree; returns the eager result."""
  eager = tf.nest.map_structure(lambda t: t.numpy(), fn(*(tf.convert_to_tensor(a) for a in args)))
  mapped = _in_map(fn, *args)
  tf.nest.map_structure(_agree, eager, mapped)
  return eager


def _crop(kernel, k):
  """The centred k x k window of a 21 x 21 grid kernel."""
  h = k // 2
  return kernel[R - h:R + h + 1, R - h:R + h + 1]


def _outside(kernel, k):
  """Absolute mass outside the centred k x k window."""
  inner = np.zeros_like(kernel, bool)
  h = k // 2
  inner[R - h:R + h + 1, R - h:R + h + 1] = True
  return float(np.abs(kernel[~inner]).sum())


def _np_grid(k):
  ax = np.arange(k, dtype=np.float64) - k // 2
  return np.meshgrid(ax, ax)  # xx: column offset, yy: row offset (BasicSR mesh_grid)


def _np_quad(k, sx, sy, theta):
  """x^T Sigma^-1 x with Sigma = R diag(sx^2, sy^2) R^T, through an explicit matrix inverse."""
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  inv = np.linalg.inv(rot @ np.diag([sx * sx, sy * sy]) @ rot.T)
  xx, yy = _np_grid(k)
  xy = np.stack([xx, yy], -1)
  return np.einsum("...i,ij,...j->...", xy, inv, xy)


ISOTROPIC = {
    "gaussian": lambda k: kernels.gaussian_kernel(k, 1.7),
    "generalized": lambda k: kernels.generalized_gaussian_kernel(k, 1.3, 1.3, 0.0, 0.7),
    "plateau": lambda k: kernels.plateau_kernel(k, 1.1, 1.1, 0.0, 1.3),
    "defocus": lambda k: kernels.defocus_kernel(k),
    "box": lambda k: kernels.box_kernel(k),
    "sinc": lambda k: kernels.sinc_kernel(k, 1.9),
}


@pytest.mark.parametrize("name", sorted(ISOTROPIC))
@pytest.mark.parametrize("k", [5, 9, 19])
def test_isotropic_kernels_sum_to_one_fit_k_and_are_symmetric(name, k):
  kern = _both(lambda kk: ISOTROPIC[name](kk), np.int32(k))
  assert kern.shape == (GRID, GRID) and kern.dtype == np.float32
  assert kern.sum() == pytest.approx(1.0, abs=1e-5)
  assert _outside(kern, k) == 0.0
  # Non-zero up to the support's edge row (defocus and small-k plateau tails excepted: check the
  # centre row reaches the edge for the families whose support is the full square).
  if name in ("gaussian", "box", "plateau"):
    assert _crop(kern, k)[k // 2, 0] > 0
  for sym in (np.flipud(kern), np.fliplr(kern), kern.T, np.rot90(kern)):
    np.testing.assert_allclose(sym, kern, atol=1e-7)


@pytest.mark.parametrize("k,sx,sy,theta", [(7, 1.5, 0.6, 0.4), (13, 2.2, 0.9, -2.0),
                                           (19, 0.3, 1.8, 3.0)])
def test_anisotropic_families_match_the_closed_forms(k, sx, sy, theta):
  q = _np_quad(k, sx, sy, theta)
  cases = [
      (lambda: kernels.gaussian_kernel(k, sx, sy, theta), np.exp(-0.5 * q)),
      (lambda: kernels.generalized_gaussian_kernel(k, sx, sy, theta, 1.6),
       np.exp(-0.5 * q ** 1.6)),
      (lambda: kernels.plateau_kernel(k, sx, sy, theta, 1.25), 1.0 / (q ** 1.25 + 1.0)),
  ]
  for fn, ref in cases:
    kern = _both(lambda _: fn(), np.int32(0))
    np.testing.assert_allclose(_crop(kern, k), ref / ref.sum(), rtol=2e-4, atol=1e-7)
    assert _outside(kern, k) == 0.0
  # Swapping the sigmas and rotating by a further 90 degrees describes the same covariance.
  a = kernels.gaussian_kernel(k, sx, sy, theta).numpy()
  b = kernels.gaussian_kernel(k, sy, sx, theta + math.pi / 2).numpy()
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert not np.allclose(a, a.T, atol=1e-4)  # and a real anisotropic kernel is not symmetric


@pytest.mark.parametrize("k,cutoff", [(5, 1.2), (11, math.pi), (19, 0.7)])
def test_sinc_kernel_matches_bessel_formula(k, cutoff):
  special = pytest.importorskip("scipy.special")
  xx, yy = _np_grid(k)
  r = np.hypot(xx, yy)
  with np.errstate(divide="ignore", invalid="ignore"):
    ref = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
  ref[k // 2, k // 2] = cutoff ** 2 / (4 * np.pi)
  kern = _both(lambda c: kernels.sinc_kernel(k, c), np.float32(cutoff))
  np.testing.assert_allclose(_crop(kern, k), ref / ref.sum(), rtol=1e-4, atol=1e-6)
  if cutoff * math.hypot(k // 2, k // 2) > 3.8317:  # past J1's first zero
    assert kern.min() < -1e-4  # it rings: negative lobes are the point of a sinc kernel


@pytest.mark.parametrize("k", [5, 7, 9, 11, 13, 15, 17, 19])
def test_defocus_is_skimage_disk(k):
  draw = pytest.importorskip("skimage.draw")
  c = k // 2
  ref = np.zeros((k, k))
  rr, cc = draw.disk((c, c), c + 1)
  ref[rr, cc] = 1.0
  if k in (3, 5):
    ref[[0, 0, -1, -1], [0, -1, 0, -1]] = 0.0
  kern = _both(kernels.defocus_kernel, np.int32(k))
  np.testing.assert_allclose(_crop(kern, k), ref / ref.sum(), atol=1e-7)
  assert _outside(kern, k) == 0.0


def _reference_line_anchors(n):
  """The reference `LineDictionary(n)`'s segments (start row, start col, end row, end col)."""
  a, b = (n - 1) // 2, (n + 1) // 2
  out = [(i, 0, n - 1 - i, n - 1) for i in range(a, n)]
  out += [(n - 1, j, 0, n - 1 - j) for j in range(1, b)]
  out += [(0, n - 1 - j, n - 1, j) for j in range(b, n)]
  out += [(i, 0, n - 1 - i, n - 1) for i in range(1, a)]
  return out


@pytest.mark.parametrize("k", kernels.LINE_SIZES)
def test_line_bank_is_the_reference_line_dictionary(k):
  draw = pytest.importorskip("skimage.draw")
  refs = []
  for r0, c0, r1, c1 in _reference_line_anchors(k):
    m = np.zeros((k, k), np.float32)
    rr, cc = draw.line(r0, c0, r1, c1)
    m[rr, cc] = 1.0
    refs.append(m / m.sum())
  bank = kernels.line_kernels_np(k)
  assert bank.shape == (4 * (k // 2), k, k) == (len(refs), k, k)
  # Same set of kernels (the order is irrelevant: the angle is drawn uniformly).
  key = lambda m: m.round(6).tobytes()
  assert sorted(map(key, bank)) == sorted(map(key, refs))
  np.testing.assert_allclose(bank.sum((1, 2)), 1.0, rtol=1e-6)


def test_line_kernel_effective_size_and_all_angles():
  for k in (5, 9, 15, 17, 19):
    k_eff = k - 10 if k > 15 else k
    seen = set()
    for idx in range(3 * 4 * (k_eff // 2)):
      kern = kernels.line_kernel(k, idx).numpy()
      assert kern.sum() == pytest.approx(1.0, abs=1e-6)
      assert _outside(kern, k_eff) == 0.0
      seen.add(kern.round(6).tobytes())
    assert len(seen) == 4 * (k_eff // 2)
  np.testing.assert_array_equal(_both(lambda i: kernels.line_kernel(17, i), np.int32(3)),
                                kernels.line_kernel(7, 3).numpy())


def test_random_kernel_size_ranges():
  seeds = np.stack([np.arange(300), np.full(300, 7)], 1).astype(np.int32)
  for max_radius, expected in ((10, set(range(5, 20, 2))), (5, {5, 7, 9})):
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda s, m=max_radius: kernels.random_kernel_size(s, m)).batch(300)
    sizes = next(iter(ds)).numpy()
    assert set(sizes.tolist()) == expected
    counts = np.bincount(sizes)[sorted(expected)]
    assert counts.min() > 0.5 * 300 / len(expected)  # roughly uniform
  with pytest.raises(ValueError, match="max_radius"):
    kernels.random_kernel_size(tf.constant([0, 0]), 12)


def test_random_mixed_kernel_type_frequencies_and_validity():
  n = 1500
  seeds = np.stack([np.arange(n), np.full(n, 11)], 1).astype(np.int32)

  def draw(s):
    k = kernels.random_kernel_size(s, 10)
    kern, kind = kernels.random_mixed_kernel(tf.random.experimental.stateless_fold_in(s, 1), k,
                                             (0.2, 2.2), return_type=True)
    return kern, kind, k

  kern, kind, ks = next(iter(tf.data.Dataset.from_tensor_slices(seeds).map(draw).batch(n)))
  kern, kind, ks = kern.numpy(), kind.numpy(), ks.numpy()
  np.testing.assert_allclose(kern.sum((1, 2)), 1.0, atol=1e-5)
  assert (kern >= 0).all()
  for kk, kt, kn in zip(ks, kind, kern, strict=True):
    support = kk - 10 if (kernels.KERNEL_TYPES[kt] == "line" and kk > 15) else kk
    assert _outside(kn, support) == 0.0
  freq = np.bincount(kind, minlength=len(kernels.KERNEL_TYPES)) / n
  expected = kernels.kernel_type_probs(False)
  assert freq[kernels.KERNEL_TYPES.index("psf")] == 0.0  # no bank, no psf kernels
  # Binomial std <= sqrt(0.36 * 0.64 / 1500) = 0.0124: allow 4 sigma.
  np.testing.assert_allclose(freq, expected, atol=0.05)
  assert abs(freq[0] - expected[0]) < 0.05 and expected[0] == pytest.approx(0.35 / 0.97)


def test_kernel_noise_only_on_gaussian_families():
  n = 400
  seeds = np.stack([np.arange(n), np.full(n, 5)], 1).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: kernels.random_mixed_kernel(s, 9, (0.2, 2.2), return_type=True)).batch(n)
  kern, kind = (t.numpy() for t in next(iter(ds)))
  by_type = {}
  for kn, kt in zip(kern, kind, strict=True):
    by_type.setdefault(kernels.KERNEL_TYPES[kt], []).append(kn)
  for name in ("iso", "generalized_iso"):  # U(0.9, 1.1) noise breaks the exact symmetry
    assert any(not np.allclose(k, k.T, atol=1e-7) for k in by_type[name])
    assert all(np.allclose(k, k.T, rtol=0.25, atol=1e-6) for k in by_type[name])
  for name in ("plateau_iso", "defocus", "box"):  # noiseless: exactly symmetric
    assert all(np.allclose(k, k.T, atol=1e-7) for k in by_type[name])


def test_random_blur_kernel_sinc_probability_and_determinism():
  n = 400
  seeds = np.stack([np.arange(n), np.full(n, 2)], 1).astype(np.int32)

  def draw(s):
    return kernels.random_blur_kernel(s, 10, 0.8, (0.2, 1.0))

  kern, k, support, is_sinc = (t.numpy() for t in next(iter(
      tf.data.Dataset.from_tensor_slices(seeds).map(draw).batch(n))))
  assert abs(is_sinc.mean() - 0.8) < 0.07
  assert (support <= k).all() and (support % 2 == 1).all()
  for kn, sp in zip(kern, support, strict=True):
    assert _outside(kn, sp) == 0.0
  np.testing.assert_allclose(kern.sum((1, 2)), 1.0, atol=1e-5)
  # Same seed -> same kernel, eagerly and in the map; different seeds -> different kernels.
  again = _both(lambda s: kernels.random_blur_kernel(s, 10, 0.8, (0.2, 1.0))[0], seeds[17])
  _agree(again, kern[17])
  np.testing.assert_array_equal(_in_map(lambda s: kernels.random_blur_kernel(
      s, 10, 0.8, (0.2, 1.0))[0], seeds[17]), kern[17])
  assert len({kn.tobytes() for kn in kern[:50]}) == 50


def test_psf_and_udc_banks(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "psf.npz"
  np.savez(path, a=rng.uniform(size=(7, 5)), b=rng.uniform(size=(41, 33)))
  bank = kernels.load_psf_bank(path).numpy()
  assert bank.shape == (2, GRID, GRID)
  np.testing.assert_allclose(bank.sum((1, 2)), 1.0, rtol=1e-5)
  assert _outside(bank[0], 7) == 0.0  # small kernels are centre-padded, not resized
  assert (bank[1] > 0).sum() > 15 * 15  # large ones are area-downscaled onto the grid
  seeds = np.stack([np.arange(600), np.zeros(600)], 1).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: kernels.random_mixed_kernel(
      s, 9, (0.2, 2.2), psf_bank=bank, return_type=True)).batch(600)
  kern, kind = (t.numpy() for t in next(iter(ds)))
  is_psf = kind == kernels.KERNEL_TYPES.index("psf")
  assert 5 <= is_psf.sum() <= 40  # p = 0.03
  assert all(any(np.array_equal(k, b) for b in bank) for k in kern[is_psf])

  upath = tmp_path / "udc.npz"
  np.savez(upath, a=rng.uniform(size=(3, 9, 11)), b=rng.uniform(size=(13, 7, 3)))
  udc = kernels.load_udc_bank(upath).numpy()
  assert udc.shape == (2, 13, 11, 3)
  np.testing.assert_allclose(udc.sum((1, 2)), 1.0, rtol=1e-5)

  bad = tmp_path / "bad.npz"
  np.savez(bad, a=np.zeros((5, 5)))
  with pytest.raises(ValueError, match="sum"):
    kernels.load_psf_bank(bad)
  np.savez(bad, a=np.ones((4, 4, 4)))
  with pytest.raises(ValueError, match="UDC"):
    kernels.load_udc_bank(bad)

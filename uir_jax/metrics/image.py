"""Full-reference image metrics on [0, 1] float images (NHWC), as the reference's `test.py` computes
them (spec §8.2): PSNR and SSIM on RGB or on the BT.601 luma (`y_channel=True`, the reference's
`bgr2ycbcr(only_y=True)`), after dropping a `crop_border` frame (4 px in the reference's tests).

SSIM is the MATLAB / BasicSR form: 11 x 11 Gaussian window with sigma 1.5, statistics over the
valid region only (no padding), C1 = (0.01 L)^2, C2 = (0.03 L)^2 on a 0-255 scale, computed per
channel and averaged. The reference's tests quantise images to uint8 first (`tensor2img`); pass
`quantize=True` to do the same with [0, 1] floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# BT.601 "studio swing" luma of RGB in [0, 1], as BasicSR's bgr2ycbcr(only_y=True) for RGB order:
# Y in [16, 235] / 255.
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def rgb_to_y(images):
  """[..., 3] RGB in [0, 1] -> [..., 1] BT.601 luma in [16/255, 235/255]."""
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] != 3:
    raise ValueError(f"rgb_to_y expects RGB images [..., 3], got shape {images.shape}")
  return (images @ jnp.asarray(_Y_WEIGHTS, jnp.float32) / 255.0 + 16.0 / 255.0)[..., None]


def _prepare(name, x, y, crop_border, y_channel, quantize):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"{name}: shapes differ: {x.shape} vs {y.shape}")
  if x.ndim == 3:
    x, y = x[None], y[None]
  if x.ndim != 4:
    raise ValueError(f"{name}: expected [B, H, W, C] or [H, W, C], got {x.shape}")
  if crop_border < 0 or 2 * crop_border >= min(x.shape[1], x.shape[2]):
    raise ValueError(f"{name}: crop_border {crop_border} leaves nothing of a "
                     f"{x.shape[1]}x{x.shape[2]} image")
  if quantize:
    x, y = (jnp.round(jnp.clip(a, 0.0, 1.0) * 255.0) / 255.0 for a in (x, y))
  if crop_border:
    x = x[:, crop_border:-crop_border, crop_border:-crop_border]
    y = y[:, crop_border:-crop_border, crop_border:-crop_border]
  if y_channel:
    x, y = rgb_to_y(x), rgb_to_y(y)
  return x, y


def psnr(x, y, *, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = False) -> np.ndarray:
  """Per-image PSNR in dB of x against y ([B, H, W, C] or [H, W, C]); inf for identical images.

  `crop_border` drops that many pixels at each side first; `y_channel` compares BT.601 luma;
  `quantize` rounds both to 8 bits first (what the reference's test does).
  """
  x, y = _prepare("psnr", x, y, crop_border, y_channel, quantize)
  mse = np.asarray(jnp.mean((x - y) ** 2, axis=(1, 2, 3)), np.float64)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-((np.arange(size) - (size - 1) / 2.0) ** 2) / (2.0 * sigma**2))
  g /= g.sum()
  return np.outer(g, g)


@jax.jit
def _ssim_maps(x, y):
  """Mean SSIM per image of [B, H, W, C] images on a 0-255 scale; valid filtering."""
  c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
  b, h, w, c = x.shape
  window = jnp.asarray(_gaussian_window(), jnp.float32)[:, :, None, None]

  def blur(a):  # each channel separately: channels go to the batch axis
    a = jnp.moveaxis(a, -1, 1).reshape(b * c, h, w, 1)
    out = jax.lax.conv_general_dilated(a, window, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, c, h - 10, w - 10)

  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x**2
  var_y = blur(y * y) - mu_y**2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
      (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(ssim_map, axis=(1, 2, 3))  # mean over pixels, then over channels


def ssim(x, y, *, crop_border: int = 0, y_channel: bool = False,
         quantize: bool = False) -> np.ndarray:
  """Per-image SSIM of x against y ([B, H, W, C] or [H, W, C] in [0, 1]), MATLAB / BasicSR form.

  Images need at least 11 x 11 pixels after `crop_border`. Options as `psnr`.
  """
  x, y = _prepare("ssim", x, y, crop_border, y_channel, quantize)
  if min(x.shape[1], x.shape[2]) < 11:
    raise ValueError(f"ssim: needs at least 11x11 pixels (after crop_border), got "
                     f"{x.shape[1]}x{x.shape[2]}")
  # float64 statistics would be the reference's; float32 with exact convolutions is within ~1e-6.
  return np.asarray(_ssim_maps(x * 255.0, y * 255.0), np.float64)

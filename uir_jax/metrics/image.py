"""Full-reference image metrics on [0, 1] float images (NHWC)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def psnr(x, y, *, data_range: float = 1.0, crop_border: int = 0) -> np.ndarray:
  """Per-image PSNR in dB of x against y ([B, H, W, C] or [H, W, C]); inf for identical images.

  `crop_border` drops that many pixels at each side first (the reference's test.py crops 4 px).
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"psnr: shapes differ: {x.shape} vs {y.shape}")
  if x.ndim == 3:
    x, y = x[None], y[None]
  if x.ndim != 4:
    raise ValueError(f"psnr: expected [B, H, W, C] or [H, W, C], got {x.shape}")
  if crop_border:
    x = x[:, crop_border:-crop_border, crop_border:-crop_border]
    y = y[:, crop_border:-crop_border, crop_border:-crop_border]
  mse = np.asarray(jnp.mean((x - y) ** 2, axis=(1, 2, 3)), np.float64)
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range**2 / mse)

"""Photos in and out: any image file -> float32 RGB in [0, 1], and [0, 1] floats -> uint8.

No TensorFlow and no model code, so the CLI, evaluation and trainers share one reader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

Array = jax.Array


def to_uint8(images: Array | np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 with clamp and round (the reference's `tensor2img`)."""
  return np.asarray(jnp.round(jnp.clip(jnp.asarray(images), 0.0, 1.0) * 255.0)).astype(np.uint8)


def read_rgb(path: str) -> np.ndarray:
  """An image file as float32 RGB [H, W, 3] in [0, 1] (gray, palette, RGBA and 16-bit converted)."""
  with Image.open(path) as img:
    if img.mode.startswith("I"):  # 16-bit gray ("I;16*", or "I" holding 16-bit values)
      arr = np.asarray(img, np.float32)
      scale = 255.0 if img.mode == "I" and arr.max() <= 255 else 65535.0
      return np.repeat(np.clip(arr / scale, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), np.float32) / 255.0

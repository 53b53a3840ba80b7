"""CLIP image preprocessing in JAX, matching open_clip's PIL/torchvision eval transform (spec §3.4).

`clip_preprocess` = `(x*255).astype(uint8)` -> PIL bicubic resize of the shortest side to `size`
-> torchvision CenterCrop -> /255 -> OpenAI mean/std. The resize reproduces Pillow's `Resample.c`
for 8-bit images exactly: Keys cubic (a = -0.5) with its support widened by the downscale factor
(antialiasing), weights normalised per output pixel then quantised to 22-bit fixed point, two
separable passes, each rounded and clamped to uint8. Pillow < 13 always runs the horizontal pass
first; Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
pixels as the width (`pass_order`; for CLIP's shortest-side resize only images taller than 2x their
width are affected, by a few levels). Resampling is a pair of integer weight matrices built with
numpy from the static shapes at trace time and applied with int32 einsums, so the result is
bit-exact and the whole transform is jittable.

Attributes:
  OPENAI_MEAN, OPENAI_STD: per-channel RGB statistics of OpenAI CLIP's training images.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's fixed-point format for 8-bit resampling: 32 - 8 (pixel) - 2 (headroom for the negative
# lobes) fractional bits.
_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys cubic convolution kernel (Pillow's BICUBIC, support 2)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """Pillow's fixed-point bicubic weights as a dense int32 [out_size, in_size] matrix.

  Mirrors `precompute_coeffs` + `normalize_coeffs_8bpc` in Pillow's Resample.c for the full-image
  box: centre of output pixel i is (i + 0.5) * scale in input coordinates; when shrinking the
  kernel is stretched by `scale` (antialiasing); taps are clipped to the image and renormalised.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    # C's (int) cast truncates toward zero; the clamp to 0 makes that equal to floor here.
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
    total = taps.sum()
    weights[i, lo:hi] = taps / total if total != 0.0 else taps
  # Round half away from zero, as Pillow's (int)(w * 2^22 +/- 0.5).
  fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
  return fixed.astype(np.int32)


def _resample_axis(x: jnp.ndarray, in_size: int, out_size: int, axis: int) -> jnp.ndarray:
  """One Pillow pass along H (axis=1) or W (axis=2) of uint8-valued int32 NHWC -> int32 NHWC."""
  if in_size == out_size:
    return x  # Pillow skips the pass; the bicubic identity would be exact anyway.
  w = jnp.asarray(pil_bicubic_weights(in_size, out_size))
  spec = "bhwc,oh->bowc" if axis == 1 else "bhwc,ow->bhoc"
  # Exact integer arithmetic: |taps| sum to < 1.5, so 255 * 1.5 * 2^22 fits int32 with room.
  acc = jnp.einsum(spec, x, w, preferred_element_type=jnp.int32)
  # Pillow starts the accumulator at 0.5 (in fixed point), shifts, and clamps to [0, 255].
  acc = (acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS
  return jnp.clip(acc, 0, 255)


def to_uint8(images: jnp.ndarray) -> jnp.ndarray:
  """Float [0, 1] -> uint8 by truncation, like numpy's `(x*255).astype(np.uint8)` (spec §3.4)."""
  return jnp.clip(jnp.floor(jnp.asarray(images, jnp.float32) * 255.0), 0, 255).astype(jnp.uint8)


PASS_ORDERS = ("pillow", "horizontal", "vertical")


def vertical_first(h: int, w: int, out_h: int, out_w: int, pass_order: str = "pillow") -> bool:
  """Whether the vertical pass runs first.

  "pillow": Pillow >= 13's rule (read from its compiled Resample.c, checked on hundreds of sizes):
  vertical first iff the height loses more than twice as many pixels as the width.
  "horizontal": Pillow <= 12 (and the DA-CLIP authors' environment), always horizontal first.
  """
  if pass_order not in PASS_ORDERS:
    raise ValueError(f"pass_order must be one of {PASS_ORDERS}, got {pass_order!r}")
  if pass_order == "pillow":
    return h - out_h > 0 and h - out_h > 2 * (w - out_w)
  return pass_order == "vertical"


def resize_bicubic_pil(images: jnp.ndarray, out_h: int, out_w: int, *,
                       pass_order: str = "pillow") -> jnp.ndarray:
  """Pillow-exact antialiased bicubic resize of uint8-valued images.

  Args:
    images: [B, H, W, C] or [H, W, C], uint8 or integer-valued (floats are truncated to uint8
      first, see `to_uint8`, so pass [0, 1] floats only through that path deliberately).
    out_h, out_w: output size (static ints).
    pass_order: "pillow" (Pillow >= 13), "horizontal" (Pillow <= 12) or "vertical".

  Returns:
    uint8 array [B, out_h, out_w, C] (or [out_h, out_w, C]) equal to PIL's
    `Image.resize((out_w, out_h), Image.BICUBIC)` per image and channel.
  """
  images = jnp.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f"resize_bicubic_pil expects [B,H,W,C] or [H,W,C], got shape {images.shape}")
  if int(out_h) < 1 or int(out_w) < 1:
    raise ValueError(f"output size must be >= 1, got {out_h}x{out_w}")
  squeeze = images.ndim == 3
  x = images[None] if squeeze else images
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = to_uint8(x)
  x = x.astype(jnp.int32)
  _, h, w, _ = x.shape
  # Each pass rounds to uint8, so the order changes the result; follow Pillow's choice.
  if vertical_first(h, w, int(out_h), int(out_w), pass_order):
    x = _resample_axis(x, h, int(out_h), axis=1)
    x = _resample_axis(x, w, int(out_w), axis=2)
  else:
    x = _resample_axis(x, w, int(out_w), axis=2)
    x = _resample_axis(x, h, int(out_h), axis=1)
  x = x.astype(jnp.uint8)
  return x[0] if squeeze else x


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
  """torchvision `Resize(size)` output (h, w): shortest side to `size`, long side truncated."""
  if h <= w:
    return size, int(size * w / h)
  return int(size * h / w), size


def center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
  """torchvision CenterCrop's (top, left); Python's round() rounds halves to even."""
  return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def clip_preprocess(images: jnp.ndarray, size: int = 224, *,
                    pass_order: str = "pillow") -> jnp.ndarray:
  """open_clip's eval transform for float images; jittable (shapes are static).

  Args:
    images: float [B, H, W, 3] in [0, 1] (any size, the same within the batch).
    size: output side (224 for all released DA-CLIP models).
    pass_order: resize pass order, see `resize_bicubic_pil` ("horizontal" for Pillow <= 12).

  Returns:
    float32 [B, size, size, 3], normalised with OPENAI_MEAN / OPENAI_STD.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"clip_preprocess expects float [B,H,W,3] images, got shape {images.shape}")
  if int(size) < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  _, h, w, _ = images.shape
  new_h, new_w = shortest_side_size(h, w, int(size))
  x = resize_bicubic_pil(to_uint8(images), new_h, new_w, pass_order=pass_order)
  top, left = center_crop_offsets(new_h, new_w, int(size))
  x = x[:, top:top + size, left:left + size, :].astype(jnp.float32) / 255.0
  mean = jnp.asarray(OPENAI_MEAN, jnp.float32)
  std = jnp.asarray(OPENAI_STD, jnp.float32)
  return (x - mean) / std



# ---- DA-CLIP's views of a photo ---------------------------------------------------------------
# What a DA-CLIP-conditioned model read in training is the input pipeline's CLIP view of the LQ
# (`data.clip_view`, `data.clip_size`) or, with `daclip.windows`, full-resolution windows of it.
# These are the same views of a whole photo, in jnp only, so restoring and the export reader (no
# model code) compute them alike.

CLIP_VIEWS = ("resize", "crop", "windows")


def _normalize_8bit(images: jnp.ndarray) -> jnp.ndarray:
  x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0) / 255.0
  return (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)


def resize_view(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """CLIP views [B, s, s, 3] at another CLIP input size (unchanged at `size`): the resize with
  antialiasing the trainers apply when the pipeline's view is not the CLIP's size."""
  import jax

  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, images.shape[:1] + (size, size, 3), "bilinear", antialias=True)


def crop_view(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """Photos [B, H, W, 3] in [0, 1] -> the centre size x size crop at full resolution, 8-bit
  rounded and OpenAI-normalised (the pipeline's `clip_view="crop"`)."""
  h, w = images.shape[1:3]
  if min(h, w) < size:
    raise ValueError(f"the CLIP view 'crop' needs images of at least {size} pixels, got {h}x{w}")
  top, left = center_crop_offsets(h, w, size)
  return _normalize_8bit(images[:, top:top + size, left:left + size])


def window_views(lq: jnp.ndarray, size: int) -> jnp.ndarray:
  """LQ [B, H, W, 3] in [0, 1] -> [B, n, size, size, 3]: full-resolution size² windows tiling it
  (per axis ceil((H - size) / size) + 1 evenly spaced offsets from 0 to H - size: 2 x 2 on a 48²
  patch, 3 x 3 on 96² for size 32), 8-bit rounded and OpenAI-normalised like the pipeline's
  `clip_view="crop"` (whose centre window is one of them only when n is odd)."""
  h, w = lq.shape[1:3]
  if min(h, w) < size:
    raise ValueError(f"daclip.windows needs images of at least the CLIP's {size} pixels, got "
                     f"{h}x{w}")

  def offsets(n):
    count = -(-(n - size) // size) + 1
    return [round(i * (n - size) / max(count - 1, 1)) for i in range(count)]

  x = _normalize_8bit(lq)
  views = [x[:, top:top + size, left:left + size] for top in offsets(h) for left in offsets(w)]
  return jnp.stack(views, axis=1)


def photo_views(images: jnp.ndarray, view: str, size: int, model_size: int) -> jnp.ndarray:
  """Photos [B, H, W, 3] in [0, 1] -> the DA-CLIP views a run read, [B, n, model_size,
  model_size, 3] (n = 1 but for "windows"), normalised.

  view: "resize" (`clip_preprocess` at `size`: the reference's CLIP transform), "crop" (the
  full-resolution centre `crop_view`) or "windows" (`window_views` at the CLIP's `model_size`).
  `size`: the pipeline's `data.clip_size`; views of another size are resized to `model_size`.
  """
  images = jnp.asarray(images, jnp.float32)
  if view == "windows":
    return window_views(images, model_size)
  if view == "resize":
    x = clip_preprocess(images, size)
  elif view == "crop":
    x = crop_view(images, size)
  else:
    raise ValueError(f"CLIP view must be one of {CLIP_VIEWS}, got {view!r}")
  return resize_view(x, model_size)[:, None]

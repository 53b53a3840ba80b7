"""Guidance images for guided restoration (TextualDegRemoval): which file goes with which photo,
and how a training crop of the photo finds its matching guidance region.

Files. A guidance folder holds one image per photo under the photo's key: its path relative to
the photo folder without the extension (`GOPR0372_07_00/000047` for
`blur/GOPR0372_07_00/000047.png`; `<degradation>/<name>` in the ten-task layout), any image
extension. `index_guidance` lists a folder; `match_guidance` looks every photo up, and a photo
without a decodable guidance image is skipped and counted ("no_guidance", one log line with the
count), never fatal. A split's guidance lives in `guidance_root/<split>/` if that folder exists,
else in `guidance_root` itself (as the photo roots).

The crop rule. The guidance image covers the largest centred region of the photo that has the
guidance's aspect ratio (`covered_region`): the whole photo when both have the same shape (a
guidance of the photo's size is the photo's own frame), the centre square for a square guidance
(the released code's guidance: the photo's centre square, generated at 512², spec §1.6, D6).
A crop box of the photo is then drawn inside that region (`crop_offsets`; centred for
evaluation), and the guidance crop is the same box mapped into guidance pixels and resampled to
the crop's size (`sample_region`: bilinear at the crop pixels' centres, edges replicated), so
LQ, GT and guidance crops line up pixel for pixel and get the same flips afterwards. A guidance
of exactly the photo's size gives the plain same-box crop (no resampling); one more than 1.5x
larger than the region it covers is first downsized to it (antialiased), so a large guidance is
not aliased. Photo pixels outside the covered region (the side strips of a wide photo with a
square guidance) are never cropped for training: they have no guidance.

This differs from the released trainer on purpose: it loads the whole 512² guidance and picks one
of four 384² windows with a DINOv2 similarity (spec §1.7 (h)); a geometric rule needs no second
network and gives every crop the guidance of its own content.

Synthetic guidance (`synthetic_guidance`, for tests and `:tiny` configs, where no generated
guidance exists): the GT's centre square downsized to a fixed side — the released guidance's
geometry, with less detail than the photo, as a stand-in for a generated clean image.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import tensorflow as tf
from absl import logging

from input_pipeline import image_io

# A guidance this much larger than the region it covers is downsized before sampling.
_DOWNSIZE_ABOVE = 1.5


# --- Files. ---------------------------------------------------------------------------------------


def photo_key(path: str, folder: str) -> str:
  """`path` relative to `folder`, without the extension, with "/" separators."""
  rel = os.path.splitext(os.path.relpath(path, folder))[0]
  return rel.replace(os.sep, "/")


def split_folder(root: str, split: str) -> str:
  """`root/split` if that folder exists, else `root` (a guidance root may or may not be split)."""
  sub = os.path.join(root, split)
  return sub if split and os.path.isdir(sub) else root


def index_guidance(folder: str) -> dict[str, str]:
  """{key: path} of the images under `folder` (recursive); two files of one key are an error."""
  if not os.path.isdir(folder):
    raise ValueError(f"guidance folder {folder!r} does not exist or is not a directory")
  out: dict[str, str] = {}
  for path in image_io.list_images(folder):
    key = photo_key(path, folder)
    if key in out:
      raise ValueError(f"guidance folder {folder}: two images for {key!r}: {out[key]} and {path}")
    out[key] = path
  return out


def match_guidance(keys: Sequence[str], folder: str, *, name: str, validate: bool = True
                   ) -> tuple[list[str | None], collections.Counter]:
  """The guidance path of each photo key (None: none, or undecodable) and the counts
  {"guidance": found, "no_guidance": skipped}; one log line when photos are skipped."""
  table = index_guidance(folder)
  paths = [table.get(k) for k in keys]
  if validate:
    found = sorted({p for p in paths if p is not None})
    scan = image_io.scan_images(found, name=f"{name} guidance", log=False)
    bad = set(scan.bad_paths)
    paths = [None if p in bad else p for p in paths]
  counts = collections.Counter(guidance=sum(p is not None for p in paths),
                               no_guidance=sum(p is None for p in paths))
  if counts["no_guidance"]:
    first = keys[paths.index(None)]
    logging.warning("%s: skipped %d of %d photo(s) without a (decodable) guidance image in %s, "
                    "e.g. %r", name, counts["no_guidance"], len(keys), folder, first)
  return paths, counts


# --- The crop rule (graph ops). -------------------------------------------------------------------


def covered_region(h, w, hg, wg):
  """(top, left, height, width), float32, of the photo region an hg x wg guidance covers: the
  largest centred region of the h x w photo with the guidance's aspect ratio."""
  h, w, hg, wg = (tf.cast(v, tf.float32) for v in (h, w, hg, wg))
  wider = w * hg > wg * h  # the photo is wider than the guidance: full height, part of the width
  rh = tf.where(wider, h, w * hg / wg)
  rw = tf.where(wider, h * wg / hg, w)
  return (h - rh) / 2.0, (w - rw) / 2.0, rh, rw


def _axis_offset(start, length, size: int, limit, seed):
  """An int32 offset of a `size` window inside [start, start + length) (clamped to
  [0, limit - size]): uniform with `seed`, centred without."""
  lo = tf.cast(tf.math.ceil(start - 1e-4), tf.int32)
  hi = tf.cast(tf.math.floor(start + length + 1e-4), tf.int32) - size
  lo = tf.clip_by_value(lo, 0, limit - size)
  hi = tf.clip_by_value(hi, lo, limit - size)
  if seed is None:
    return (lo + hi) // 2
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)


def crop_offsets(photo_hw, guidance_hw, size: int, *, padded_hw=None, seed=None):
  """(y, x) of a size x size crop of the photo inside the region the guidance covers (random
  with an int32[2] `seed`, centred without). `padded_hw`: the photo's size after padding to the
  crop (defaults to `photo_hw`)."""
  h, w = photo_hw
  ph, pw = padded_hw if padded_hw is not None else photo_hw
  top, left, rh, rw = covered_region(h, w, *guidance_hw)
  seeds = tf.random.experimental.stateless_split(seed, 2) if seed is not None else (None, None)
  return (_axis_offset(top, rh, size, ph, seeds[0]), _axis_offset(left, rw, size, pw, seeds[1]))


def _lerp_gather(image, coords, axis: int):
  """Linear interpolation of `image` along `axis` at float positions (pixel-index units, clamped
  to the image: edge pixels replicated)."""
  n = tf.shape(image)[axis]
  coords = tf.clip_by_value(coords, 0.0, tf.cast(n - 1, tf.float32))
  i0 = tf.cast(tf.floor(coords), tf.int32)
  i1 = tf.minimum(i0 + 1, n - 1)
  t = coords - tf.cast(i0, tf.float32)
  t = tf.reshape(t, [-1, 1, 1] if axis == 0 else [1, -1, 1])
  a, b = tf.gather(image, i0, axis=axis), tf.gather(image, i1, axis=axis)
  return a + t * (b - a)


def sample_region(guidance, photo_hw, y, x, size: int):
  """The guidance crop matching the photo crop [y, y + size) x [x, x + size): the box mapped into
  guidance pixels, sampled bilinearly at the crop pixels' centres -> float32 [size, size, C]."""
  guidance = tf.convert_to_tensor(guidance, tf.float32)
  h, w = photo_hw
  hg, wg = tf.shape(guidance)[0], tf.shape(guidance)[1]
  top, left, rh, rw = covered_region(h, w, hg, wg)
  too_big = tf.logical_or(tf.cast(hg, tf.float32) > _DOWNSIZE_ABOVE * rh,
                          tf.cast(wg, tf.float32) > _DOWNSIZE_ABOVE * rw)
  target = tf.cast(tf.maximum(tf.round(tf.stack([rh, rw])), 1.0), tf.int32)
  guidance = tf.cond(too_big,
                     lambda: tf.image.resize(guidance, target, antialias=True),
                     lambda: guidance)
  hg, wg = tf.shape(guidance)[0], tf.shape(guidance)[1]
  sy, sx = tf.cast(hg, tf.float32) / rh, tf.cast(wg, tf.float32) / rw
  centres = tf.range(size, dtype=tf.float32) + 0.5
  ys = (tf.cast(y, tf.float32) + centres - top) * sy - 0.5
  xs = (tf.cast(x, tf.float32) + centres - left) * sx - 0.5
  return _lerp_gather(_lerp_gather(guidance, ys, 0), xs, 1)


def synthetic_guidance(gt, side: int):
  """A stand-in guidance of a GT photo: its centre square, downsized (antialiased) to side²."""
  gt = tf.convert_to_tensor(gt, tf.float32)
  h, w = tf.shape(gt)[0], tf.shape(gt)[1]
  s = tf.minimum(h, w)
  square = gt[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return tf.clip_by_value(tf.image.resize(square, [side, side], antialias=True), 0.0, 1.0)

"""Robust image decoding for files on disk: one validation pass, then graph-only decoding.

A long training run must never die on one bad file, and a resumed run must see exactly the
stream it would have seen (batch N is a pure function of the file list, the seed and N). Dropping
a bad file *inside* the stream (`ignore_errors` at read time) would shift every later example and
break that, so bad files are found once, before the stream is built:

* `scan_images` decodes every file with TensorFlow's own decoders in a parallel tf.data pass, so a
  file that passes is exactly one the training pipeline can decode. Unreadable, empty, truncated
  or unknown-format files drop out of the pass (`ignore_errors`) and are reported as "corrupt".
  The pass also records each file's size, channel count and bit depth, and counts the files it
  will convert: "gray" (1 or 2 channels -> RGB), "rgba" (alpha dropped, as cv2.IMREAD_COLOR and
  the reference's `read_img` do), "16bit" (16-bit PNG -> float [0, 1] at full precision; the
  reference divided by 255) and "small" (a side shorter than the crop). The counts are logged with
  absl logging and returned, e.g. {"ok": 10, "corrupt": 2, "gray": 1, "rgba": 1, "16bit": 1,
  "small": 1}.
* `decode_image` / `read_image` turn bytes / a path into float32 [H, W, 3] RGB in [0, 1] with graph
  ops only (PNG through `decode_png(dtype=uint16)`, which keeps 16-bit precision and scales 8-bit
  exactly; JPEG, BMP, GIF (first frame) and WebP through `decode_image(dtype=uint8)`).
* Small images are reflect-padded up to the crop (`pad_to_min_size`) rather than skipped, so a
  dataset of small photos still trains; the padding is whole-period mirror (reflect-101, cv2's
  default border) and works for any size, even when the pad exceeds the image.

Pipelines keep `ignore_errors` at read time only as a last-resort net for files that change
after the scan.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

# File listing is shared with the TF-free evaluation (uir_jax.data_layout). TF sniffs the real
# format from the bytes, so a JPEG saved as .png still decodes.
from uir_jax.data_layout import IMAGE_EXTENSIONS, list_images  # noqa: F401 (re-exported)

_PNG_MAGIC = b"\x89PNG"
# Keys every summary carries, in the order they are logged.
COUNT_KEYS = ("ok", "corrupt", "gray", "rgba", "16bit", "small")


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the scan learned about one decodable file."""

  path: str
  height: int
  width: int
  channels: int  # As stored: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA.
  bit_depth: int  # 8 or 16.


@dataclasses.dataclass
class ScanResult:
  """`infos[i]` describes `paths[i]`, or is None when that file cannot be decoded."""

  paths: list[str]
  infos: list[ImageInfo | None]
  counts: collections.Counter

  @property
  def good_paths(self) -> list[str]:
    return [info.path for info in self.infos if info is not None]

  @property
  def bad_paths(self) -> list[str]:
    return [p for p, info in zip(self.paths, self.infos, strict=True) if info is None]


# --- Graph-side decoding. -------------------------------------------------------------------------


def _decode_native(contents: tf.Tensor) -> tf.Tensor:
  """Bytes -> float32 [H, W, C] in [0, 1] with the file's own channel count C in 1..4."""
  is_png = tf.equal(tf.strings.substr(contents, 0, 4), _PNG_MAGIC)

  def png():
    # uint16 keeps 16-bit PNGs exact and scales 8-bit ones by 257, so /65535 is exact for both.
    return tf.cast(tf.io.decode_png(contents, channels=0, dtype=tf.uint16), tf.float32) / 65535.0

  def other():
    # WebP only decodes to uint8; JPEG, BMP and GIF are 8-bit anyway.
    image = tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False)
    return tf.cast(image, tf.float32) / 255.0

  return tf.cond(is_png, png, other)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """[H, W, C] with C in 1..4 -> [H, W, 3]: gray (and gray+alpha) tiled, alpha dropped."""
  channels = tf.shape(image)[-1]
  rgb = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(rgb, [None, None, 3])


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """Encoded bytes (PNG/JPEG/BMP/GIF/WebP) -> float32 [H, W, 3] RGB in [0, 1]."""
  return to_rgb(_decode_native(contents))


def read_image(path: tf.Tensor | str) -> tf.Tensor:
  """A file path -> float32 [H, W, 3] RGB in [0, 1] (graph op; use inside `Dataset.map`)."""
  return decode_image(tf.io.read_file(path))


def read_image_numpy(path: str) -> np.ndarray:
  """Eager convenience: a path -> numpy float32 [H, W, 3] in [0, 1]."""
  return read_image(tf.constant(path)).numpy()


def _reflect_indices(n: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Indices 0..size-1 into an axis of length n, mirrored (reflect-101) as often as needed."""
  i = tf.range(size)
  period = tf.maximum(2 * (n - 1), 1)
  j = tf.math.floormod(i, period)
  return tf.where(j >= n, period - j, j) * tf.cast(n > 1, tf.int32)


def pad_to_min_size(images: tf.Tensor | Sequence[tf.Tensor], size: int):
  """Reflect-pads [H, W, C] image(s) at the bottom/right so both sides are at least `size`.

  Several images (an LQ/GT pair of equal size) get the same padding. Images already large enough
  pass through unchanged.
  """
  single = isinstance(images, tf.Tensor)
  images = [images] if single else list(images)
  h, w = tf.shape(images[0])[0], tf.shape(images[0])[1]

  def pad():
    rows = _reflect_indices(h, tf.maximum(h, size))
    cols = _reflect_indices(w, tf.maximum(w, size))
    return [tf.gather(tf.gather(x, rows, axis=0), cols, axis=1) for x in images]

  # The gathers copy the whole image (a few ms for a photo): only when it is too small.
  out = tf.cond(tf.logical_and(h >= size, w >= size), lambda: [tf.identity(x) for x in images],
                pad)
  out = [tf.ensure_shape(y, [None, None, x.shape[-1]]) for x, y in zip(images, out, strict=True)]
  return out[0] if single else out


# --- The validation pass. -------------------------------------------------------------------------


def _probe(index, path):
  contents = tf.io.read_file(path)
  image = _decode_native(contents)
  shape = tf.shape(image)
  # Bit depth: byte 24 of a PNG (inside IHDR); everything else TF decodes is 8-bit.
  is_png = tf.equal(tf.strings.substr(contents, 0, 4), _PNG_MAGIC)
  depth = tf.cond(is_png,
                  lambda: tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 24, 1), tf.uint8)[0],
                                  tf.int32),
                  lambda: tf.constant(8))
  return index, shape[0], shape[1], shape[2], depth


def scan_images(paths: Iterable[str], *, min_size: int = 0, name: str = "images",
                log: bool = True) -> ScanResult:
  """Decodes every file once (in parallel, TF decoders) and sorts good from bad, with counts.

  Args:
    paths: image file paths.
    min_size: crop size; files with a side below it are counted as "small" (they stay usable:
      pipelines reflect-pad them).
    name: what to call this set in the log line.
    log: log the summary with absl logging (INFO; WARNING when files were skipped).
  Returns:
    ScanResult with per-file ImageInfo (None = undecodable, skipped) and the counts.
  """
  paths = [os.fspath(p) for p in paths]
  infos: list[ImageInfo | None] = [None] * len(paths)
  if paths:
    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64),
                                             tf.constant(paths)))
    probe = tf.autograph.experimental.do_not_convert(_probe)
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().prefetch(tf.data.AUTOTUNE)
    for index, h, w, c, depth in ds.as_numpy_iterator():
      infos[int(index)] = ImageInfo(paths[int(index)], int(h), int(w), int(c), int(depth))
  counts = collections.Counter({k: 0 for k in COUNT_KEYS})
  for info in infos:
    if info is None:
      counts["corrupt"] += 1
      continue
    counts["ok"] += 1
    counts["gray"] += info.channels < 3
    counts["rgba"] += info.channels == 4
    counts["16bit"] += info.bit_depth == 16
    counts["small"] += min(info.height, info.width) < min_size
  result = ScanResult(paths, infos, counts)
  if log:
    log_summary(name, counts, bad_paths=result.bad_paths)
  return result


def log_summary(name: str, counts: collections.Counter, bad_paths: Sequence[str] = ()) -> None:
  """One log line with the counts; skipped files are named (the first few) at WARNING level."""
  summary = {k: int(counts[k]) for k in (*COUNT_KEYS, *sorted(set(counts) - set(COUNT_KEYS)))}
  if bad_paths:
    shown = ", ".join(bad_paths[:5]) + (" ..." if len(bad_paths) > 5 else "")
    logging.warning("%s: %s; skipped %d undecodable file(s): %s", name, summary, len(bad_paths),
                    shown)
  else:
    logging.info("%s: %s", name, summary)

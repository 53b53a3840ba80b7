"""Tiled evaluation of a denoiser: bounded memory at any image size, no seams.

    eps_fn, eps_args = make_eps_fn(unet, text_context=degradation, image_context=content)
    out = sde.sample(tiled_eps_fn(eps_fn, 512, 64), lq, key, eps_args=eps_args)

Works on any `eps_fn(x, mu, t, *eps_args)` (NHWC; `uir_jax.denoiser.make_eps_fn` makes one from a
network). Shared by `restore.Restorer`, the exporter and the benchmarks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of length `tile` covering [0, size), `overlap` apart at least.

  Stride tile - overlap; the last tile is moved back to end at the border (so it may overlap its
  neighbour by more). size <= tile gives one tile at 0 (the caller shrinks it to the image).
  """
  if tile < 1 or not 0 <= overlap < tile:
    raise ValueError(f"need tile >= 1 and 0 <= tile_overlap < tile, got tile={tile}, "
                     f"tile_overlap={overlap}")
  if size <= tile:
    return [0]
  starts = list(range(0, size - tile, tile - overlap))
  return starts + [size - tile]


def _tile_window(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
  """1-D blending weights of one tile: a linear ramp (0, 1] across `overlap` pixels on each side
  that meets another tile, 1 on sides at the image border and in the middle."""
  w = np.ones(length, np.float32)
  if overlap > 0:
    ramp = (np.arange(length, dtype=np.float32) + 0.5) / overlap
    if not at_start:
      w = np.minimum(w, ramp)
    if not at_end:
      w = np.minimum(w, ramp[::-1])
  return w


def check_tiling(tile: int, overlap: int, tile_batch: int) -> None:
  """Raises ValueError for tiling settings `tiled_eps_fn` would reject (to fail before sampling)."""
  tile_starts(tile + 1, tile, overlap)  # validates tile and overlap
  if tile_batch < 1:
    raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")


@functools.cache
def tiled_eps_fn(eps_fn: Callable[..., Array], tile: int, overlap: int = 32,
                 tile_batch: int = 1) -> Callable[..., Array]:
  """`eps_fn` evaluated on overlapping tiles of at most tile x tile pixels and blended.

  Same signature as `eps_fn` (`(x, mu, t, *eps_args)`, NHWC), so it drops into `IRSDE.sample`.
  Each tile sees its own crop of x and mu with the same t and the same (global) conditioning;
  outputs are averaged with weights that ramp linearly over the overlap, so every pixel is a convex
  combination of the tiles covering it and tile borders leave no seams (the sampler re-mixes the
  tiles at every step). Tiles run one after another (`jax.lax.map`, `tile_batch` at a time), so
  peak memory is that of a tile_batch x tile x tile forward pass whatever the image size. Images
  that fit in one tile call `eps_fn` directly: identical results to the untiled path.

  Cached per (eps_fn, tile, overlap, tile_batch): one function object, one compilation per shape.
  """
  check_tiling(tile, overlap, tile_batch)

  def tiled(x, mu, t, *eps_args):
    _, h, w, _ = x.shape
    if h <= tile and w <= tile:
      return eps_fn(x, mu, t, *eps_args)
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    boxes = [(y, x0) for y in ys for x0 in xs]
    crop = lambda a: jnp.stack([a[:, y:y + th, x0:x0 + tw] for y, x0 in boxes])
    outs = jax.lax.map(lambda xm: eps_fn(xm[0], xm[1], t, *eps_args), (crop(x), crop(mu)),
                       batch_size=tile_batch)  # [N, B, th, tw, C]
    total = jnp.zeros(outs.shape[1:2] + (h, w) + outs.shape[-1:], outs.dtype)
    weight = np.zeros((h, w), np.float32)
    for n, (y, x0) in enumerate(boxes):
      win = np.outer(_tile_window(th, overlap, y == 0, y + th == h),
                     _tile_window(tw, overlap, x0 == 0, x0 + tw == w))
      weight[y:y + th, x0:x0 + tw] += win
      total = total.at[:, y:y + th, x0:x0 + tw].add(outs[n] * win[None, :, :, None])
    return total / jnp.asarray(weight)[None, :, :, None]

  return tiled

"""Restoration glue: DA-CLIP embeddings + a conditional denoiser + the IR-SDE sampler.

    restorer = Restorer.from_checkpoints("daclip_ViT-B-32.pt", "universal-ir.pth")
    out = restorer(lq_images, jax.random.key(0))          # [B, H, W, 3] floats in [0, 1]
    big = Restorer.from_checkpoints(..., tile=512, tile_overlap=64)   # bounded memory, any size

Design: modules are split once (`nnx.split`) and the pure functions below are jitted over
(graphdef, state); the sampler's denoiser is one cached function object per graphdef, so repeated
calls with the same image shape never recompile, and the weights travel as arguments instead of
being baked into the program as constants.

Large images: `tiled_eps_fn` evaluates the denoiser on overlapping tiles at every sampler step and
blends them (see its docstring); the sampler, its noise and the DA-CLIP conditioning stay global.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from uir_jax.sde import IRSDE

Array = jax.Array


@functools.cache
def denoiser_eps_fn(graphdef: Any) -> Callable[..., Array]:
  """An `eps_fn(x, mu, t, state, text_context, image_context)` for `IRSDE.sample`.

  One function object per model graph (cached), so `IRSDE.sample` compiles once per shape.
  `text_context` is DA-CLIP's degradation embedding and `image_context` its content embedding
  (either may be None, matching the model's `use_degra_context` / `use_image_context`).
  `state` is an `nnx.State` or a tuple of states (e.g. (params, rest) from `nnx.split`).
  """

  def eps_fn(x, mu, t, state, text_context, image_context):
    states = state if isinstance(state, tuple) else (state,)
    model = nnx.merge(graphdef, *states)
    return model(x, mu, t, text_context=text_context, image_context=image_context)

  return eps_fn


def make_eps_fn(model: nnx.Module, *, text_context: Array | None = None,
                image_context: Array | None = None) -> tuple[Callable[..., Array], tuple]:
  """(eps_fn, eps_args) ready for `IRSDE.sample(eps_fn, mu, key, eps_args=eps_args)`."""
  graphdef, state = nnx.split(model)
  return denoiser_eps_fn(graphdef), (state, text_context, image_context)


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


def _check_tiling(tile: int, overlap: int, tile_batch: int) -> None:
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
  _check_tiling(tile, overlap, tile_batch)

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


def load_denoiser(path_or_state_dict: Any) -> nnx.Module:
  """A ConditionalUNet or ConditionalNAFNet from a PyTorch state_dict (file or mapping)."""
  from uir_jax.convert import nafnet, unet
  from uir_jax.convert.common import ConversionError, read_state_dict

  sd = read_state_dict(path_or_state_dict)
  keys = set(nafnet.unwrap_state_dict(sd))
  if "intro.weight" in keys:
    if "time_mlp.1.weight" not in keys:
      raise ConversionError("this NAFNet checkpoint has no time embedding: it is a direct "
                            "regression model, not an IR-SDE denoiser (use load_nafnet and call "
                            "it on the degraded image)")
    return nafnet.load_nafnet(sd)
  return unet.load_unet(sd)


@functools.cache
def _embed_fn(graphdef: Any) -> Callable[..., tuple[Array, Array]]:
  from uir_jax.preprocess import clip_preprocess

  @jax.jit
  def embed(state, images):
    model = nnx.merge(graphdef, state)
    size = model.config.image_size  # 224 for the released models
    content, degradation = model.encode_image(clip_preprocess(images, size), control=True)
    return content.astype(jnp.float32), degradation.astype(jnp.float32)

  return embed


def daclip_embeddings(daclip: nnx.Module, images: Array) -> tuple[Array, Array]:
  """(content, degradation) embeddings of LQ images [B, H, W, 3] in [0, 1], unnormalised.

  Applies the CLIP transform (uint8 truncation, PIL-exact bicubic resize of the shortest side to
  the model's image size (224), centre crop, OpenAI normalisation) like the reference's
  `clip_transform` (spec §10 step 2).
  """
  graphdef, state = nnx.split(daclip)
  return _embed_fn(graphdef)(state, jnp.asarray(images, jnp.float32))


class Restorer:
  """LQ images -> restored images with DA-CLIP guidance and IR-SDE sampling.

  Args:
    unet: the conditional denoiser (`ConditionalUNet` or `ConditionalNAFNet`).
    daclip: DA-CLIP model giving the conditioning embeddings; None for unconditional models.
    sde: the IR-SDE (default: the released models' max_sigma 50, T 100, cosine, eps 0.005).
    mode: "posterior" (default, like the reference app), "sde" or "ode".
    num_steps: network evaluations (< T only for "posterior"; fewer steps = faster).
    tile: if set, the denoiser runs on tiles of at most tile x tile pixels (`tiled_eps_fn`):
      bounded memory for any image size; images that fit in one tile are unaffected.
    tile_overlap: pixels shared by neighbouring tiles (blended with linear ramps).
    tile_batch: tiles per denoiser call (more = faster on an accelerator, more memory).
    pad_multiple: if > 1, images are reflect-padded on the right/bottom to a multiple of this
      before sampling and cropped back after (the U-Net itself pads to a multiple of 8 this way),
      so photos of many sizes share a few compiled samplers instead of one compilation each;
      pixels near the right/bottom border then differ slightly from an exact-size run.
  """

  def __init__(self, unet: nnx.Module, daclip: nnx.Module | None = None, sde: IRSDE | None = None,
               mode: str = "posterior", num_steps: int | None = None, *,
               tile: int | None = None, tile_overlap: int = 32, tile_batch: int = 1,
               pad_multiple: int = 1):
    self.unet = unet
    self.daclip = daclip
    self.sde = sde or IRSDE()
    self.mode = mode
    self.num_steps = num_steps
    self.sde.timesteps(num_steps)  # validates num_steps early
    self.tile, self.tile_overlap, self.tile_batch = tile, tile_overlap, tile_batch
    if pad_multiple < 1:
      raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    self.pad_multiple = pad_multiple
    if tile is not None:
      _check_tiling(tile, tile_overlap, tile_batch)  # early, before any sampling

  @classmethod
  def from_checkpoints(cls, daclip_path: str | None, unet_path: str, **kwargs) -> Restorer:
    """Builds a restorer from PyTorch files: DA-CLIP `.pt` and the denoiser `.pth` (an IR-SDE
    ConditionalUNet such as `universal-ir.pth`, or a ConditionalNAFNet, told apart by its keys)."""
    daclip = None
    if daclip_path is not None:
      from uir_jax.convert.clip import load_daclip

      daclip = load_daclip(daclip_path)
    return cls(load_denoiser(unet_path), daclip, **kwargs)

  def conditioning(self, images: Array) -> tuple[Array | None, Array | None]:
    """(text_context, image_context) = (degradation, content) embeddings the model uses."""
    if self.daclip is None:
      return None, None
    content, degradation = daclip_embeddings(self.daclip, images)
    use_degra = getattr(self.unet, "use_degra_context", True)
    use_image = getattr(self.unet, "use_image_context", True)
    return (degradation if use_degra else None), (content if use_image else None)

  def __call__(self, images: Array | np.ndarray, key: Array) -> Array:
    """Restores a batch [B, H, W, 3] (float in [0, 1]); returns floats clipped to [0, 1]."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images.shape}")
    text_context, image_context = self.conditioning(images)  # of the photo as given
    eps_fn, eps_args = make_eps_fn(self.unet, text_context=text_context,
                                   image_context=image_context)
    if self.tile is not None:
      eps_fn = tiled_eps_fn(eps_fn, self.tile, self.tile_overlap, self.tile_batch)
    h, w = images.shape[1:3]
    m = self.pad_multiple
    ph, pw = -h % m, -w % m
    if ph or pw:  # numpy-style reflection, repeated if a pad exceeds the image
      images = jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    out = self.sde.sample(eps_fn, images, key, self.mode, self.num_steps, eps_args=eps_args)
    return jnp.clip(out[:, :h, :w], 0.0, 1.0)


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

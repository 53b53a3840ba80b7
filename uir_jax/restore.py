"""Restoration glue: DA-CLIP embeddings + a conditional denoiser + the IR-SDE sampler.

    restorer = Restorer.from_checkpoints("daclip_ViT-B-32.pt", "universal-ir.pth")
    out = restorer(lq_images, jax.random.key(0))          # [B, H, W, 3] floats in [0, 1]
    big = Restorer.from_checkpoints(..., tile=512, tile_overlap=64)   # bounded memory, any size

Design: modules are split once (`nnx.split`) and the pure functions are jitted over
(graphdef, state); the sampler's denoiser is one cached function object per graphdef
(`denoiser.denoiser_eps_fn`), so repeated calls with the same image shape never recompile, and the
weights travel as arguments instead of being baked into the program as constants.

Large images: `diffusion.tiling.tiled_eps_fn` evaluates the denoiser on overlapping tiles at
every sampler step and blends them; the sampler, its noise and the DA-CLIP conditioning stay global.

This is the top of the inference stack: the pieces below it (`denoiser`: eps adapters;
`diffusion.tiling`: tiling; `photos`: reading and writing photos; `convert.denoiser`: loading a
denoiser of either architecture) are separate modules that trainers, converters and evaluation
import directly. They are re-exported here for the users of the pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert.denoiser import load_denoiser
from uir_jax.denoiser import denoiser_eps_fn, make_eps_fn
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.diffusion.tiling import check_tiling, tile_starts, tiled_eps_fn
from uir_jax.photos import read_rgb, to_uint8

__all__ = ["Restorer", "daclip_embeddings", "denoiser_eps_fn", "load_denoiser", "make_eps_fn",
           "read_rgb", "tile_starts", "tiled_eps_fn", "to_uint8"]

Array = jax.Array


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
      check_tiling(tile, tile_overlap, tile_batch)  # early, before any sampling

  @classmethod
  def from_checkpoints(cls, daclip_path: str | None, unet_path: str, *, trust: bool = False,
                       **kwargs) -> Restorer:
    """Builds a restorer from PyTorch files: DA-CLIP `.pt` and the denoiser `.pth` (an IR-SDE
    ConditionalUNet such as `universal-ir.pth`, or a ConditionalNAFNet, told apart by its keys).
    `trust=True` reads them with plain pickle, which runs code from the files."""
    from uir_jax.convert.common import checkpoint_errors

    daclip = None
    if daclip_path is not None:
      from uir_jax.convert.clip import load_daclip

      with checkpoint_errors(daclip_path):  # a refusal names the file that was refused
        daclip = load_daclip(daclip_path, trust=trust)
    with checkpoint_errors(unet_path):
      unet = load_denoiser(unet_path, trust=trust)
    return cls(unet, daclip, **kwargs)

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

"""Restoration glue: DA-CLIP embeddings + a conditional denoiser + the IR-SDE sampler.

    restorer = Restorer.from_checkpoints("daclip_ViT-B-32.pt", "universal-ir.pth")
    out = restorer(lq_images, jax.random.key(0))          # [B, H, W, 3] floats in [0, 1]

Design: modules are split once (`nnx.split`) and the pure functions below are jitted over
(graphdef, state); the sampler's denoiser is one cached function object per graphdef, so repeated
calls with the same image shape never recompile, and the weights travel as arguments instead of
being baked into the program as constants.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
  """

  def __init__(self, unet: nnx.Module, daclip: nnx.Module | None = None, sde: IRSDE | None = None,
               mode: str = "posterior", num_steps: int | None = None):
    self.unet = unet
    self.daclip = daclip
    self.sde = sde or IRSDE()
    self.mode = mode
    self.num_steps = num_steps
    self.sde.timesteps(num_steps)  # validates num_steps early

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
    text_context, image_context = self.conditioning(images)
    eps_fn, eps_args = make_eps_fn(self.unet, text_context=text_context,
                                   image_context=image_context)
    out = self.sde.sample(eps_fn, images, key, self.mode, self.num_steps, eps_args=eps_args)
    return jnp.clip(out, 0.0, 1.0)


def to_uint8(images: Array | np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 with clamp and round (the reference's `tensor2img`)."""
  return np.asarray(jnp.round(jnp.clip(jnp.asarray(images), 0.0, 1.0) * 255.0)).astype(np.uint8)

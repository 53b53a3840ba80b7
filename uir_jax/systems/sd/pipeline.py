"""Stable Diffusion text-to-image (and image-to-image) from a diffusers pipeline folder.

    pipe = load_pipeline("stable-diffusion-v1-5")        # a folder, or a repo id in the HF cache
    images = pipe.generate(["a photo of a cat"], num_steps=20, sampler="unipc")   # [B, H, W, 3]

The folder is what `StableDiffusionPipeline.save_pretrained` writes (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`); the networks come from `uir_jax.convert.sd`,
the tokenizer from `uir_jax.tokenizer.load_hf_tokenizer` (transformers' ids), the noise schedule
from `scheduler/scheduler_config.json` (`diffusion.vp.VPProcess`). `generate` follows diffusers'
`StableDiffusionPipeline.__call__`: text states of the prompts and of the negative prompts (""
by default), initial latents N(0, I) [B, H/8, W/8, 4] (or `latents=`, NHWC), classifier-free
guidance on the batch [uncond; cond] when guidance_scale > 1, the whole denoising loop as one
jitted scan (`diffusion.loop.sample_loop`: compiled once per shapes and sampler), the VAE decode
of latents / scaling_factor, images (x / 2 + 0.5) clipped to [0, 1].

Hooks the SD-based systems need:
  * `residuals=`: a ControlNet (`ControlNetHook`) or any provider
    `(latents, t, text_states) -> (down_residuals, mid_residual)` called at every step on the
    UNet's own inputs (the guided batch of 2B under guidance); an `nnx.Module` provider's
    arrays are traced inputs of the loop, a plain function's closed-over arrays constants.
  * `init_image=` + `strength=`: image-to-image as diffusers' `StableDiffusionImg2ImgPipeline`:
    the image's VAE posterior sample, noised to the step `num_steps - int(num_steps·strength)`
    of the schedule, denoised from there.
  * `prompt_embeds=` / `negative_prompt_embeds=`: text states [B, L, D] instead of text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.diffusion.adapters import ClassifierFreeGuidance
from uir_jax.diffusion.vp import SAMPLERS, VPProcess

Array = jax.Array
# diffusers pipeline classes whose folders hold an SD 1.x / 2.x text-to-image model.
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                "StableDiffusionInpaintPipeline", "StableDiffusionControlNetPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PipelineError(ValueError):
  """A folder that is not a Stable Diffusion 1.x / 2.x pipeline, or inconsistent parts."""


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise PipelineError(f"{path}: not valid JSON ({e})") from None


def check_pipeline_folder(folder: str) -> dict[str, Any]:
  """The folder's `model_index.json`, after refusing what is not an SD 1.x / 2.x pipeline
  (missing folder, a single model's folder, SDXL and other families, missing components)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Stable Diffusion: no such folder: {folder}")
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index_path):
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
      name = _read_json(cfg_path).get("_class_name", "model")
      raise PipelineError(f"{folder} is a single {name} folder (config.json), not a Stable "
                          "Diffusion pipeline folder (model_index.json)")
    raise PipelineError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
  index = _read_json(index_path)
  name = index.get("_class_name", "?")
  if "text_encoder_2" in index or "XL" in name:
    raise PipelineError(f"{index_path}: {name} with text_encoder_2 is Stable Diffusion XL, not "
                        "SD 1.x / 2.x")
  if name not in SD_PIPELINES:
    raise PipelineError(f"{index_path}: _class_name {name!r} is not a Stable Diffusion 1.x / 2.x "
                        f"pipeline ({', '.join(SD_PIPELINES)})")
  missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
  if missing:
    raise PipelineError(f"{folder} lacks the component folder(s) {', '.join(missing)}/")
  unet_cfg = os.path.join(folder, "unet", "config.json")
  if os.path.isfile(unet_cfg):
    extra = _read_json(unet_cfg).get("addition_embed_type")
    if extra:
      raise PipelineError(f"{unet_cfg}: addition_embed_type={extra!r} (SDXL-style added "
                          "conditioning) is not an SD 1.x / 2.x UNet")
  return index


@dataclasses.dataclass(frozen=True)
class _Denoiser:
  """The UNet (and a residual provider) as a static model function of `sample_loop`:
  `(x, t, text_states, unet_state, hook_state) -> ε̂ / v̂`; the states are traced arguments."""

  unet_def: Any
  hook_def: Any = None
  hook_fn: Callable | None = None

  def __call__(self, x: Array, t: Array, context: Array, unet_state: Any,
               hook_state: Any) -> Array:
    unet = nnx.merge(self.unet_def, unet_state)
    kw = {}
    hook = nnx.merge(self.hook_def, hook_state) if self.hook_def is not None else self.hook_fn
    if hook is not None:
      down, mid = hook(x, t, context)
      kw = dict(down_residuals=down, mid_residual=mid)
    return unet(x, t, context, **kw)


class ControlNetHook(nnx.Module):
  """A `ControlNet` with its condition image as a `residuals=` provider of `generate`.

  `image` [B, H, W, C] in [0, 1] at the output size (diffusers' control image preprocessing);
  under guidance it is repeated for both halves of the batch, as diffusers' ControlNet pipeline.
  """

  def __init__(self, controlnet: nnx.Module, image: Array, *, scale: float = 1.0,
               guess_mode: bool = False):
    self.controlnet = controlnet
    self.image = nnx.Variable(jnp.asarray(image, jnp.float32))
    self.scale, self.guess_mode = float(scale), bool(guess_mode)

  def __call__(self, latents: Array, t: Array, text_states: Array) -> tuple[list[Array], Array]:
    image = self.image.value
    if image.shape[0] != latents.shape[0]:
      image = jnp.concatenate([image] * (latents.shape[0] // image.shape[0]), axis=0)
    return self.controlnet(latents, t, text_states, image, conditioning_scale=self.scale,
                           guess_mode=self.guess_mode)


@nnx.jit
def _encode_text(text_encoder: nnx.Module, ids: Array) -> Array:
  return text_encoder(ids)


@nnx.jit
def _decode(vae: nnx.Module, z: Array) -> Array:
  return jnp.clip(vae.decode(z / vae.scaling_factor) / 2 + 0.5, 0.0, 1.0)


@nnx.jit
def _encode_image(vae: nnx.Module, images: Array, noise: Array) -> Array:
  mean, logvar = vae.encode(images * 2.0 - 1.0)
  return (mean + jnp.exp(0.5 * logvar) * noise) * vae.scaling_factor


@dataclasses.dataclass
class StableDiffusionPipeline:
  """An SD 1.x / 2.x pipeline: the networks, the tokenizer and the scheduler's noise process."""

  unet: nnx.Module
  vae: nnx.Module
  text_encoder: nnx.Module
  tokenizer: Any
  process: VPProcess
  path: str = ""
  sample_size: int = 64  # unet/config.json's: the latent side the UNet was trained at
  _split: tuple | None = dataclasses.field(default=None, repr=False)

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.downsample_factor

  @property
  def default_size(self) -> int:
    """Image side in pixels the UNet was trained at (unet sample_size x vae_scale_factor)."""
    return self.sample_size * self.vae_scale_factor

  def encode_prompt(self, prompts: str | Sequence[str], length: int | None = None) -> Array:
    """Text states [B, L, D] (float32) of the prompts, as diffusers' `encode_prompt`."""
    ids = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), length)
    return _encode_text(self.text_encoder, jnp.asarray(ids))

  def _unet_split(self) -> tuple:
    if self._split is None:  # split once: the same GraphDef keeps the loop's compilation
      self._split = nnx.split(self.unet)
    return self._split

  def generate(self, prompts: str | Sequence[str] | None = None, *,
               negative_prompts: str | Sequence[str] | None = None, num_steps: int = 50,
               guidance_scale: float = 7.5, sampler: str = "ddim", height: int | None = None,
               width: int | None = None, seed: int = 0, latents: Array | None = None,
               eta: float = 0.0, guidance_rescale: float = 0.0,
               residuals: Callable | nnx.Module | None = None,
               init_image: Array | None = None, strength: float = 0.8,
               init_sample_mode: str = "sample",
               prompt_embeds: Array | None = None,
               negative_prompt_embeds: Array | None = None) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1] (see the module docstring).

    Args:
      prompts: one prompt or B prompts (or None with `prompt_embeds`).
      negative_prompts: the unconditional branch's prompts (one, or B); default "".
      num_steps: UNet evaluations of the full schedule (fewer with `init_image`).
      guidance_scale: s of ε_u + s (ε_c − ε_u); <= 1 runs the conditional branch alone.
      sampler: "ddim", "dpm++2m" or "unipc" (the diffusers schedulers of those names).
      height, width: image size, multiples of the VAE factor (default: the UNet's training size).
      seed: seeds the initial noise, DDIM's η noise and the image-to-image posterior sample.
      latents: initial latents [B, H/8, W/8, C] (NHWC), instead of drawing them.
      eta: DDIM's η (0: deterministic).
      guidance_rescale: φ of diffusers' `guidance_rescale` (0: off).
      residuals, init_image, strength, prompt_embeds, negative_prompt_embeds: the hooks.
      init_sample_mode: the image's latent: "sample" (the posterior, diffusers' default) or
        "argmax" (its mean).
    """
    if sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    cond = self._text_states(prompts, prompt_embeds, "prompts")
    b = cond.shape[0]
    cfg = guidance_scale > 1.0
    uncond = None
    if cfg:
      if negative_prompt_embeds is not None:
        uncond = jnp.asarray(negative_prompt_embeds, jnp.float32)
      else:
        neg = "" if negative_prompts is None else negative_prompts
        neg = [neg] * b if isinstance(neg, str) else list(neg)
        if len(neg) != b:
          raise ValueError(f"{len(neg)} negative prompts for {b} prompts")
        uncond = self.encode_prompt(neg, cond.shape[1])
      if uncond.shape != cond.shape:
        raise ValueError(f"negative text states {uncond.shape} differ from the prompts' "
                         f"{cond.shape}")
    f, c = self.vae_scale_factor, self.unet.config.in_channels
    key = jax.random.key(seed)
    k_noise, k_sample, k_image = jax.random.split(key, 3)
    start = 0
    if init_image is not None:
      init = jnp.asarray(init_image, jnp.float32)
      if init.ndim != 4 or init.shape[0] != b or init.shape[-1] != 3:
        raise ValueError(f"init_image must be [B={b}, H, W, 3] in [0, 1], got {init.shape}")
      height, width = init.shape[1:3]
      if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
      start = num_steps - min(int(num_steps * strength), num_steps)
      if start >= num_steps:
        raise ValueError(f"strength {strength} x num_steps {num_steps} leaves no step to run")
    height = self.default_size if height is None else int(height)
    width = self.default_size if width is None else int(width)
    if height % f or width % f or height <= 0 or width <= 0:
      raise ValueError(f"height and width must be positive multiples of {f}, got "
                       f"{height}x{width}")
    shape = (b, height // f, width // f, c)
    if latents is not None:
      x = jnp.asarray(latents, jnp.float32)
      if x.shape != shape:
        raise ValueError(f"latents must be [B, H/{f}, W/{f}, {c}] = {shape} (NHWC), got "
                         f"{x.shape}")
    else:
      x = jax.random.normal(k_noise, shape, jnp.float32)
    if init_image is not None:
      if init_sample_mode not in ("sample", "argmax"):
        raise ValueError(f"init_sample_mode must be 'sample' or 'argmax', got "
                         f"{init_sample_mode!r}")
      noise_z = jax.random.normal(k_image, shape, jnp.float32)
      if init_sample_mode == "argmax":
        noise_z = jnp.zeros_like(noise_z)
      z0 = _encode_image(self.vae, init, noise_z)
      t0 = int(self.process.timesteps(num_steps, sampler)[start])
      a, s = (float(v[t0]) for v in self.process.tables())
      x = a * z0 + s * x
    unet_def, unet_state = self._unet_split()
    if isinstance(residuals, nnx.Module):
      hook_def, hook_state = nnx.split(residuals)
      model = _Denoiser(unet_def, hook_def)
    else:
      hook_state = None
      model = _Denoiser(unet_def, None, residuals)
    if cfg:
      model_fn = ClassifierFreeGuidance(model, rescale=float(guidance_rescale))
      args = (cond, uncond, jnp.float32(guidance_scale), unet_state, hook_state)
    else:
      model_fn, args = model, (cond, unet_state, hook_state)
    z, _ = self.process.sample(model_fn, x, k_sample, num_steps, sampler=sampler, eta=eta,
                               model_args=args, start=start)
    return np.asarray(_decode(self.vae, z))

  def _text_states(self, prompts, embeds, what: str) -> Array:
    if embeds is not None:
      if prompts is not None:
        raise ValueError(f"give {what} or their embeddings, not both")
      e = jnp.asarray(embeds, jnp.float32)
      d = self.unet.config.cross_attention_dim[0]
      if e.ndim != 3 or e.shape[-1] != d:
        raise ValueError(f"prompt_embeds must be [B, L, {d}], got {e.shape}")
      return e
    if prompts is None:
      raise ValueError("give prompts or prompt_embeds")
    return self.encode_prompt(prompts)


def load_pipeline(path: str | os.PathLike, *, dtype=jnp.float32,
                  attention_impl: str = "auto") -> StableDiffusionPipeline:
  """A `StableDiffusionPipeline` from a diffusers SD 1.x / 2.x pipeline folder, or a Hugging Face
  repo id found in the local cache (offline). `dtype`: the networks' compute dtype (bfloat16 on
  accelerators; parameters stay float32).

  Raises FileNotFoundError (missing folder or file) or a ValueError (`PipelineError`,
  `ConversionError`) with one line naming the file or key.
  """
  from uir_jax.convert.common import ConversionError, one_line
  from uir_jax.convert.sd import load_text_encoder, load_unet, load_vae, resolve
  from uir_jax.tokenizer import load_hf_tokenizer

  folder = resolve(path)
  check_pipeline_folder(folder)
  sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
  if not os.path.isfile(sched_path):
    raise FileNotFoundError(f"Stable Diffusion: no {sched_path}")
  try:
    process = VPProcess.from_config(_read_json(sched_path))
  except (TypeError, ValueError) as e:
    raise PipelineError(f"{sched_path}: {e}") from None
  kw = dict(dtype=dtype, attention_impl=attention_impl)
  try:
    unet = load_unet(os.path.join(folder, "unet"), **kw)
    vae = load_vae(os.path.join(folder, "vae"), **kw)
    text_encoder = load_text_encoder(os.path.join(folder, "text_encoder"), dtype=dtype)
    tokenizer = load_hf_tokenizer(os.path.join(folder, "tokenizer"))
  except ConversionError as e:  # its list of keys, joined: one line naming the file and keys
    raise ConversionError(one_line(e)) from None
  width = text_encoder.config.text_width
  if tuple(unet.config.cross_attention_dim) != (width,) * len(unet.config.cross_attention_dim):
    raise PipelineError(f"{folder}: text_encoder/config.json hidden_size {width} does not match "
                        f"unet/config.json cross_attention_dim {unet.config.cross_attention_dim}")
  if tokenizer.model_max_length > text_encoder.config.context_length:
    raise PipelineError(f"{folder}: tokenizer model_max_length {tokenizer.model_max_length} "
                        "exceeds text_encoder/config.json max_position_embeddings "
                        f"{text_encoder.config.context_length}")
  if vae.config.latent_channels != unet.config.in_channels:
    raise PipelineError(f"{folder}: vae/config.json latent_channels "
                        f"{vae.config.latent_channels} != unet/config.json in_channels "
                        f"{unet.config.in_channels}")
  size = _read_json(os.path.join(folder, "unet", "config.json")).get("sample_size") or 64
  size = size[0] if isinstance(size, (list, tuple)) else size
  return StableDiffusionPipeline(unet, vae, text_encoder, tokenizer, process, path=folder,
                                 sample_size=int(size))

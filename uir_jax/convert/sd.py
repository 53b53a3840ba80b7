"""diffusers Stable Diffusion weights -> the NNX networks of `uir_jax.models.sd`.

    unet = load_unet("stable-diffusion-v1-5/unet")          # config.json + weights in the folder
    vae = load_vae("stable-diffusion-v1-5/vae")
    cn = load_controlnet("control_v11p_sd15_canny")          # a ControlNetModel folder
    unet = load_unet("my_unet.safetensors", config=cfg)     # a weights file and its config dict

A folder is a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
`.bin`, or a sharded `.safetensors.index.json`); a pipeline folder is also accepted and its `unet/`,
`vae/` or `controlnet/` sub-folder used. `.safetensors` are read without torch; `.bin` through
`convert.common.read_state_dict` (torch). The config's `_class_name` must be the expected one, and
every architecture setting we do not implement is refused by name (SDXL, unCLIP, ...).

The key map is diffusers' names with Flax leaves (spec §3.9): conv `weight` [O, I, kh, kw] ->
`kernel` [kh, kw, I, O]; Linear [O, I] -> [I, O]; norm `weight` -> `scale`; `to_out.0` -> `to_out`;
`ff.net.0.proj` / `ff.net.2` -> `ff_proj` / `ff_out`; SD 1.x's 1x1-conv `proj_in`/`proj_out` are
squeezed into Dense kernels; the VAE's legacy attention names (`query`, `key`, `value`,
`proj_attn`) are accepted. Every key must be consumed, every parameter filled, every shape right,
else `ConversionError` names the keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert.common import (
    ConversionError,
    Rule,
    assign,
    conv,
    conv1x1_to_linear,
    convert,
    linear,
    param_shapes,
    read_state_dict,
)
from uir_jax.models.sd import AutoencoderKL, ControlNet, UNet2DConditionModel
from uir_jax.models.sd.config import ConfigError, unet_config, vae_config

StateDict = Mapping[str, Any]
WEIGHTS = "diffusion_pytorch_model"


def _pointwise(x: np.ndarray) -> np.ndarray:
  """A 1x1 Conv2d [O, I, 1, 1] or a Linear [O, I] weight -> Dense kernel [I, O]."""
  return conv1x1_to_linear(x) if x.ndim == 4 and x.shape[2:] == (1, 1) else x.T


def _conv_or_linear(x: np.ndarray) -> np.ndarray:
  return conv(x) if x.ndim == 4 else linear(x)


def sd_rules(legacy_attention: bool = False) -> list[Rule]:
  """diffusers UNet2DConditionModel / AutoencoderKL / ControlNetModel keys -> our parameter paths.

  With `legacy_attention`, the old VAE attention names `query/key/value/proj_attn` are accepted.
  """
  p = r"(?P<p>.*)"
  rules = []
  if legacy_attention:
    for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                     ("proj_attn", "to_out")):
      rules += [Rule(p + rf"\.{old}\.weight", rf"\g<p>.{new}.kernel", _pointwise),
                Rule(p + rf"\.{old}\.bias", rf"\g<p>.{new}.bias")]
  rules += [
      Rule(p + r"\.to_out\.0\.weight", r"\g<p>.to_out.kernel", _pointwise),
      Rule(p + r"\.to_out\.0\.bias", r"\g<p>.to_out.bias"),
      Rule(p + r"\.ff\.net\.0\.proj\.weight", r"\g<p>.ff_proj.kernel", linear),
      Rule(p + r"\.ff\.net\.0\.proj\.bias", r"\g<p>.ff_proj.bias"),
      Rule(p + r"\.ff\.net\.2\.weight", r"\g<p>.ff_out.kernel", linear),
      Rule(p + r"\.ff\.net\.2\.bias", r"\g<p>.ff_out.bias"),
      Rule(r"(?P<p>.*\.(?:proj_in|proj_out|to_q|to_k|to_v))\.weight", r"\g<p>.kernel", _pointwise),
      Rule(r"(?P<p>(?:.*\.)?(?:norm[123]?|group_norm|conv_norm_out))\.weight", r"\g<p>.scale"),
      Rule(p + r"\.weight", r"\g<p>.kernel", _conv_or_linear),
      Rule(p + r"\.bias", r"\g<p>.bias"),
  ]
  return rules


# ----------------------------------------------------------------------------------------------
# Finding and reading files.
# ----------------------------------------------------------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return dict(read_state_dict(path))
  except (TypeError, ValueError):  # bfloat16 tensors: numpy has no such dtype; read via JAX
    from safetensors.flax import load_file

    return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_file(path).items()}


def _read_weights(path: str) -> dict[str, Any]:
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out: dict[str, Any] = {}
    for shard in shards:
      out.update(_read_weights(os.path.join(os.path.dirname(path), shard)))
    return out
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return dict(read_state_dict(path))


def _weights_file(folder: str, variant: str | None) -> str:
  stem = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
  for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
    path = os.path.join(folder, stem + ext)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"no {stem}.safetensors or {stem}.bin in {folder}")


def read_model(path: str | os.PathLike, cls: str, subfolder: str, *,
               config: Mapping[str, Any] | None = None, variant: str | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], str]:
  """(config dict, state_dict, weights path) of a diffusers model folder or weights file.

  `path` is a model folder, a pipeline folder holding `subfolder/`, or a weights file (its config
  from `config` or the `config.json` beside it). The config's `_class_name` must be `cls`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    folder = path
    if not os.path.isfile(os.path.join(folder, "config.json")) \
        and os.path.isfile(os.path.join(folder, subfolder, "config.json")):
      folder = os.path.join(folder, subfolder)
    weights = _weights_file(folder, variant)
  elif os.path.isfile(path):
    folder, weights = os.path.dirname(path), path
  else:
    raise FileNotFoundError(f"{cls}: no such folder or file: {path}")
  cfg_path = os.path.join(folder, "config.json")
  if config is None:
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{cls}: no config.json in {folder} (pass config= for a bare "
                              "weights file)")
    with open(cfg_path) as f:
      config = json.load(f)
  else:
    cfg_path = "the given config"
  name = config.get("_class_name", cls)
  if name != cls:
    raise ConversionError(f"{cfg_path} describes a {name} (_class_name), not a {cls}")
  return dict(config), _read_weights(weights), weights


def _load(make: Callable[[], nnx.Module], sd: StateDict, weights: str, cls: str,
          legacy_attention: bool = False) -> Any:
  abstract = nnx.eval_shape(make)
  flat = convert(sd, sd_rules(legacy_attention), param_shapes(abstract),
                 what=f"{cls} weights {weights}")
  assign(abstract, flat)
  return abstract


def _config(fn: Callable[..., Any], config: Mapping[str, Any], where: str, *args) -> Any:
  try:
    return fn(config, *args)
  except ConfigError as e:
    raise ConversionError(f"{where}: {e}") from None


def load_unet(path: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
              variant: str | None = None, dtype=jnp.float32,
              attention_impl: str = "auto") -> UNet2DConditionModel:
  """A `UNet2DConditionModel` from a diffusers `unet/` folder (or a pipeline folder, or a file).

  Raises ConversionError naming an unexpected, missing or mis-shaped key, or the config key of
  an architecture we do not implement; FileNotFoundError for missing files.
  """
  cfg, sd, weights = read_model(path, "UNet2DConditionModel", "unet", config=config,
                                variant=variant)
  ucfg = _config(unet_config, cfg, weights)
  return _load(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            attention_impl=attention_impl),
               sd, weights, "UNet2DConditionModel")


def load_vae(path: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
             variant: str | None = None, dtype=jnp.float32,
             attention_impl: str = "auto") -> AutoencoderKL:
  """An `AutoencoderKL` from a diffusers `vae/` folder (or a pipeline folder, or a file); the
  legacy attention names `query/key/value/proj_attn` are accepted."""
  cfg, sd, weights = read_model(path, "AutoencoderKL", "vae", config=config, variant=variant)
  vcfg = _config(vae_config, cfg, weights)
  return _load(lambda: AutoencoderKL(vcfg, rngs=nnx.Rngs(0), dtype=dtype,
                                     attention_impl=attention_impl),
               sd, weights, "AutoencoderKL", legacy_attention=True)


def load_controlnet(path: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                    variant: str | None = None, dtype=jnp.float32,
                    attention_impl: str = "auto") -> ControlNet:
  """A `ControlNet` from a diffusers `ControlNetModel` folder (or a pipeline's `controlnet/`)."""
  cfg, sd, weights = read_model(path, "ControlNetModel", "controlnet", config=config,
                                variant=variant)
  ccfg = _config(unet_config, cfg, weights, "ControlNetModel")
  return _load(lambda: ControlNet(ccfg, rngs=nnx.Rngs(0), dtype=dtype,
                                  attention_impl=attention_impl),
               sd, weights, "ControlNetModel")


__all__ = ["ConversionError", "load_controlnet", "load_unet", "load_vae", "read_model",
           "sd_rules"]

"""diffusers Stable Diffusion weights -> the NNX networks of `uir_jax.models.sd`.

    unet = load_unet("stable-diffusion-v1-5/unet")          # config.json + weights in the folder
    vae = load_vae("stable-diffusion-v1-5/vae")
    cn = load_controlnet("control_v11p_sd15_canny")          # a ControlNetModel folder
    unet = load_unet("my_unet.safetensors", config=cfg)     # a weights file and its config dict

A folder is a diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
`.bin`, or a sharded `.safetensors.index.json`); a pipeline folder is also accepted and its `unet/`,
`vae/` or `controlnet/` sub-folder used; a Hugging Face repo id is found in the local
Hugging Face cache (offline). `.safetensors` are read without torch; `.bin` through
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

import dataclasses
import json
import os
import re
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
    one_line,
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


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """A .ckpt's "state_dict" entry, or the mapping itself."""
  inner = sd.get("state_dict")
  return inner if isinstance(inner, Mapping) else sd


def resolve(path: str | os.PathLike) -> str:
  """A local path as given; a Hugging Face repo id ("stabilityai/stable-diffusion-2-1-base") that
  is not a local path -> its snapshot folder in the local Hugging Face cache (offline: nothing is
  ever downloaded)."""
  p = os.fspath(path)
  if os.path.exists(p) or not re.fullmatch(r"[\w.-]+/[\w.-]+", p):
    return p
  try:
    from huggingface_hub import snapshot_download
  except ImportError:  # pragma: no cover - huggingface_hub comes with the [test] extra
    return p
  try:
    return snapshot_download(p, local_files_only=True)
  except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or not a repo id
    raise FileNotFoundError(f"{p}: no such folder or file, and no such model in the local "
                            "Hugging Face cache (nothing is downloaded)") from None


def read_model(path: str | os.PathLike, cls: str, subfolder: str, *,
               config: Mapping[str, Any] | None = None, variant: str | None = None
               ) -> tuple[dict[str, Any], dict[str, Any], str]:
  """(config dict, state_dict with diffusers names, weights path) of a diffusers model folder, a
  weights file, or a single-file LDM checkpoint.

  `path` is a model folder, a pipeline folder holding `subfolder/`, or a file: a single-file
  CompVis/LDM checkpoint (`model.diffusion_model.*`, `first_stage_model.*`, `control_model.*`;
  its keys renamed by spec §3.7's table, its config `config` or inferred from the shapes), else a
  diffusers weights file (its config `config` or the `config.json` beside it). The config's
  `_class_name` must be `cls`.
  """
  path = resolve(path)
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
  sd = dict(_unwrap(_read_weights(weights)))
  prefix, rename, infer = _LDM[cls]
  if cls == "ControlNetModel" and "input_hint_block.0.weight" in sd:
    sd = {prefix + k: v for k, v in sd.items()}  # a standalone LDM ControlNet file, no prefix
  if any(k.startswith(prefix) for k in sd):
    sd = rename(ldm_sections(sd, prefix))
    config = dict(config) if config is not None else infer(sd)
    return config, sd, weights + f" (single-file LDM {prefix}*, renamed to diffusers keys)"
  if os.path.isfile(path) and any(k.startswith(p) for p, _, _ in _LDM.values() for k in sd):
    raise ConversionError(f"{weights} is a single-file LDM checkpoint without a {cls} "
                          f"({prefix}* keys)")
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
  return dict(config), sd, weights


def _checked_load(abstract: Any, sd: StateDict, rules: list[Rule], *, what: str,
                  ignore: tuple[str, ...] = ()) -> Any:
  """Fills an abstract model from `sd`; the converter's report (unexpected, missing or
  mis-shaped keys, each named) as one line."""
  try:
    flat = convert(sd, rules, param_shapes(abstract), ignore=ignore, what=what)
  except ConversionError as e:
    raise ConversionError(one_line(e)) from None
  assign(abstract, flat)
  return abstract


def _load(make: Callable[[], nnx.Module], sd: StateDict, weights: str, cls: str,
          legacy_attention: bool = False) -> Any:
  return _checked_load(nnx.eval_shape(make), sd, sd_rules(legacy_attention),
                       what=f"{cls} weights {weights}")


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



def unet_from_state_dict(state_dict: StateDict, config: Mapping[str, Any], *, dtype=jnp.float32,
                         attention_impl: str = "auto") -> UNet2DConditionModel:
  """A `UNet2DConditionModel` from an in-memory diffusers state dict (torch tensors or arrays, e.g.
  a torch model's `state_dict()`) and its config dict, checked as `load_unet`; nothing is written
  (the SD-1.5-sized parity test and the benchmarks convert 3.4 GB this way)."""
  ucfg = _config(unet_config, config, "the given config")
  return _load(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            attention_impl=attention_impl),
               state_dict, "state dict", "UNet2DConditionModel")


def vae_from_state_dict(state_dict: StateDict, config: Mapping[str, Any], *, dtype=jnp.float32,
                        attention_impl: str = "auto") -> AutoencoderKL:
  """An `AutoencoderKL` from an in-memory diffusers state dict and its config dict."""
  vcfg = _config(vae_config, config, "the given config")
  return _load(lambda: AutoencoderKL(vcfg, rngs=nnx.Rngs(0), dtype=dtype,
                                     attention_impl=attention_impl),
               state_dict, "state dict", "AutoencoderKL", legacy_attention=True)


# ----------------------------------------------------------------------------------------------
# Text encoder (HF CLIPTextModel layout, as diffusers pipelines store it in text_encoder/).
# ----------------------------------------------------------------------------------------------


def text_encoder_rules() -> list[Rule]:
  """HF `CLIPTextModel` keys -> `CLIPTextTower` paths (with or without the `text_model.`
  prefix: transformers 5 writes the keys without it, SD folders written by 4.x have it)."""
  t = r"(?:text_model\.)?"
  e, r = t + r"encoder\.layers\.(?P<i>\d+)\.", r"transformer.resblocks.\g<i>."
  return [
      Rule(t + r"embeddings\.token_embedding\.weight", "token_embedding.embedding"),
      Rule(t + r"embeddings\.position_embedding\.weight", "positional_embedding"),
      Rule(t + r"final_layer_norm\.weight", "ln_final.scale"),
      Rule(t + r"final_layer_norm\.bias", "ln_final.bias"),
      Rule(e + r"self_attn\.(?P<p>[qkv]_proj|out_proj)\.weight", r + r"attn.\g<p>.kernel", linear),
      Rule(e + r"self_attn\.(?P<p>[qkv]_proj|out_proj)\.bias", r + r"attn.\g<p>.bias"),
      Rule(e + r"layer_norm(?P<n>[12])\.weight", r + r"ln_\g<n>.scale"),
      Rule(e + r"layer_norm(?P<n>[12])\.bias", r + r"ln_\g<n>.bias"),
      Rule(e + r"mlp\.fc1\.weight", r + "mlp.c_fc.kernel", linear),
      Rule(e + r"mlp\.fc1\.bias", r + "mlp.c_fc.bias"),
      Rule(e + r"mlp\.fc2\.weight", r + "mlp.c_proj.kernel", linear),
      Rule(e + r"mlp\.fc2\.bias", r + "mlp.c_proj.bias"),
  ]


def text_encoder_config(cfg: Mapping[str, Any]) -> Any:
  """A `CLIPTextTower` config from a transformers `CLIPTextConfig` dict (text_encoder/)."""
  from uir_jax.models.clip import text_config

  arch = cfg.get("architectures") or ["CLIPTextModel"]
  if cfg.get("model_type", "clip_text_model") != "clip_text_model" or \
      arch[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
    raise ConversionError(f"not a CLIPTextModel config: model_type={cfg.get('model_type')!r}, "
                          f"architectures={arch!r}")
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ConversionError(f"CLIPTextModel config key hidden_act={act!r} is not supported")
  return text_config(int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]),
                     int(cfg["num_attention_heads"]), int(cfg["intermediate_size"]),
                     vocab_size=int(cfg.get("vocab_size", 49408)),
                     context_length=int(cfg.get("max_position_embeddings", 77)), act=act,
                     ln_eps=float(cfg.get("layer_norm_eps", 1e-5)))


LDM_TEXT_HF = "cond_stage_model.transformer."  # SD 1.x single files: HF names inside
_TEXT_IGNORE = (r"(?:text_model\.)?embeddings\.position_ids", r"text_projection\.weight")


def infer_text_encoder_config(sd: StateDict, act: str = "quick_gelu") -> Any:
  """A `CLIPTextTower` config read off HF `CLIPTextModel` shapes (heads = width // 64, as both SD
  text encoders; `act` cannot be read: quick_gelu is SD 1.x's OpenAI ViT-L/14)."""
  from uir_jax.models.clip import text_config

  t = "text_model." if any(k.startswith("text_model.") for k in sd) else ""

  def shape(key: str) -> tuple[int, ...]:
    if t + key not in sd:
      raise ConversionError(f"cannot infer the CLIPTextModel config: key {t + key!r} is missing")
    return tuple(sd[t + key].shape)

  vocab, width = shape("embeddings.token_embedding.weight")
  layers = {int(m.group(1)) for k in sd if (m := re.match(
      re.escape(t) + r"encoder\.layers\.(\d+)\.", k))}
  if not layers:
    raise ConversionError("cannot infer the CLIPTextModel config: no encoder.layers.* keys")
  return text_config(width, max(layers) + 1, max(1, width // 64),
                     shape("encoder.layers.0.mlp.fc1.weight")[0], vocab_size=vocab,
                     context_length=shape("embeddings.position_embedding.weight")[0], act=act)


def _load_hf_text(sd: StateDict, tcfg: Any, layer: str | int | None, what: str, dtype) -> Any:
  """A `CLIPTextTower` from HF `CLIPTextModel` keys; `layer` drops the blocks after it."""
  from uir_jax.models.clip import CLIPTextTower, text_layer_index

  ignore = list(_TEXT_IGNORE)
  if layer is not None:
    keep = text_layer_index(layer, tcfg.text_layers)
    if keep < tcfg.text_layers:
      dropped = "|".join(str(i) for i in range(keep, tcfg.text_layers))
      ignore.append(rf"(?:text_model\.)?encoder\.layers\.({dropped})\..*")
      tcfg = dataclasses.replace(tcfg, text_layers=keep)
  abstract = nnx.eval_shape(lambda: CLIPTextTower(tcfg, rngs=nnx.Rngs(0), dtype=dtype))
  return _checked_load(abstract, sd, text_encoder_rules(), ignore=tuple(ignore), what=what)


def load_text_encoder(path: str | os.PathLike | StateDict, *, layer: str | int | None = None,
                      config: Mapping[str, Any] | None = None, dtype=jnp.float32) -> Any:
  """A `CLIPTextTower` from a transformers `CLIPTextModel` folder (a diffusers pipeline's
  `text_encoder/`: config.json + model.safetensors or pytorch_model.bin), a pipeline folder, a
  single-file LDM checkpoint, an open_clip text tower file, or a state_dict mapping.

  SD 1.x: ViT-L/14, 12 layers, quick_gelu (single files: `cond_stage_model.transformer.*`, HF
  names); SD 2.x: OpenCLIP ViT-H/14, gelu, whose conditioning is the penultimate layer through
  the final LayerNorm: diffusers stores its first 23 layers, single files hold all 24 in open_clip
  layout (`cond_stage_model.model.*`, packed q/k/v). A `text_projection` (the WithProjection
  variant) and the legacy `position_ids` buffer are ignored.

  `layer` ("last" | "penultimate" | an HF hidden-states index) keeps the blocks up to that layer,
  so that the tower's output is that layer through the final LayerNorm. None: as SD uses the
  weights: every layer of an HF-layout model, "penultimate" of an open_clip-layout one (SD 2.x);
  so an SD 2.x single file and its diffusers folder load to the same 23-block tower.

  `config` (a transformers `CLIPTextConfig` dict) is for a file or state_dict without a
  config.json beside it; else the architecture is read off the shapes, with heads of 64 channels
  (both SD text encoders) and quick_gelu for HF names (SD 1.x), gelu for open_clip (SD 2.x).
  """
  from uir_jax.convert.clip_towers import LDM_OPENCLIP, load_openclip_text

  if isinstance(path, Mapping):
    sd, where = dict(_unwrap(path)), "state_dict"
  else:
    folder = resolve(path)
    if os.path.isfile(folder):
      sd, where = dict(_unwrap(_read_weights(folder))), folder
    else:
      return _load_text_folder(folder, layer, dtype)
  if any(k.startswith(LDM_OPENCLIP) for k in sd) or "token_embedding.weight" in sd:
    given = dict(config or {})
    return load_openclip_text(sd, layer="penultimate" if layer is None else layer,
                              heads=given.get("num_attention_heads"),
                              act=given.get("hidden_act", "gelu"), name=where, dtype=dtype)
  cfg: dict[str, Any] = {"model_type": "clip_text_model", **config} if config else {}
  if any(k.startswith(LDM_TEXT_HF) for k in sd):
    sd = ldm_sections(sd, LDM_TEXT_HF)
    where += f" (single-file LDM {LDM_TEXT_HF}*)"
  elif not cfg and where != "state_dict" and os.path.isfile(cfg_path := os.path.join(
      os.path.dirname(where), "config.json")):
    with open(cfg_path) as f:  # a text_encoder/ folder's weights file: its config beside it
      cfg = json.load(f)
  if cfg.get("model_type") == "clip_text_model" and "hidden_size" in cfg:
    tcfg = text_encoder_config(cfg)
  else:  # the shapes, and what a partial `config` says
    tcfg = infer_text_encoder_config(sd, act=cfg.get("hidden_act", "quick_gelu"))
    if "num_attention_heads" in cfg:
      tcfg = dataclasses.replace(tcfg, text_heads=int(cfg["num_attention_heads"]))
  return _load_hf_text(sd, tcfg, layer, f"CLIPTextModel weights {where}", dtype)


def _load_text_folder(folder: str, layer: str | int | None, dtype) -> Any:
  if not os.path.isfile(os.path.join(folder, "config.json")) \
      and os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
    folder = os.path.join(folder, "text_encoder")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"CLIPTextModel: no such folder: {folder}")
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"CLIPTextModel: no config.json in {folder}")
  with open(cfg_path) as f:
    tcfg = text_encoder_config(json.load(f))
  for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json"):
    weights = os.path.join(folder, name)
    if os.path.isfile(weights):
      break
  else:
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
  return _load_hf_text(_read_weights(weights), tcfg, layer, f"CLIPTextModel weights {weights}",
                       dtype)


# ----------------------------------------------------------------------------------------------
# Single-file CompVis / LDM checkpoints (spec §3.7).
# ----------------------------------------------------------------------------------------------

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CONTROLNET = "control_model."
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                 "proj_out": "to_out.0"}


def _sub(rest: str, table: Mapping[str, str]) -> str:
  for old, new in table.items():
    if rest.startswith(old + "."):
      return new + rest[len(old):]
  return rest


def ldm_sections(sd: StateDict, prefix: str) -> dict[str, Any]:
  """The keys under `prefix` with the prefix removed."""
  return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _levels(sd: StateDict) -> tuple[int, int]:
  """(number of resolution levels, resnets per down level) of an LDM UNet state_dict."""
  inputs = {int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
  ops = {int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
  if not inputs:
    raise ConversionError("not an LDM UNet: no input_blocks.* keys")
  n = len(ops) + 1
  total = max(inputs) + 1
  if (total - n) % n:
    raise ConversionError(f"LDM UNet with {total} input_blocks and {len(ops)} downsamplers does "
                          "not have the same number of resnets per level")
  return n, (total - n) // n


def ldm_unet_to_diffusers(sd: StateDict) -> dict[str, Any]:
  """An LDM UNet (or ControlNet) state_dict, prefix removed -> diffusers key names.

  Keys the table does not know are passed through unchanged (the converter then names them).
  """
  _, L = _levels(sd)
  hint = sorted({int(m.group(1)) for k in sd
                 if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
  out: dict[str, Any] = {}
  for key, v in sd.items():
    new = key
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key):
      i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
      b, layer = (i - 1) // (L + 1), (i - 1) % (L + 1)
      if i == 0:
        new = "conv_in." + rest
      elif layer == L and rest.startswith("op."):
        new = f"down_blocks.{b}.downsamplers.0.conv." + rest[3:]
      elif j == 0:
        new = f"down_blocks.{b}.resnets.{layer}." + _sub(rest, _LDM_RESNET)
      elif j == 1:
        new = f"down_blocks.{b}.attentions.{layer}." + rest
    elif m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
      j, rest = int(m.group(1)), m.group(2)
      new = (f"mid_block.attentions.0.{rest}" if j == 1 else
             f"mid_block.resnets.{j // 2}." + _sub(rest, _LDM_RESNET))
    elif m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key):
      i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
      b, layer = i // (L + 1), i % (L + 1)
      if j == 0:
        new = f"up_blocks.{b}.resnets.{layer}." + _sub(rest, _LDM_RESNET)
      elif rest.startswith("conv."):
        new = f"up_blocks.{b}.upsamplers.0.conv." + rest[5:]
      elif j == 1:
        new = f"up_blocks.{b}.attentions.{layer}." + rest
    elif m := re.fullmatch(r"time_embed\.([02])\.(.+)", key):
      new = f"time_embedding.linear_{1 + int(m.group(1)) // 2}.{m.group(2)}"
    elif m := re.fullmatch(r"out\.([02])\.(.+)", key):
      new = ("conv_norm_out." if m.group(1) == "0" else "conv_out.") + m.group(2)
    elif m := re.fullmatch(r"input_hint_block\.(\d+)\.(.+)", key):
      k = int(m.group(1))
      name = ("conv_in" if k == 0 else "conv_out" if k == hint[-1] else
              f"blocks.{(k - 2) // 2}")
      new = f"controlnet_cond_embedding.{name}.{m.group(2)}"
    elif m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(.+)", key):
      new = f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    elif m := re.fullmatch(r"middle_block_out\.0\.(.+)", key):
      new = "controlnet_mid_block." + m.group(1)
    out[new] = v
  return out


def ldm_vae_to_diffusers(sd: StateDict) -> dict[str, Any]:
  """An LDM VAE state_dict (`first_stage_model.` removed) -> diffusers key names."""
  ups = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
  n = max(ups) + 1 if ups else 0
  out: dict[str, Any] = {}
  for key, v in sd.items():
    new = key
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
      new = f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}." + _sub(
          m.group(3), {"nin_shortcut": "conv_shortcut"})
    elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
      new = f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
      new = f"decoder.up_blocks.{n - 1 - int(m.group(1))}.resnets.{m.group(2)}." + _sub(
          m.group(3), {"nin_shortcut": "conv_shortcut"})
    elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
      new = f"decoder.up_blocks.{n - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
      new = f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}." + _sub(
          m.group(3), {"nin_shortcut": "conv_shortcut"})
    elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key):
      new = f"{m.group(1)}.mid_block.attentions.0." + _sub(m.group(2), _LDM_VAE_ATTN)
    elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
      new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    out[new] = v
  return out


def infer_unet_config(sd: StateDict, controlnet: bool = False) -> dict[str, Any]:
  """A diffusers config for an LDM UNet / ControlNet (diffusers names, from
  `ldm_unet_to_diffusers`), read off the shapes: SD 1.x (1x1-conv projections, 8 heads) or SD 2.x
  (Linear projections, 64 channels per head). Norm groups 32 as every LDM model."""
  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise ConversionError(f"cannot infer the UNet config: key {key!r} is missing")
    return tuple(sd[key].shape)

  blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))})
  layers = 1 + max(int(m.group(1)) for k in sd
                   if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
  channels = [shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in blocks]
  cross = [f"down_blocks.{b}.attentions.0.proj_in.weight" in sd for b in blocks]
  attn = [k for k in sd if k.endswith("attn2.to_k.weight")]
  if not attn:
    raise ConversionError("cannot infer the UNet config: no cross-attention (attn2) weights")
  linear = len(shape(attn[0].replace("transformer_blocks.0.attn2.to_k", "proj_in"))) == 2
  cfg = dict(
      in_channels=shape("conv_in.weight")[1], block_out_channels=channels,
      layers_per_block=layers, cross_attention_dim=shape(attn[0])[1],
      use_linear_projection=linear,
      attention_head_dim=[c // 64 for c in channels] if linear else 8,
      down_block_types=["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross])
  if controlnet:
    hint = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    cfg.update(conditioning_channels=shape("controlnet_cond_embedding.conv_in.weight")[1],
               conditioning_embedding_out_channels=[
                   shape("controlnet_cond_embedding.conv_in.weight")[0],
                   *(shape(f"controlnet_cond_embedding.blocks.{i}.weight")[0]
                     for i in hint if i % 2)])
  else:
    cfg.update(out_channels=shape("conv_out.weight")[0],
               up_block_types=["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in cross[::-1]])
  return cfg


def infer_vae_config(sd: StateDict) -> dict[str, Any]:
  """A diffusers AutoencoderKL config for a VAE state_dict with diffusers names."""
  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise ConversionError(f"cannot infer the VAE config: key {key!r} is missing")
    return tuple(sd[key].shape)

  levels = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
  layers = 1 + max(int(m.group(1)) for k in sd
                   if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
  return dict(in_channels=shape("encoder.conv_in.weight")[1],
              out_channels=shape("decoder.conv_out.weight")[0],
              block_out_channels=[shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0]
                                  for i in levels],
              down_block_types=["DownEncoderBlock2D"] * len(levels),
              up_block_types=["UpDecoderBlock2D"] * len(levels), layers_per_block=layers,
              latent_channels=shape("decoder.conv_in.weight")[1])


_LDM = {
    "UNet2DConditionModel": (LDM_UNET, ldm_unet_to_diffusers, infer_unet_config),
    "AutoencoderKL": (LDM_VAE, ldm_vae_to_diffusers, infer_vae_config),
    "ControlNetModel": (LDM_CONTROLNET, ldm_unet_to_diffusers,
                        lambda sd: infer_unet_config(sd, controlnet=True)),
}


__all__ = ["ConversionError", "infer_unet_config", "infer_vae_config", "ldm_unet_to_diffusers",
           "ldm_vae_to_diffusers", "infer_text_encoder_config", "load_controlnet",
           "load_text_encoder", "load_unet", "load_vae",
           "read_model", "resolve", "text_encoder_rules",
           "sd_rules"]

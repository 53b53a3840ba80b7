"""PyTorch CLIP / DA-CLIP checkpoints -> Flax NNX models (spec §1, §9.1).

    clip = load_clip("open_clip_ViT-B-32.bin")  # open_clip / OpenAI or HF CLIPModel state_dict
    daclip = load_daclip("daclip_ViT-B-32.pt")  # released DA-CLIP training checkpoint

Both accept a path or an already-loaded state_dict, infer the architecture from tensor shapes unless
`config_name`/`config` is given, convert through the checked rule engine in `convert/common.py`
(every key consumed, every parameter filled, shapes checked) and return float32 models.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from uir_jax.convert.common import (
  CheckpointError,
  ConversionError,
  Rule,
  assign,
  conv,
  convert,
  linear,
  param_shapes,
  read_state_dict,
  split,
)
from uir_jax.models.clip import CLIP, CLIPConfig, get_config
from uir_jax.models.daclip import DaCLIP

StateDict = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Rule tables.
# ----------------------------------------------------------------------------------------------


def _blocks_rules(src: str, dst: str) -> list[Rule]:
  """open_clip `Transformer.resblocks` under source prefix `src` -> our blocks under `dst`."""
  s, b = re.escape(src), r"resblocks\.(\d+)\."
  d = dst + r"resblocks.\1."
  qkv = lambda leaf: tuple(f"{d}attn.{p}_proj.{leaf}" for p in "qkv")
  return [
      Rule(s + b + r"ln_(1|2)\.weight", d + r"ln_\2.scale"),
      Rule(s + b + r"ln_(1|2)\.bias", d + r"ln_\2.bias"),
      Rule(s + b + r"attn\.in_proj_weight", qkv("kernel"), split(3, linear)),  # rows q|k|v
      Rule(s + b + r"attn\.in_proj_bias", qkv("bias"), split(3)),
      Rule(s + b + r"(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.weight", d + r"\2.kernel", linear),
      Rule(s + b + r"(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.bias", d + r"\2.bias"),
  ]


def _ln_rules(src: str, dst: str) -> list[Rule]:
  return [Rule(re.escape(src) + r"\.weight", dst + ".scale"),
          Rule(re.escape(src) + r"\.bias", dst + ".bias")]


def _vision_rules(src: str, dst: str, blocks_src: str, blocks_dst: str) -> list[Rule]:
  """open_clip `VisionTransformer` at `src` (e.g. "visual.") -> ours at `dst`."""
  s = re.escape(src)
  return [
      Rule(s + r"conv1\.weight", dst + "conv1.kernel", conv),
      Rule(s + r"(class_embedding|positional_embedding|proj)", dst + r"\1"),
      *_ln_rules(src + "ln_pre", dst + "ln_pre"),
      *_ln_rules(src + "ln_post", dst + "ln_post"),
      *_blocks_rules(src + blocks_src, dst + blocks_dst),
  ]


def openclip_rules(src: str = "", dst: str = "") -> list[Rule]:
  """open_clip / OpenAI `CLIP` state_dict (keys under `src`) -> our CLIP (paths under `dst`)."""
  s = re.escape(src)
  return [
      *_vision_rules(src + "visual.", dst + "visual.", "transformer.", "transformer."),
      Rule(s + r"token_embedding\.weight", dst + "token_embedding.embedding"),
      Rule(s + r"(positional_embedding|text_projection|logit_scale)", dst + r"\1"),
      *_ln_rules(src + "ln_final", dst + "ln_final"),
      *_blocks_rules(src + "transformer.", dst + "transformer."),
  ]


def daclip_rules() -> list[Rule]:
  """DA-CLIP `state_dict` (spec §9.1) -> our DaCLIP (the `visual.*` aliases are ignored)."""
  zero = r"visual_control\.transformer\.zero_modules\.(\d+)\."
  return [
      *openclip_rules("clip.", "clip."),
      *_vision_rules("visual_control.", "visual_control.", "transformer.transformer.",
                     "transformer.transformer."),
      Rule(zero + r"weight", r"visual_control.transformer.zero_modules.\1.kernel", linear),
      Rule(zero + r"bias", r"visual_control.transformer.zero_modules.\1.bias"),
      Rule(r"logit_scale", "logit_scale"),
  ]


def _hf_tower_rules(src: str, dst: str) -> list[Rule]:
  s, b = re.escape(src), r"encoder\.layers\.(\d+)\."
  d = dst + r"transformer.resblocks.\1."
  names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2"}
  rules = []
  for hf, ours in names.items():
    rules += [Rule(s + b + hf + r"\.weight", d + ours + ".scale"),
              Rule(s + b + hf + r"\.bias", d + ours + ".bias")]
  rules += [
      Rule(s + b + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", d + r"attn.\2.kernel",
           linear),
      Rule(s + b + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias", d + r"attn.\2.bias"),
      Rule(s + b + r"mlp\.fc1\.weight", d + "mlp.c_fc.kernel", linear),
      Rule(s + b + r"mlp\.fc1\.bias", d + "mlp.c_fc.bias"),
      Rule(s + b + r"mlp\.fc2\.weight", d + "mlp.c_proj.kernel", linear),
      Rule(s + b + r"mlp\.fc2\.bias", d + "mlp.c_proj.bias"),
  ]
  return rules


def hf_rules() -> list[Rule]:
  """Hugging Face `CLIPModel` state_dict -> our CLIP."""
  v, t = "vision_model.", "text_model."
  return [
      Rule(r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
      Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.kernel", conv),
      Rule(r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
      # Sic: HF spells it "pre_layrnorm".
      *_ln_rules(v + "pre_layrnorm", "visual.ln_pre"),
      *_ln_rules(v + "post_layernorm", "visual.ln_post"),
      *_hf_tower_rules(v, "visual."),
      Rule(r"visual_projection\.weight", "visual.proj", linear),
      Rule(r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.embedding"),
      Rule(r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
      *_ln_rules(t + "final_layer_norm", "ln_final"),
      *_hf_tower_rules(t, ""),
      Rule(r"text_projection\.weight", "text_projection", linear),
      Rule(r"logit_scale", "logit_scale"),
  ]


def _block_keys(prefix: str, layers: int) -> list[str]:
  leaves = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
            "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
  return [f"{prefix}resblocks.{i}.{leaf}" for i in range(layers) for leaf in leaves]


def _vision_keys(prefix: str, blocks: str, layers: int) -> list[str]:
  return [prefix + k for k in ("class_embedding", "positional_embedding", "proj", "conv1.weight",
                               "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")
          ] + _block_keys(prefix + blocks, layers)


def openclip_keys(config: CLIPConfig, prefix: str = "") -> list[str]:
  """The PyTorch state_dict keys of an open_clip `CLIP` with this config (spec §9.1)."""
  return ([prefix + k for k in ("positional_embedding", "text_projection", "logit_scale",
                                "token_embedding.weight", "ln_final.weight", "ln_final.bias")]
          + _block_keys(prefix + "transformer.", config.text_layers)
          + _vision_keys(prefix + "visual.", "transformer.", config.vision_layers))


def daclip_keys(config: CLIPConfig) -> list[str]:
  """The PyTorch DaCLIP state_dict keys, without the `visual.*` aliases (spec §9.1)."""
  zero = [f"visual_control.transformer.zero_modules.{i}.{leaf}"
          for i in range(config.vision_layers) for leaf in ("weight", "bias")]
  return (["logit_scale"] + openclip_keys(config, "clip.") + zero
          + _vision_keys("visual_control.", "transformer.transformer.", config.vision_layers))


def _check_present(sd: StateDict, expected: list[str], what: str) -> None:
  # The rule engine reports unfilled targets by their Flax path; users search their file for the
  # PyTorch name, so name it here first.
  missing = [k for k in expected if k not in sd]
  if missing:
    shown = ", ".join(repr(k) for k in missing[:12])
    more = f" ... and {len(missing) - 12} more" if len(missing) > 12 else ""
    raise ConversionError(f"cannot load {what}: keys missing from the file: [{shown}{more}] "
                          f"({len(missing)} total)")


# Buffers that some HF versions save (position ids) carry no weights.
HF_IGNORE = (r".*position_ids",)
# DaCLIP registers `visual` as an alias of `clip.visual`: identical tensors stored twice (§9.1).
DACLIP_IGNORE = (r"visual\..*",)


# ----------------------------------------------------------------------------------------------
# Config inference.
# ----------------------------------------------------------------------------------------------


def _num_layers(sd: StateDict, prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  if not idx:
    raise ConversionError(f"no transformer blocks found under {prefix!r}")
  return max(idx) + 1


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
  if key not in sd:
    raise ConversionError(f"cannot infer the CLIP config: key {key!r} is missing")
  return tuple(sd[key].shape)


def infer_config(sd: StateDict, *, layout: str = "openclip", prefix: str = "",
                 act: str | None = None) -> CLIPConfig:
  """CLIPConfig from tensor shapes (heads = width // 64, as in every released CLIP).

  Args:
    layout: "openclip" (open_clip / OpenAI / DA-CLIP keys) or "hf" (transformers CLIPModel).
    prefix: key prefix of the CLIP inside the state_dict ("clip." for DA-CLIP).
    act: activation; default "gelu" for open_clip layouts (LAION, DA-CLIP) and "quick_gelu" for
      HF (its CLIPConfig default; OpenAI weights). Shapes cannot tell them apart.
  """
  p = prefix
  if layout == "openclip":
    w_v, _, patch, _ = _shape(sd, p + "visual.conv1.weight")
    tokens = _shape(sd, p + "visual.positional_embedding")[0]
    vocab, w_t = _shape(sd, p + "token_embedding.weight")
    ctx = _shape(sd, p + "positional_embedding")[0]
    embed = _shape(sd, p + "text_projection")[1]
    l_v = _num_layers(sd, p + "visual.transformer.resblocks.")
    l_t = _num_layers(sd, p + "transformer.resblocks.")
    mlp = _shape(sd, p + "transformer.resblocks.0.mlp.c_fc.weight")[0] / w_t
    act = act or "gelu"
  elif layout == "hf":
    w_v, _, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight")
    tokens = _shape(sd, "vision_model.embeddings.position_embedding.weight")[0]
    vocab, w_t = _shape(sd, "text_model.embeddings.token_embedding.weight")
    ctx = _shape(sd, "text_model.embeddings.position_embedding.weight")[0]
    embed = _shape(sd, "text_projection.weight")[0]
    l_v = _num_layers(sd, "vision_model.encoder.layers.")
    l_t = _num_layers(sd, "text_model.encoder.layers.")
    mlp = _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight")[0] / w_t
    act = act or "quick_gelu"
  else:
    raise ValueError(f"layout must be 'openclip' or 'hf', got {layout!r}")
  grid = int(round((tokens - 1) ** 0.5))
  if grid * grid + 1 != tokens:
    raise ConversionError(f"vision positional embedding has {tokens} rows, not 1 + a square")
  return CLIPConfig(embed_dim=embed, image_size=grid * patch, patch_size=patch, vision_width=w_v,
                    vision_layers=l_v, vision_heads=max(1, w_v // 64), text_width=w_t,
                    text_layers=l_t, text_heads=max(1, w_t // 64), context_length=ctx,
                    vocab_size=vocab, mlp_ratio=mlp, act=act)


def _named_config(config_name: str | CLIPConfig, act: str | None) -> CLIPConfig:
  cfg = config_name if isinstance(config_name, CLIPConfig) else get_config(config_name)
  return dataclasses.replace(cfg, act=act) if act is not None else cfg


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------


_read = read_state_dict


def unwrap_checkpoint(ckpt: StateDict) -> dict[str, Any]:
  """open_clip `load_state_dict` semantics (spec §9.1): take `ckpt["state_dict"]` if present (the
  optimizer, scaler, epoch and name entries of training checkpoints are dropped), and strip a
  leading "module." from every key only when the FIRST key starts with "module"."""
  sd = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
  if not isinstance(sd, Mapping) or not sd:
    raise ConversionError("checkpoint has an empty or non-mapping state_dict")
  keys = list(sd)
  if keys[0].startswith("module"):
    return {k[len("module."):]: v for k, v in sd.items()}
  return dict(sd)


def _build(cls, config: CLIPConfig, flat: Mapping[str, np.ndarray]):
  # Abstract init: no random weights are materialised for parameters we overwrite anyway.
  model = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  assign(model, flat)
  return model


def load_clip(path_or_state_dict: str | os.PathLike | StateDict,
              config_name: str | CLIPConfig | None = None, *, act: str | None = None,
              trust: bool = False) -> CLIP:
  """A float32 `CLIP` from an open_clip/OpenAI or Hugging Face `CLIPModel` state_dict.

  Args:
    path_or_state_dict: .pt/.pth/.bin/.safetensors path, or a {key: tensor/array} mapping
      (a `{"state_dict": ...}` wrapper and a DDP "module." prefix are accepted).
    config_name: "ViT-B-32" | "ViT-L-14" | "tiny" | a CLIPConfig; None infers it from shapes.
    act: "gelu" or "quick_gelu" (OpenAI-trained weights use quick_gelu); None: "gelu" for
      open_clip layouts, "quick_gelu" for HF ones.
    trust: read a PyTorch file with plain pickle, which runs code from the file (only for files
      whose source you trust; default: data only, see `read_state_dict`).
  """
  sd = unwrap_checkpoint(_read(path_or_state_dict, trust=trust))
  hf = any(k.startswith("vision_model.") for k in sd)
  layout = "hf" if hf else "openclip"
  what = "HF CLIPModel state_dict" if hf else "open_clip CLIP state_dict"
  if config_name is None:
    config = infer_config(sd, layout=layout, act=act)
  else:
    config = _named_config(config_name, act)
  if not hf:
    _check_present(sd, openclip_keys(config), what)
  abstract = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
  flat = convert(sd, hf_rules() if hf else openclip_rules(), param_shapes(abstract),
                 ignore=HF_IGNORE if hf else (), what=what)
  return _build(CLIP, config, flat)


def load_daclip(path_or_state_dict: str | os.PathLike | StateDict,
                config_name: str | CLIPConfig | None = None, *, trust: bool = False) -> DaCLIP:
  """A float32 `DaCLIP` from a released file (`daclip_ViT-B-32.pt`, `wild-daclip_ViT-L-14.pt`).

  Full training checkpoints are accepted ({"epoch", "name", "state_dict", "optimizer", "scaler"},
  numpy scalars in the pickle, which are on the data allowlist): only `state_dict` is used;
  "module." is stripped when the first key has it; the duplicate `visual.*` alias keys are
  ignored (they equal `clip.visual.*`).

  A directory is read as a DA-CLIP training run of ours (`uir-jax train` with the daclip trainer):
  its config names the architecture and its latest checkpoint's EMA the controller.

  Args:
    config_name: "ViT-B-32" | "ViT-L-14" (or "daclip_..."), a CLIPConfig, or None to infer it.
    trust: read a PyTorch file with plain pickle, which runs code from the file (only for files
      whose source you trust; default: data only, see `read_state_dict`).
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)) and os.path.isdir(path_or_state_dict):
    return _load_daclip_run(os.fspath(path_or_state_dict))
  sd = unwrap_checkpoint(_read(path_or_state_dict, trust=trust))
  config = (infer_config(sd, prefix="clip.") if config_name is None
            else _named_config(config_name, None))
  abstract = nnx.eval_shape(lambda: DaCLIP(config, rngs=nnx.Rngs(0)))
  what = "DA-CLIP checkpoint"
  _check_present(sd, daclip_keys(config), what)
  flat = convert(sd, daclip_rules(), param_shapes(abstract), ignore=DACLIP_IGNORE, what=what)
  return _build(DaCLIP, config, flat)


def _load_daclip_run(workdir: str) -> DaCLIP:
  """The DA-CLIP of one of our training runs: frozen CLIP and trained controller (EMA)."""
  from uir_jax.checkpoint import model_from_run, read_training_run
  from uir_jax.models.clip import get_config
  from uir_jax.models.daclip import TRAINABLE

  try:
    config, state = read_training_run(workdir)
  except FileNotFoundError as e:  # a directory that is no run of ours: not a DA-CLIP checkpoint
    raise CheckpointError(str(e)) from e
  if config.get("trainer") != "daclip":
    raise ConversionError(f"{workdir}: a {config.get('trainer')!r} run, not a DA-CLIP one")
  abstract = nnx.eval_shape(lambda: DaCLIP(get_config(config["clip"]["arch"]),
                                           rngs=nnx.Rngs(0)))
  try:
    return model_from_run(abstract, state, TRAINABLE)
  except ValueError as e:
    raise ConversionError(f"{workdir}: {e}") from e


__all__ = [
    "ConversionError", "daclip_keys", "daclip_rules", "hf_rules", "infer_config", "load_clip",
    "load_daclip", "openclip_keys", "openclip_rules", "unwrap_checkpoint",
]

"""Single CLIP towers from open_clip / Hugging Face state_dicts: SD 2.x's text tower and the
ViT-H/14 image tower TextualDegRemoval reads hidden states from (spec §1.2, §3.5).

    text = load_openclip_text(sd, layer="penultimate")  # open_clip layout -> CLIPTextTower
    vis = load_vision_tower("open_clip_pytorch_model.bin")   # -> VisionTransformer
    out = vis.hidden_states(images)                     # per-layer states, pooled, embeds

open_clip text tower: keys `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W, W] (rows q|k|v), attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`; bare, under
`cond_stage_model.model.` (an SD 2.x single-file LDM checkpoint) or in a whole open_clip `CLIP`
(its `visual.*` and `logit_scale` are then not needed). `layer` keeps the blocks up to that layer
and drops the rest, as diffusers does for SD 2.x (its text encoder is the 24-block tower's first
23 blocks + `ln_final`): the loaded tower's default output is then that layer through `ln_final`.

Vision tower: open_clip `VisionTransformer` keys (bare, or `visual.*` of a whole `CLIP`), or a
Hugging Face `CLIPModel` / `CLIPVisionModelWithProjection` (`vision_model.*`,
`visual_projection.weight`). Heads cannot be read off the weights: by default `width // 64`,
except open_clip's head widths 80 (ViT-H/14, width 1280), 88 (ViT-g/14, 1408) and 104 (ViT-bigG/14,
1664); an HF folder's config.json gives them.

Every key is consumed or deliberately ignored (named in `ignore`), every parameter filled, shapes
checked; errors are one `ConversionError` line naming the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from uir_jax.convert.clip import _blocks_rules, _hf_tower_rules, _ln_rules, _vision_rules
from uir_jax.convert.common import (
    ConversionError,
    Rule,
    assign,
    conv,
    convert,
    linear,
    one_line,
    param_shapes,
    read_state_dict,
)
from uir_jax.models.clip import (
    CLIPTextTower,
    VisionTransformer,
    text_config,
    text_layer_index,
    vision_config,
)

StateDict = Mapping[str, Any]
LDM_OPENCLIP = "cond_stage_model.model."
# open_clip head widths that are not 64, by tower width.
_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}


def _checked(sd: StateDict, rules: list[Rule], abstract: Any, *, ignore: tuple[str, ...],
             what: str) -> Any:
  """Converts and assigns, with the converter's report as one line."""
  try:
    flat = convert(sd, rules, param_shapes(abstract), ignore=ignore, what=what)
  except ConversionError as e:
    raise ConversionError(one_line(e)) from None
  assign(abstract, flat)
  return abstract


def _shape(sd: StateDict, key: str, what: str) -> tuple[int, ...]:
  if key not in sd:
    raise ConversionError(f"{what}: key {key!r} is missing")
  return tuple(sd[key].shape)


def _blocks(sd: StateDict, prefix: str, what: str) -> int:
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
  if not idx:
    raise ConversionError(f"{what}: no transformer blocks under {prefix!r}")
  return max(idx) + 1


# ----------------------------------------------------------------------------------------------
# Text tower.
# ----------------------------------------------------------------------------------------------


def openclip_text_rules(src: str = "") -> list[Rule]:
  """open_clip `TextTransformer` keys under `src` -> `CLIPTextTower` paths (the packed
  `in_proj_weight` / `in_proj_bias` split into q, k, v in that order)."""
  s = re.escape(src)
  return [
      Rule(s + r"token_embedding\.weight", "token_embedding.embedding"),
      Rule(s + r"positional_embedding", "positional_embedding"),
      *_ln_rules(src + "ln_final", "ln_final"),
      *_blocks_rules(src + "transformer.", "transformer."),
  ]


def _text_prefix(sd: StateDict) -> str:
  if any(k.startswith(LDM_OPENCLIP) for k in sd):
    return LDM_OPENCLIP
  if "token_embedding.weight" in sd:
    return ""
  raise ConversionError("not an open_clip text tower: no token_embedding.weight (bare) or "
                        f"{LDM_OPENCLIP}token_embedding.weight (SD 2.x single-file) key")


def load_openclip_text(path_or_state_dict: str | os.PathLike | StateDict, *,
                       layer: str | int = "last", prefix: str | None = None,
                       heads: int | None = None, act: str = "gelu", trust: bool = False,
                       name: str | None = None, dtype=jnp.float32) -> CLIPTextTower:
  """A `CLIPTextTower` from an open_clip-layout text tower.

  Args:
    path_or_state_dict: a .safetensors / PyTorch file or a {key: tensor} mapping.
    layer: "last" | "penultimate" | an index into HF's hidden states (`text_layer_index`): the
      blocks after it are dropped (their keys ignored), so the tower's default output is that
      layer through `ln_final`. SD 2.x: "penultimate".
    prefix: the keys' prefix; None finds `cond_stage_model.model.` or none.
    heads: attention heads; None: width // 64 (every open_clip text tower).
    act: "gelu" (LAION / open_clip) or "quick_gelu" (OpenAI weights).
    trust: read a PyTorch file with plain pickle (see `read_state_dict`).
    name: what error messages call the source (default: the path, or "state_dict").
  """
  sd = read_state_dict(path_or_state_dict, trust=trust)
  if isinstance(sd.get("state_dict"), Mapping):
    sd = sd["state_dict"]
  p = _text_prefix(sd) if prefix is None else prefix
  src = path_or_state_dict
  name = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else "state_dict")
  what = f"open_clip text tower {name}" + (f" ({p}*)" if p else "")
  vocab, width = _shape(sd, p + "token_embedding.weight", what)
  n = _blocks(sd, p + "transformer.resblocks.", what)
  keep = text_layer_index(layer, n)
  mlp = _shape(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
  cfg = text_config(width, keep, heads or max(1, width // 64), mlp, vocab_size=vocab,
                    context_length=_shape(sd, p + "positional_embedding", what)[0], act=act)
  dropped = "|".join(str(i) for i in range(keep, n))
  ignore = [re.escape(p) + r"(text_projection|logit_scale|attn_mask)"]
  if dropped:
    ignore.append(re.escape(p) + rf"transformer\.resblocks\.({dropped})\..*")
  if p == "":
    ignore.append(r"visual\..*")  # a whole open_clip CLIP: only its text half is wanted
  else:
    ignore.append(rf"(?!{re.escape(p)}).*")  # the rest of a single-file checkpoint
  abstract = nnx.eval_shape(lambda: CLIPTextTower(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  return _checked(sd, openclip_text_rules(p), abstract, ignore=tuple(ignore), what=what)


# ----------------------------------------------------------------------------------------------
# Vision tower.
# ----------------------------------------------------------------------------------------------


def hf_vision_rules() -> list[Rule]:
  """HF `CLIPVisionModelWithProjection` / `CLIPModel` vision keys -> `VisionTransformer` paths."""
  v = "vision_model."
  return [
      Rule(r"vision_model\.embeddings\.class_embedding", "class_embedding"),
      Rule(r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.kernel", conv),
      Rule(r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
      *_ln_rules(v + "pre_layrnorm", "ln_pre"),  # sic: HF spells it "pre_layrnorm"
      *_ln_rules(v + "post_layernorm", "ln_post"),
      *_hf_tower_rules(v, ""),
      Rule(r"visual_projection\.weight", "proj", linear),
  ]


def _hf_vision_folder(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(vision config dict, state_dict) of a transformers CLIP(Vision)Model folder."""
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  cfg = cfg.get("vision_config", cfg)
  for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
    if os.path.isfile(os.path.join(folder, name)):
      return cfg, dict(read_state_dict(os.path.join(folder, name)))
  raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def load_vision_tower(path_or_state_dict: str | os.PathLike | StateDict, *,
                      heads: int | None = None, act: str | None = None, trust: bool = False,
                      dtype=jnp.float32) -> VisionTransformer:
  """A `VisionTransformer` (call `.hidden_states(images)`) from an open_clip or HF state_dict.

  Args:
    path_or_state_dict: a file, a transformers CLIP folder (config.json + weights), or a mapping.
    heads: attention heads (None: the folder's config, else by width, see the module doc).
    act: "gelu" | "quick_gelu"; None: the folder's `hidden_act`, else "gelu" for open_clip
      layouts (LAION) and "quick_gelu" for HF ones (transformers' default, OpenAI weights).
  """
  hf_cfg: dict[str, Any] = {}
  src = path_or_state_dict
  if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
    if not os.path.isfile(os.path.join(src, "config.json")):
      raise FileNotFoundError(f"CLIP vision tower: no config.json in {os.fspath(src)}")
    hf_cfg, sd = _hf_vision_folder(os.fspath(src))
  else:
    sd = read_state_dict(src, trust=trust)
  if isinstance(sd.get("state_dict"), Mapping):
    sd = sd["state_dict"]
  name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "state_dict"
  if any(k.startswith("vision_model.") for k in sd):
    what = f"HF CLIP vision tower {name}"
    width, _, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight", what)
    tokens = _shape(sd, "vision_model.embeddings.position_embedding.weight", what)[0]
    layers = _blocks(sd, "vision_model.encoder.layers.", what)
    mlp = _shape(sd, "vision_model.encoder.layers.0.mlp.fc1.weight", what)[0]
    embed = _shape(sd, "visual_projection.weight", what)[0]
    rules, ignore = hf_vision_rules(), (r".*position_ids", r"text_model\..*",
                                        r"text_projection\.weight", r"logit_scale")
    act = act or hf_cfg.get("hidden_act", "quick_gelu")
    heads = heads or hf_cfg.get("num_attention_heads")
    eps = float(hf_cfg.get("layer_norm_eps", 1e-5))
  else:
    p = "visual." if any(k.startswith("visual.") for k in sd) else ""
    what = f"open_clip vision tower {name}"
    width, _, patch, _ = _shape(sd, p + "conv1.weight", what)
    tokens = _shape(sd, p + "positional_embedding", what)[0]
    layers = _blocks(sd, p + "transformer.resblocks.", what)
    mlp = _shape(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    embed = _shape(sd, p + "proj", what)[1]
    rules = _vision_rules(p, "", "transformer.", "transformer.")
    # A whole CLIP's text half and logit scale are not part of the image tower.
    ignore = (r"(?!visual\.).*",) if p else ()
    act, eps = act or "gelu", 1e-5
  grid = round((tokens - 1) ** 0.5)
  if grid * grid + 1 != tokens:
    raise ConversionError(f"{what}: positional embedding has {tokens} rows, not 1 + a square")
  heads = int(heads or max(1, width // _HEAD_WIDTH.get(width, 64)))
  cfg = vision_config(width, layers, heads, mlp, patch_size=patch, image_size=grid * patch,
                      embed_dim=embed, act=act, ln_eps=eps)
  abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  return _checked(sd, rules, abstract, ignore=ignore, what=what)


__all__ = ["LDM_OPENCLIP", "hf_vision_rules", "load_openclip_text", "load_vision_tower",
           "openclip_text_rules"]

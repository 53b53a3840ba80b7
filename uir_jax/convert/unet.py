"""Released IR-SDE U-Net files (`universal-ir.pth`, `universal-ir-mix.pth`, `wild-ir.pth`) -> Flax.

    unet = load_unet("universal-ir.pth")          # daclip-sde: context 512, degradation prompt
    unet = load_unet("wild-ir.pth")               # wild: context 768, no prompt, half resolution

The architecture options (nf, ch_mult, context_dim, use_degra_context, use_image_context, scale)
are read off the tensor names and shapes (spec §9.2, Appendix A); any of them can be given to
override and check the inference. Unlike the reference, which loads these files non-strictly and
silently ignores mismatches, every key must be consumed and every parameter filled with the right
shape; otherwise a `ConversionError` names the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert.common import (
    ConversionError,
    Rule,
    assign,
    check_options,
    conv,
    conv1x1_to_linear,
    convert,
    dense_rules,
    flatten,
    linear,
    param_shapes,
    read_state_dict,
    unwrap_network,
)
from uir_jax.models.unet import ConditionalUNet

StateDict = Mapping[str, Any]


def _pointwise(x: np.ndarray) -> np.ndarray:
  """A 1x1 Conv2d [O, I, 1, 1] or a Linear [O, I] weight -> Dense kernel [I, O]."""
  return conv1x1_to_linear(x) if x.ndim == 4 else x.T


def _resblock_rules(src: str, dst: str) -> list[Rule]:
  return [
      Rule(src + r"mlp\.1\.weight", dst + "mlp.kernel", linear),
      Rule(src + r"mlp\.1\.bias", dst + "mlp.bias"),
      Rule(src + r"(?P<b>block1|block2)\.proj\.weight", dst + r"\g<b>.kernel", conv),
      Rule(src + r"res_conv\.weight", dst + "res_conv.kernel", conv),
  ]


def _attn_rules(src: str, dst: str) -> list[Rule]:
  """Residual(PreNorm(LinearAttention | SpatialTransformer)) under `src` -> PreNormResidual."""
  f, g = src + r"fn\.fn\.", dst + "fn."
  tb = f + r"transformer_blocks\.0\."
  return [
      Rule(src + r"fn\.norm\.g", dst + "norm.g", flatten),
      # LinearAttention.
      Rule(f + r"to_qkv\.weight", g + "to_qkv.kernel", _pointwise),
      Rule(f + r"to_out\.0\.weight", g + "to_out.kernel", _pointwise),
      Rule(f + r"to_out\.0\.bias", g + "to_out.bias"),
      Rule(f + r"to_out\.1\.g", g + "out_norm.g", flatten),
      # SpatialTransformer.
      Rule(f + r"norm\.weight", g + "norm.scale"),
      Rule(f + r"norm\.bias", g + "norm.bias"),
      Rule(f + r"(?P<p>proj_in|proj_out)\.weight", g + r"\g<p>.kernel", _pointwise),
      Rule(f + r"(?P<p>proj_in|proj_out)\.bias", g + r"\g<p>.bias"),
      Rule(tb + r"(?P<a>attn[12])\.(?P<q>to_[qkv])\.weight", g + r"block.\g<a>.\g<q>.kernel",
           linear),
      Rule(tb + r"(?P<a>attn[12])\.to_out\.0\.weight", g + r"block.\g<a>.to_out.kernel", linear),
      Rule(tb + r"(?P<a>attn[12])\.to_out\.0\.bias", g + r"block.\g<a>.to_out.bias"),
      Rule(tb + r"ff\.net\.0\.proj\.weight", g + "block.ff_proj.kernel", linear),
      Rule(tb + r"ff\.net\.0\.proj\.bias", g + "block.ff_proj.bias"),
      Rule(tb + r"ff\.net\.2\.weight", g + "block.ff_out.kernel", linear),
      Rule(tb + r"ff\.net\.2\.bias", g + "block.ff_out.bias"),
      Rule(tb + r"(?P<n>norm[123])\.weight", g + r"block.\g<n>.scale"),
      Rule(tb + r"(?P<n>norm[123])\.bias", g + r"block.\g<n>.bias"),
  ]


def _conv(src: str, dst: str, bias: bool = True) -> list[Rule]:
  rules = [Rule(src + r"\.weight", dst + ".kernel", conv)]
  return rules + [Rule(src + r"\.bias", dst + ".bias")] if bias else rules


def unet_rules() -> list[Rule]:
  """The PyTorch `ConditionalUNet` state_dict -> our `ConditionalUNet` parameter paths."""
  lvl = r"(?P<side>downs|ups)\.(?P<i>\d+)\."
  dst = r"\g<side>.\g<i>."
  rules = [
      *_conv(r"init_conv", "init_conv", bias=False),
      *dense_rules(r"time_mlp\.1", "time_mlp1"),
      *dense_rules(r"time_mlp\.3", "time_mlp2"),
      *dense_rules(r"text_mlp\.0", "text_mlp1"),
      *dense_rules(r"text_mlp\.2", "text_mlp2"),
      *dense_rules(r"prompt_mlp", "prompt_mlp"),
      Rule(r"prompt", "prompt"),
      *_conv(r"downsample", "downsample"),
      *_conv(r"upsample\.1", "upsample.conv"),
      *_conv(r"final_conv", "final_conv"),
      *_conv(lvl + r"3", dst + "resample"),  # Downsample / default_conv (no bias)
      *_conv(lvl + r"3\.1", dst + "resample.conv"),  # Upsample: index 0 is nn.Upsample
  ]
  for src, d in ((lvl + r"0\.", dst + "block1."), (lvl + r"1\.", dst + "block2."),
                 (r"(?P<m>mid_block1|mid_block2|final_res_block)\.", r"\g<m>.")):
    rules += _resblock_rules(src, d)
  rules += _attn_rules(lvl + r"2\.", dst + "attn.")
  rules += _attn_rules(r"mid_attn\.", "mid_attn.")
  return rules


# ----------------------------------------------------------------------------------------------
# Architecture inference.
# ----------------------------------------------------------------------------------------------


def infer_options(sd: StateDict) -> dict[str, Any]:
  """ConditionalUNet constructor options implied by a state_dict's key names and shapes."""
  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise ConversionError(f"not a ConditionalUNet state_dict: key {key!r} is missing "
                            f"(first keys: {list(sd)[:5]})")
    return tuple(sd[key].shape)

  init = shape("init_conv.weight")
  nf, in_nc = init[0], init[1] // 2
  out_nc = shape("final_conv.weight")[0]
  levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"downs\.(\d+)\.", k))})
  if not levels or levels != list(range(len(levels))):
    raise ConversionError(f"not a ConditionalUNet state_dict: down levels {levels}")
  widths = [shape(f"downs.{i}.0.block1.proj.weight")[0] for i in levels]
  widths.append(shape("mid_block1.block1.proj.weight")[0])
  if any(w % nf for w in widths[1:]):
    raise ConversionError(f"level widths {widths[1:]} are not multiples of nf={nf}")
  ch_mult = tuple(w // nf for w in widths[1:])
  attn2 = [k for k in sd if k.endswith("attn2.to_k.weight")]
  use_image_context = bool(attn2)
  use_degra_context = "prompt" in sd
  if attn2:
    context_dim = shape(attn2[0])[1]
  elif use_degra_context:
    context_dim = shape("text_mlp.0.weight")[1]
  else:
    context_dim = 0
  return dict(in_nc=in_nc, out_nc=out_nc, nf=nf, ch_mult=ch_mult, context_dim=context_dim,
              use_degra_context=use_degra_context, use_image_context=use_image_context,
              scale=0.5 if "downsample.weight" in sd else 1.0)


def unwrap_state_dict(ckpt: StateDict) -> dict[str, Any]:
  """The U-Net state_dict inside a file: a plain state_dict (as released), or under
  "state_dict"/"params"; a DataParallel "module." prefix is stripped."""
  return unwrap_network(ckpt, ("state_dict", "params"))


def load_unet(path_or_state_dict: str | os.PathLike | StateDict, *, dtype=jnp.float32,
              attention_impl: str = "auto", trust: bool = False, **options) -> ConditionalUNet:
  """A `ConditionalUNet` holding a released (or our torch-exported) IR-SDE U-Net's weights.

  Args:
    path_or_state_dict: `.pth`/`.pt`/`.safetensors` file or a {key: tensor} mapping.
    dtype: compute dtype of the returned model (parameters stay float32).
    attention_impl: see `uir_jax.models.layers.attention`.
    trust: read a PyTorch file with plain pickle, which runs code from the file (only for files
      whose source you trust; default: data only, see `read_state_dict`).
    **options: ConditionalUNet options; each one given must agree with the file.

  Raises:
    ConversionError naming unexpected, missing or mis-shaped keys, or an option that disagrees
    with the file.
  """
  sd = unwrap_state_dict(read_state_dict(path_or_state_dict, trust=trust))
  inferred = infer_options(sd)
  check_options(options, inferred, "ConditionalUNet")
  make = lambda: ConditionalUNet(**inferred, rngs=nnx.Rngs(0), dtype=dtype,
                                 attention_impl=attention_impl)
  abstract = nnx.eval_shape(make)
  flat = convert(sd, unet_rules(), param_shapes(abstract), what="ConditionalUNet checkpoint")
  assign(abstract, flat)
  return abstract


__all__ = ["ConversionError", "infer_options", "load_unet", "unet_rules", "unwrap_state_dict"]

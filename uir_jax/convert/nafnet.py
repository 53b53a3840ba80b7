"""PyTorch NAFNet / IR-SDE ConditionalNAFNet checkpoints -> Flax NNX (spec §6).

    net = load_nafnet("refusion.pth")              # IR-SDE/Refusion ConditionalNAFNet
    net = load_nafnet("NAFNet-SIDD-width64.pth")   # megvii NAFNet ({"params": ...} accepted)

The key names are IR-SDE's `DenoisingNAFNet_arch.py` / megvii's `NAFNet_arch.py`: `intro.*`,
`encoders.{i}.{j}.*`, `downs.{i}.*`, `middle_blks.{j}.*`, `ups.{i}.0.weight` (1x1 conv, no bias,
before PixelShuffle), `decoders.{i}.{j}.*`, `ending.*`, `time_mlp.1/.3.*`; inside a block
`conv1..conv5`, `sca.1`, `norm1/2` (`.g` for IR-SDE's g-only LayerNorm, `.weight/.bias` for
LayerNorm2d), `beta`, `gamma`, `mlp.1`. The DA-CLIP options use the U-Net's names (`prompt`,
`text_mlp.0/.2`, `prompt_mlp`, and a SpatialTransformer `att.*` in the middle blocks).

Which model (conditional or not), width, block counts, norm flavour and DA-CLIP options are read off
the keys and shapes; options given to `load_nafnet` override and are checked. Every key must be
consumed and every parameter filled with the right shape, otherwise `ConversionError` names the
PyTorch key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from uir_jax.convert import common
from uir_jax.convert.common import (
    ConversionError,
    Rule,
    check_options,
    conv,
    conv1x1_to_linear,
    dense_rules,
    flatten,
    linear,
    read_state_dict,
    unwrap_network,
)
from uir_jax.models.nafnet import ConditionalNAFNet, NAFNet

StateDict = Mapping[str, Any]

_BLOCK = r"(?P<b>(?:encoders|decoders)\.\d+\.\d+|middle_blks\.\d+)\."


def _att_rules() -> list[Rule]:
  """The U-Net's SpatialTransformer under a middle block's `att.`."""
  s, d = _BLOCK + r"att\.", r"\g<b>.att."
  tb = s + r"transformer_blocks\.0\."
  return [
      Rule(s + r"norm\.weight", d + "norm.scale"),
      Rule(s + r"norm\.bias", d + "norm.bias"),
      Rule(s + r"(?P<p>proj_in|proj_out)\.weight", d + r"\g<p>.kernel", conv1x1_to_linear),
      Rule(s + r"(?P<p>proj_in|proj_out)\.bias", d + r"\g<p>.bias"),
      Rule(tb + r"(?P<a>attn[12])\.(?P<q>to_[qkv])\.weight", d + r"block.\g<a>.\g<q>.kernel",
           linear),
      Rule(tb + r"(?P<a>attn[12])\.to_out\.0\.weight", d + r"block.\g<a>.to_out.kernel", linear),
      Rule(tb + r"(?P<a>attn[12])\.to_out\.0\.bias", d + r"block.\g<a>.to_out.bias"),
      Rule(tb + r"ff\.net\.0\.proj\.weight", d + "block.ff_proj.kernel", linear),
      Rule(tb + r"ff\.net\.0\.proj\.bias", d + "block.ff_proj.bias"),
      Rule(tb + r"ff\.net\.2\.weight", d + "block.ff_out.kernel", linear),
      Rule(tb + r"ff\.net\.2\.bias", d + "block.ff_out.bias"),
      Rule(tb + r"(?P<n>norm[123])\.weight", d + r"block.\g<n>.scale"),
      Rule(tb + r"(?P<n>norm[123])\.bias", d + r"block.\g<n>.bias"),
  ]


def nafnet_rules() -> list[Rule]:
  """NAFNet / ConditionalNAFNet state_dict keys -> our parameter paths."""
  b, d = _BLOCK, r"\g<b>."
  return [
      Rule(r"(?P<c>intro|ending)\.weight", r"\g<c>.kernel", conv),
      Rule(r"(?P<c>intro|ending)\.bias", r"\g<c>.bias"),
      Rule(r"downs\.(\d+)\.weight", r"downs.\1.kernel", conv),
      Rule(r"downs\.(\d+)\.bias", r"downs.\1.bias"),
      Rule(r"ups\.(\d+)\.0\.weight", r"ups.\1.kernel", conv1x1_to_linear),
      *dense_rules(r"time_mlp\.1", "time_mlp1"),
      *dense_rules(r"time_mlp\.3", "time_mlp2"),
      *dense_rules(r"text_mlp\.0", "text_mlp1"),
      *dense_rules(r"text_mlp\.2", "text_mlp2"),
      *dense_rules(r"prompt_mlp", "prompt_mlp"),
      Rule(r"prompt", "prompt"),
      # NAFBlock.
      Rule(b + r"mlp\.1\.weight", d + "mlp.kernel", linear),
      Rule(b + r"mlp\.1\.bias", d + "mlp.bias"),
      Rule(b + r"conv2\.weight", d + "conv2.kernel", conv),  # depthwise [dw, 1, 3, 3]
      Rule(b + r"(?P<c>conv[1345])\.weight", d + r"\g<c>.kernel", conv1x1_to_linear),
      Rule(b + r"(?P<c>conv[1-5])\.bias", d + r"\g<c>.bias"),
      Rule(b + r"sca\.1\.weight", d + "sca.kernel", conv1x1_to_linear),
      Rule(b + r"sca\.1\.bias", d + "sca.bias"),
      Rule(b + r"(?P<n>norm[12])\.g", d + r"\g<n>.g", flatten),
      Rule(b + r"(?P<n>norm[12])\.weight", d + r"\g<n>.scale"),
      Rule(b + r"(?P<n>norm[12])\.bias", d + r"\g<n>.bias"),
      Rule(b + r"(?P<p>beta|gamma)", d + r"\g<p>", flatten),
      *_att_rules(),
  ]


# Our parameter path -> the PyTorch key (the inverse of the rules above), so that errors about
# missing weights name what the user would look for in their file.
_REVERSE = [
    (r"^time_mlp1\.", "time_mlp.1."), (r"^time_mlp2\.", "time_mlp.3."),
    (r"^text_mlp1\.", "text_mlp.0."), (r"^text_mlp2\.", "text_mlp.2."),
    (r"^ups\.(\d+)\.kernel$", r"ups.\1.0.weight"),
    (r"\.mlp\.", ".mlp.1."), (r"\.sca\.", ".sca.1."),
    (r"\.att\.block\.", ".att.transformer_blocks.0."),
    (r"\.ff_proj\.", ".ff.net.0.proj."), (r"\.ff_out\.", ".ff.net.2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.(kernel|scale)$", ".weight"),
]


def torch_key(path: str) -> str:
  """The PyTorch state_dict key that fills our parameter `path`."""
  return common.torch_key(path, _REVERSE)


def expected_keys(model: nnx.Module) -> list[str]:
  """The PyTorch state_dict keys a checkpoint for `model` has (sorted)."""
  return common.expected_torch_keys(model, _REVERSE)


# ----------------------------------------------------------------------------------------------
# Architecture inference.
# ----------------------------------------------------------------------------------------------


def _counts(sd: StateDict, pattern: str) -> dict[int, int]:
  """{level: number of blocks} for keys `<pattern>.<level>.<block>.`."""
  out: dict[int, int] = {}
  for k in sd:
    if m := re.match(pattern + r"\.(\d+)\.(\d+)\.", k):
      lvl, blk = int(m.group(1)), int(m.group(2))
      out[lvl] = max(out.get(lvl, 0), blk + 1)
  return out


def infer_options(sd: StateDict) -> dict[str, Any]:
  """Constructor options (and `conditional`) implied by a NAFNet state_dict's keys and shapes."""
  def shape(key: str) -> tuple[int, ...]:
    if key not in sd:
      raise ConversionError(f"not a NAFNet state_dict: key {key!r} is missing "
                            f"(first keys: {list(sd)[:5]})")
    return tuple(sd[key].shape)

  width, in_ch = shape("intro.weight")[:2]
  out_ch = shape("ending.weight")[0]
  levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"downs\.(\d+)\.", k))})
  ups = sorted({int(m.group(1)) for k in sd if (m := re.match(r"ups\.(\d+)\.", k))})
  if levels != list(range(len(levels))) or ups != list(range(len(ups))):
    raise ConversionError(f"not a NAFNet state_dict: down levels {levels}, up levels {ups}")
  enc, dec = _counts(sd, "encoders"), _counts(sd, "decoders")
  middle = {int(m.group(1)) for k in sd if (m := re.match(r"middle_blks\.(\d+)\.", k))}
  norm = "channel" if any(re.search(r"\.norm1\.g$", k) for k in sd) else "layernorm2d"
  attn2 = sorted(k for k in sd if re.match(r"middle_blks\.\d+\.att\..*attn2\.to_k\.weight$", k))
  use_degra = "prompt" in sd
  context_dim = (shape(attn2[0])[1] if attn2 else
                 shape("text_mlp.0.weight")[1] if use_degra else 0)
  opts: dict[str, Any] = dict(
      middle_blk_num=max(middle) + 1 if middle else 0,
      enc_blk_nums=tuple(enc.get(i, 0) for i in levels),
      dec_blk_nums=tuple(dec.get(i, 0) for i in ups),
      context_dim=context_dim, use_degra_context=use_degra, use_image_context=bool(attn2),
      norm=norm)
  if "time_mlp.1.weight" in sd:
    if in_ch % 2:
      raise ConversionError(f"ConditionalNAFNet `intro` takes cat[x_t - mu, mu]: an even number "
                            f"of channels, got {in_ch}")
    opts.update(conditional=True, in_nc=in_ch // 2, out_nc=out_ch, nf=width)
  else:
    if in_ch != out_ch:
      raise ConversionError(f"NAFNet `intro` has {in_ch} input channels but `ending` {out_ch}")
    opts.update(conditional=False, img_channel=in_ch, width=width)
  return opts


def unwrap_state_dict(ckpt: StateDict) -> dict[str, Any]:
  """The network state_dict inside a file: plain (IR-SDE saves `network.state_dict()`), or under
  "params"/"params_ema" (megvii/BasicSR) or "state_dict"; "module." is stripped."""
  return unwrap_network(ckpt, ("params", "params_ema", "state_dict"))


def load_nafnet(path_or_state_dict: str | os.PathLike | StateDict, *, dtype=jnp.float32,
                attention_impl: str = "auto", trust: bool = False,
                **options) -> NAFNet | ConditionalNAFNet:
  """A `ConditionalNAFNet` (if the file has `time_mlp.*`) or a `NAFNet` holding the weights.

  Args:
    path_or_state_dict: `.pth`/`.pt`/`.safetensors` file or a {key: tensor} mapping.
    dtype: compute dtype of the returned model (parameters stay float32).
    attention_impl: see `uir_jax.models.layers.attention` (DA-CLIP variant only).
    trust: read a PyTorch file with plain pickle, which runs code from the file (only for files
      whose source you trust; default: data only, see `read_state_dict`).
    **options: constructor options (`nf`, `enc_blk_nums`, `context_dim`, `norm`, ...; or
      `conditional=True/False`); each one given must agree with the file.

  Raises:
    ConversionError naming unexpected, missing or mis-shaped PyTorch keys, or an option that
    disagrees with the file.
  """
  sd = unwrap_state_dict(read_state_dict(path_or_state_dict, trust=trust))
  inferred = infer_options(sd)
  check_options(options, inferred, "NAFNet")
  kw = dict(inferred)
  cls = ConditionalNAFNet if kw.pop("conditional") else NAFNet
  what = f"{cls.__name__} checkpoint"
  abstract = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(0), dtype=dtype,
                                        attention_impl=attention_impl))
  return common.load_checked(abstract, sd, nafnet_rules(), _REVERSE, what=what)


__all__ = ["ConversionError", "expected_keys", "infer_options", "load_nafnet", "nafnet_rules",
           "torch_key", "unwrap_state_dict"]

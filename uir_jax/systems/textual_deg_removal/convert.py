"""TextualDegRemoval guided-restoration checkpoints -> Flax NNX (NAFNet variant so far).

    net = load_guided_nafnet(state_dict)    # NAFNetRefFusion keys (BasicSR {"params": ...} too)

Keys: NAFNet's (`uir_jax/convert/nafnet.py`) plus the fusion stacks `masa_blk_enc.{l}.{j}.*`,
`masa_blk_middle.0.{j}.*` (NAFBlocks) and the guidance encoder `masa_enc.conv_L{1..5}.*`,
`masa_enc.blk_L{1..5}.{i}.conv{1,2}.*`. The architecture is read off the keys; nf must equal
width. Unknown, missing or mis-shaped keys raise `ConversionError` naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from uir_jax.convert.common import (
    ConversionError,
    Rule,
    assign,
    conv,
    conv1x1_to_linear,
    convert,
    flatten,
    param_shapes,
    read_state_dict,
    unwrap_network,
)
from uir_jax.convert.nafnet import nafnet_rules
from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet

StateDict = Mapping[str, Any]

_FUSE = r"(?P<b>masa_blk_enc\.\d+\.\d+|masa_blk_middle\.0\.\d+)\."


def guided_nafnet_rules() -> list[Rule]:
  b, d = _FUSE, r"\g<b>."
  return [
      *nafnet_rules(),
      Rule(b + r"conv2\.weight", d + "conv2.kernel", conv),
      Rule(b + r"(?P<c>conv[1345])\.weight", d + r"\g<c>.kernel", conv1x1_to_linear),
      Rule(b + r"(?P<c>conv[1-5])\.bias", d + r"\g<c>.bias"),
      Rule(b + r"sca\.1\.weight", d + "sca.kernel", conv1x1_to_linear),
      Rule(b + r"sca\.1\.bias", d + "sca.bias"),
      Rule(b + r"(?P<n>norm[12])\.weight", d + r"\g<n>.scale"),
      Rule(b + r"(?P<n>norm[12])\.bias", d + r"\g<n>.bias"),
      Rule(b + r"(?P<p>beta|gamma)", d + r"\g<p>", flatten),
      Rule(r"masa_enc\.conv_L(?P<l>[1-5])\.weight", r"masa_enc.convs.\g<l>.kernel", conv),
      Rule(r"masa_enc\.conv_L(?P<l>[1-5])\.bias", r"masa_enc.convs.\g<l>.bias"),
      Rule(r"masa_enc\.blk_L(?P<l>[1-5])\.(?P<i>\d+)\.(?P<c>conv[12])\.weight",
           r"masa_enc.blks.\g<l>.\g<i>.\g<c>.kernel", conv),
      Rule(r"masa_enc\.blk_L(?P<l>[1-5])\.(?P<i>\d+)\.(?P<c>conv[12])\.bias",
           r"masa_enc.blks.\g<l>.\g<i>.\g<c>.bias"),
  ]


def _renumber(sd: StateDict) -> dict[str, Any]:
  """masa_enc levels are 1-based in the code, 0-based lists here."""
  out = {}
  for k, v in sd.items():
    m = re.match(r"masa_enc\.(conv|blk)_L([1-5])\.(.*)", k)
    out[f"masa_enc.{m.group(1)}_L{int(m.group(2)) - 1}.{m.group(3)}" if m else k] = v
  return out


def _count(sd: StateDict, pattern: str) -> dict[int, int]:
  out: dict[int, int] = {}
  for k in sd:
    if m := re.match(pattern + r"\.(\d+)\.(\d+)\.", k):
      out[int(m.group(1))] = max(out.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  return out


def infer_options(sd: StateDict) -> dict[str, Any]:
  if "intro.weight" not in sd or "masa_enc.conv_L1.weight" not in sd:
    raise ConversionError("not a NAFNetRefFusion state_dict: intro.weight or "
                          "masa_enc.conv_L1.weight is missing")
  width, cin = tuple(sd["intro.weight"].shape[:2])
  nf = int(sd["masa_enc.conv_L1.weight"].shape[0])
  enc, dec = _count(sd, "encoders"), _count(sd, "decoders")
  fuse, mid = _count(sd, "masa_blk_enc"), _count(sd, "masa_blk_middle")
  ext: dict[int, int] = {}  # keyed by the code's 1-based level
  for k in sd:
    if m := re.match(r"masa_enc\.blk_L(\d)\.(\d+)\.", k):
      ext[int(m.group(1))] = max(ext.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  middle = {int(m.group(1)) for k in sd if (m := re.match(r"middle_blks\.(\d+)\.", k))}
  return dict(img_channel=cin, width=width, nf=nf,
              middle_blk_num=max(middle) + 1 if middle else 0,
              enc_blk_nums=tuple(enc.get(i, 0) for i in range(4)),
              dec_blk_nums=tuple(dec.get(i, 0) for i in range(4)),
              ext_n_blocks=(ext.get(1, 0), ext.get(2, 0), ext.get(3, 0), ext.get(3, 0)),
              reffusion_n_blocks=tuple(fuse.get(i, 0) for i in range(4)),
              reffusion_n_blocks_middle=mid.get(0, 0))


def load_guided_nafnet(path_or_state_dict: str | os.PathLike | StateDict, *,
                       dtype=jnp.float32) -> GuidedNAFNet:
  """A `GuidedNAFNet` holding a NAFNetRefFusion checkpoint's weights."""
  sd = unwrap_network(read_state_dict(path_or_state_dict), ("params", "params_ema", "state_dict"))
  kw = infer_options(sd)
  abstract = nnx.eval_shape(lambda: GuidedNAFNet(**kw, rngs=nnx.Rngs(0), dtype=dtype))
  rules = [Rule(r.pattern.replace(r"conv_L(?P<l>[1-5])", r"conv_L(?P<l>[0-4])")
                .replace(r"blk_L(?P<l>[1-5])", r"blk_L(?P<l>[0-4])"), r.target, r.transform)
           for r in guided_nafnet_rules()]
  flat = convert(_renumber(sd), rules, param_shapes(abstract), what="NAFNetRefFusion checkpoint")
  assign(abstract, flat)
  return abstract


__all__ = ["guided_nafnet_rules", "infer_options", "load_guided_nafnet"]

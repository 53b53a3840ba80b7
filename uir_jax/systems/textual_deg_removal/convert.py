"""TextualDegRemoval guided-restoration checkpoints -> Flax NNX (`networks.py`'s three networks).

    net = load_guided("net_g_latest.pth")      # NAFNetRefFusion, RestormerRefFusion or
                                               # PromptIRRefFusion: read off the keys
    arch, options = infer_guided(state_dict)   # ("nafnet" | "restormer" | "promptir", kwargs)

Layouts (BasicSR `{"params": ...}` / `{"params_ema": ...}`, Lightning `{"state_dict": ...}` with
a `net.` prefix, or a plain state_dict):

  * NAFNetRefFusion: NAFNet's keys (`uir_jax/convert/nafnet.py`) plus the fusion stacks
    `masa_blk_enc.{l}.{j}.*`, `masa_blk_middle.0.{j}.*` (NAFBlocks) and the guidance encoder
    `masa_enc.conv_L{1..5}.*`, `masa_enc.blk_L{1..5}.{i}.conv{1,2}.*`.
  * RestormerRefFusion / PromptIRRefFusion: Restormer's / PromptIR's keys
    (`uir_jax/convert/{restormer,promptir}.py`; PromptIR's never-used `chnl_reduce*`,
    `reduce_noise_channel_*` are dropped by name), `masa_enc.conv_L{1..4}.*`,
    `masa_enc.blk_L{1..4}.*` and `masa_blk_enc_level{1..4}.{j}.*` (Restormer blocks + `alpha`).
  * fusion="encoder+decoder" (ours; no official checkpoint has it): `masa_blk_dec.{i}.{j}.*`
    (NAFNet) or `masa_blk_dec_level{1,2,3}.{j}.*` (Restormer family).

The backbone is read off the keys (`intro.weight` NAFNet, `prompt1.prompt_param` PromptIR,
`patch_embed.proj.weight` Restormer), then every option (widths, block counts, heads, GDFN
factor, LayerNorm type, prompt shapes, guidance-encoder depth, fusion counts, fusion kind).
Every key must be consumed and every parameter filled with its shape, else `ConversionError`
names the key. Files are read by convert/common's safe loader (data only unless trust=True).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert import common
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
from uir_jax.convert.promptir import UNUSED as PROMPTIR_UNUSED
from uir_jax.convert.promptir import infer_options as promptir_options
from uir_jax.convert.promptir import promptir_rules
from uir_jax.convert.restormer import _REVERSE as RESTORMER_REVERSE
from uir_jax.convert.restormer import (
    common_options,
    count_blocks,
    restormer_rules,
    unwrap_state_dict,
)
from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet
from uir_jax.systems.textual_deg_removal.guided_restormer import GuidedPromptIR, GuidedRestormer

StateDict = Mapping[str, Any]

_FUSE = r"(?P<b>masa_blk_enc\.\d+\.\d+|masa_blk_middle\.0\.\d+|masa_blk_dec\.\d+\.\d+)\."
_TFUSE = r"(?P<b>masa_blk_(?:enc|dec)_level\d\.\d+)\."


def masa_enc_rules(levels: int = 5) -> list[Rule]:
  """The guidance encoder: the code's 1-based `conv_L{l}` / `blk_L{l}` -> our 0-based lists."""
  rules = []
  for lvl in range(1, levels + 1):
    src, dst = rf"masa_enc\.conv_L{lvl}\.", f"masa_enc.convs.{lvl - 1}."
    blk, bdst = rf"masa_enc\.blk_L{lvl}\.(?P<i>\d+)\.(?P<c>conv[12])\.", \
        f"masa_enc.blks.{lvl - 1}." + r"\g<i>.\g<c>."
    rules += [Rule(src + "weight", dst + "kernel", conv), Rule(src + "bias", dst + "bias"),
              Rule(blk + "weight", bdst + "kernel", conv), Rule(blk + "bias", bdst + "bias")]
  return rules


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
      *masa_enc_rules(5),
  ]


def _scalar(x: Any) -> np.ndarray:
  x = np.asarray(x)
  if x.size != 1:
    raise ConversionError(f"a fusion block's alpha must hold one value, got shape {x.shape}")
  return x.reshape(())


def fusion_block_rules() -> list[Rule]:
  """The Restormer family's fusion blocks (`TransformerResFusionBlock`: a Restormer block +
  `alpha`)."""
  b, d = _TFUSE, r"\g<b>."
  return [
      Rule(b + r"norm(?P<n>[12])\.body\.weight", d + r"norm\g<n>.scale"),
      Rule(b + r"norm(?P<n>[12])\.body\.bias", d + r"norm\g<n>.bias"),
      Rule(b + r"attn\.temperature", d + "attn.temperature", flatten),
      Rule(b + r"(?P<m>attn\.qkv|attn\.project_out|ffn\.project_in|ffn\.project_out)\.weight",
           d + r"\g<m>.kernel", conv1x1_to_linear),
      Rule(b + r"(?P<m>attn\.qkv_dwconv|ffn\.dwconv)\.weight", d + r"\g<m>.kernel", conv),
      Rule(b + r"(?P<m>attn\.qkv|attn\.qkv_dwconv|attn\.project_out|ffn\.project_in|ffn\.dwconv|"
           r"ffn\.project_out)\.bias", d + r"\g<m>.bias"),
      Rule(b + r"alpha", d + "alpha", _scalar),
  ]


# Our parameter path -> the PyTorch key (for "missing key" errors), Restormer family.
_REVERSE = [
    *[(rf"^masa_enc\.convs\.{i}\.kernel$", f"masa_enc.conv_L{i + 1}.weight") for i in range(5)],
    *[(rf"^masa_enc\.convs\.{i}\.", f"masa_enc.conv_L{i + 1}.") for i in range(5)],
    *[(rf"^masa_enc\.blks\.{i}\.", f"masa_enc.blk_L{i + 1}.") for i in range(5)],
    *RESTORMER_REVERSE,
]


def _count(sd: StateDict, pattern: str) -> dict[int, int]:
  out: dict[int, int] = {}
  for k in sd:
    if m := re.match(pattern + r"\.(\d+)\.(\d+)\.", k):
      out[int(m.group(1))] = max(out.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  return out


def _masa_enc_options(sd: StateDict, levels: int, what: str) -> dict[str, Any]:
  present = {int(m.group(1)) for k in sd if (m := re.match(r"masa_enc\.conv_L(\d)\.weight", k))}
  if present != set(range(1, levels + 1)):
    raise ConversionError(f"a {what} state_dict has a {levels}-level guidance encoder "
                          f"(masa_enc.conv_L1..{levels}); this one has levels {sorted(present)}")
  ext: dict[int, int] = {}  # keyed by the code's 1-based level
  for k in sd:
    if m := re.match(r"masa_enc\.blk_L(\d)\.(\d+)\.", k):
      ext[int(m.group(1))] = max(ext.get(int(m.group(1)), 0), int(m.group(2)) + 1)
  return dict(nf=int(sd["masa_enc.conv_L1.weight"].shape[0]),
              ext_n_blocks=(ext.get(1, 0), ext.get(2, 0), ext.get(3, 0), ext.get(3, 0)))


def infer_options(sd: StateDict) -> dict[str, Any]:
  """GuidedNAFNet options of a NAFNetRefFusion state_dict."""
  if "intro.weight" not in sd or "masa_enc.conv_L1.weight" not in sd:
    raise ConversionError("not a NAFNetRefFusion state_dict: intro.weight or "
                          "masa_enc.conv_L1.weight is missing")
  width, cin = tuple(sd["intro.weight"].shape[:2])
  enc, dec = _count(sd, "encoders"), _count(sd, "decoders")
  fuse, mid = _count(sd, "masa_blk_enc"), _count(sd, "masa_blk_middle")
  dec_fuse = _count(sd, "masa_blk_dec")  # decoder order: i = 0 is the /8 level
  middle = {int(m.group(1)) for k in sd if (m := re.match(r"middle_blks\.(\d+)\.", k))}
  opts = dict(img_channel=cin, width=width, **_masa_enc_options(sd, 5, "NAFNetRefFusion"),
              middle_blk_num=max(middle) + 1 if middle else 0,
              enc_blk_nums=tuple(enc.get(i, 0) for i in range(4)),
              dec_blk_nums=tuple(dec.get(i, 0) for i in range(4)),
              reffusion_n_blocks=tuple(fuse.get(i, 0) for i in range(4)),
              reffusion_n_blocks_middle=mid.get(0, 0), fusion="encoder+bottleneck")
  if dec_fuse:
    opts.update(fusion="encoder+decoder",
                reffusion_n_blocks_dec=tuple(dec_fuse.get(3 - lvl, 0) for lvl in range(4)))
  return opts


def infer_guided(sd: StateDict) -> tuple[str, dict[str, Any]]:
  """(arch, constructor options) of an unwrapped guided-restoration state_dict."""
  if "intro.weight" in sd:
    return "nafnet", infer_options(sd)
  if "patch_embed.proj.weight" not in sd:
    raise ConversionError(f"not a guided-restoration state_dict (no intro.weight for "
                          f"NAFNetRefFusion, no patch_embed.proj.weight for RestormerRefFusion / "
                          f"PromptIRRefFusion); first keys: {list(sd)[:5]}")
  prompt = any(k.startswith("prompt1.") for k in sd)
  arch, what = ("promptir", "PromptIRRefFusion") if prompt else ("restormer", "RestormerRefFusion")
  if "masa_enc.conv_L1.weight" not in sd:
    raise ConversionError(f"a {what.replace('RefFusion', '')} state_dict without the guidance "
                          f"encoder (masa_enc.*): load it with uir_jax.convert.{arch}")
  opts = dict(common_options(sd, what), **_masa_enc_options(sd, 4, what))
  if prompt:
    p = promptir_options(sd)
    opts.update(prompt_dims=p["prompt_dims"], prompt_sizes=p["prompt_sizes"],
                prompt_len=p["prompt_len"])
  # Heads per level: a level without backbone blocks still has its fusion blocks' heads.
  heads = list(opts["heads"])
  for lvl in range(4):
    key = f"masa_blk_enc_level{lvl + 1}.0.attn.temperature"
    if key in sd:
      heads[lvl] = int(np.prod(sd[key].shape))
  opts["heads"] = tuple(heads)
  opts["reffusion_n_blocks"] = tuple(count_blocks(sd, f"masa_blk_enc_level{lvl}")
                                     for lvl in (1, 2, 3, 4))
  if any(k.startswith("masa_blk_dec_level") for k in sd):
    opts.update(fusion="encoder+decoder",
                reffusion_n_blocks_dec=tuple(count_blocks(sd, f"masa_blk_dec_level{lvl}")
                                             for lvl in (1, 2, 3)))
  else:
    opts["fusion"] = "encoder+bottleneck"
  return arch, opts


def load_guided_nafnet(path_or_state_dict: str | os.PathLike | StateDict, *,
                       dtype=jnp.float32, trust: bool = False) -> GuidedNAFNet:
  """A `GuidedNAFNet` holding a NAFNetRefFusion checkpoint's weights."""
  sd = unwrap_network(read_state_dict(path_or_state_dict, trust=trust),
                      ("params", "params_ema", "state_dict"))
  kw = infer_options(sd)
  abstract = nnx.eval_shape(lambda: GuidedNAFNet(**kw, rngs=nnx.Rngs(0), dtype=dtype))
  flat = convert(sd, guided_nafnet_rules(), param_shapes(abstract),
                 what="NAFNetRefFusion checkpoint")
  assign(abstract, flat)
  return abstract


def load_guided(path_or_state_dict: str | os.PathLike | StateDict, *, trust: bool = False,
                dtype=jnp.float32) -> GuidedNAFNet | GuidedRestormer | GuidedPromptIR:
  """The guided network (called `net(lq, guidance)`) of an official fusion checkpoint.

  Args:
    path_or_state_dict: `.pth`/`.ckpt`/`.safetensors` file or a mapping (BasicSR, Lightning or
      plain layout).
    trust: let a PyTorch file run code while loading (only for files you trust).
    dtype: compute dtype (parameters stay float32).

  Raises:
    ConversionError naming an unknown layout, or unexpected, missing or mis-shaped keys.
  """
  sd = unwrap_state_dict(read_state_dict(path_or_state_dict, trust=trust))
  arch, kw = infer_guided(sd)
  if arch == "nafnet":
    return load_guided_nafnet(sd, dtype=dtype)
  cls, rules, ignore = ((GuidedPromptIR, promptir_rules(), PROMPTIR_UNUSED) if arch == "promptir"
                        else (GuidedRestormer, restormer_rules(), ()))
  abstract = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(0), dtype=dtype))
  return common.load_checked(abstract, sd, [*rules, *fusion_block_rules(), *masa_enc_rules(4)],
                             _REVERSE, what=f"{cls.__name__} checkpoint", ignore=ignore)


__all__ = ["fusion_block_rules", "guided_nafnet_rules", "infer_guided", "infer_options",
           "load_guided", "load_guided_nafnet", "masa_enc_rules"]

"""swz30/Restormer checkpoints -> Flax NNX `Restormer`.

    net = load_restormer("motion_deblurring.pth")      # the released {"params": state_dict}
    net = load_restormer("real_denoising.pth")         # BiasFree LayerNorm, read off the keys

Keys (`restormer_arch.py`): `patch_embed.proj.weight`, `encoder_level{1,2,3}.{i}.*`, `latent.{i}.*`,
`decoder_level{1,2,3}.{i}.*`, `refinement.{i}.*`, `down1_2.body.0.weight` (and `down2_3`, `down3_4`,
`up4_3`, `up3_2`, `up2_1`), `reduce_chan_level{2,3}.*`, `skip_conv.*` (dual-pixel), `output.*`;
inside a block `norm{1,2}.body.weight` (+ `.bias` for WithBias), `attn.temperature` [heads, 1, 1],
`attn.qkv`, `attn.qkv_dwconv`, `attn.project_out`, `ffn.project_in`, `ffn.dwconv`,
`ffn.project_out` (+ `.bias` when bias=True).

The architecture is read off the keys and shapes: dim and channels from `patch_embed`/`output`,
block counts from the indices, heads per level from the temperatures' shapes, the GDFN factor from
the hidden widths (the shortest decimal f with int(width · f) = hidden at every width), `bias` from
`output.bias`, the LayerNorm type from `norm1.body.bias`, dual-pixel from `skip_conv`. Options
given to `load_restormer` must agree with the file. Every key must be consumed and every
parameter filled with the right shape, otherwise `ConversionError` names the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert import common
from uir_jax.convert.common import (
    ConversionError,
    Rule,
    check_options,
    conv,
    conv1x1_to_linear,
    flatten,
    read_state_dict,
    unwrap_network,
)
from uir_jax.models.restormer import Restormer, hidden_features

StateDict = Mapping[str, Any]

# A transformer block's key prefix: in a sequence (`encoder_level1.0.`) or alone (PromptIR's
# `noise_level3.`).
_BLOCK = (r"(?P<b>(?:encoder_level\d|decoder_level\d|latent|refinement)\.\d+|noise_level\d)\.")
_LEVELS = {  # sequence -> level whose heads it uses (0-based), as the reference builds them
    "encoder_level1": 0, "decoder_level1": 0, "refinement": 0, "encoder_level2": 1,
    "decoder_level2": 1, "encoder_level3": 2, "decoder_level3": 2, "latent": 3,
}


def block_rules() -> list[Rule]:
  """TransformerBlock keys -> our paths (shared with PromptIR)."""
  b, d = _BLOCK, r"\g<b>."
  return [
      Rule(b + r"norm(?P<n>[12])\.body\.weight", d + r"norm\g<n>.scale"),
      Rule(b + r"norm(?P<n>[12])\.body\.bias", d + r"norm\g<n>.bias"),
      Rule(b + r"attn\.temperature", d + "attn.temperature", flatten),
      Rule(b + r"(?P<m>attn\.qkv|attn\.project_out|ffn\.project_in|ffn\.project_out)\.weight",
           d + r"\g<m>.kernel", conv1x1_to_linear),
      Rule(b + r"(?P<m>attn\.qkv_dwconv|ffn\.dwconv)\.weight", d + r"\g<m>.kernel", conv),
      Rule(b + r"(?P<m>attn\.qkv|attn\.qkv_dwconv|attn\.project_out|ffn\.project_in|ffn\.dwconv|"
           r"ffn\.project_out)\.bias", d + r"\g<m>.bias"),
  ]


def trunk_rules() -> list[Rule]:
  """The U-Net around the blocks (shared with PromptIR)."""
  return [
      Rule(r"patch_embed\.proj\.weight", "patch_embed.kernel", conv),
      Rule(r"(?P<m>down1_2|down2_3|down3_4|up4_3|up3_2|up2_1)\.body\.0\.weight",
           r"\g<m>.conv.kernel", conv),
      Rule(r"(?P<m>reduce_chan_level\d|reduce_noise_level\d|skip_conv)\.weight",
           r"\g<m>.kernel", conv1x1_to_linear),
      Rule(r"(?P<m>reduce_chan_level\d|reduce_noise_level\d|skip_conv)\.bias", r"\g<m>.bias"),
      Rule(r"output\.weight", "output.kernel", conv),
      Rule(r"output\.bias", "output.bias"),
  ]


def restormer_rules() -> list[Rule]:
  return block_rules() + trunk_rules()


# Our parameter path -> the PyTorch key, for errors about missing weights.
_REVERSE = [
    (r"\.norm([12])\.scale$", r".norm\1.body.weight"),
    (r"\.norm([12])\.bias$", r".norm\1.body.bias"),
    (r"^(down\d_\d|up\d_\d)\.conv\.kernel$", r"\1.body.0.weight"),
    (r"^patch_embed\.kernel$", "patch_embed.proj.weight"),
    (r"\.kernel$", ".weight"), (r"\.scale$", ".weight"),
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


def shape_of(sd: StateDict, key: str, what: str) -> tuple[int, ...]:
  if key not in sd:
    raise ConversionError(f"not a {what} state_dict: key {key!r} is missing "
                          f"(first keys: {list(sd)[:5]})")
  return tuple(sd[key].shape)


def count_blocks(sd: StateDict, seq: str) -> int:
  idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(seq) + r"\.(\d+)\.", k))}
  if idx and idx != set(range(max(idx) + 1)):
    raise ConversionError(f"{seq}: block indices {sorted(idx)} are not 0..{max(idx)}")
  return max(idx) + 1 if idx else 0


def infer_heads(sd: StateDict, levels: Mapping[str, int] = _LEVELS) -> tuple[int, ...]:
  """Heads per level from `<seq>.<i>.attn.temperature` [heads, 1, 1] (1 for a level without
  blocks)."""
  heads: dict[int, tuple[int, str]] = {}
  for k, v in sd.items():
    m = re.fullmatch(r"(\w+?)\.\d+\.attn\.temperature", k)
    if not m or m.group(1) not in levels:
      continue
    lvl, n = levels[m.group(1)], int(np.prod(v.shape))
    if lvl in heads and heads[lvl][0] != n:
      raise ConversionError(f"{k} has {n} heads but {heads[lvl][1]} has {heads[lvl][0]}; "
                            f"blocks of one level share their head count")
    heads.setdefault(lvl, (n, k))
  return tuple(heads[i][0] if i in heads else 1 for i in range(4))


def infer_ffn_factor(widths: Iterable[tuple[int, int, str]]) -> float:
  """The GDFN factor f with int(width · f) == hidden for every (width, hidden, key): the shortest
  decimal in the intersection of the intervals [hidden/width, (hidden+1)/width)."""
  widths = list(widths)
  if not widths:
    return 2.66  # no blocks at all: the factor shapes nothing
  lo = max(h / w for w, h, _ in widths)
  hi = min((h + 1) / w for w, h, _ in widths)
  ok: Callable[[float], bool] = lambda f: all(hidden_features(w, f) == h for w, h, _ in widths)
  if lo < hi:
    mid = (lo + hi) / 2
    for digits in range(1, 9):
      if ok(f := round(mid, digits)):
        return f
  w, h, key = widths[0]
  raise ConversionError(f"no single ffn_expansion_factor gives the GDFN hidden widths of this "
                        f"checkpoint (e.g. {key}: width {w}, hidden {h})")


def ffn_widths(sd: StateDict) -> list[tuple[int, int, str]]:
  """(block width, GDFN hidden, key) for every `ffn.project_out.weight` [width, hidden, 1, 1]."""
  return [(int(v.shape[0]), int(v.shape[1]), k) for k, v in sd.items()
          if k.endswith("ffn.project_out.weight")]


def common_options(sd: StateDict, what: str) -> dict[str, Any]:
  """Options shared by Restormer and PromptIR."""
  dim, cin = shape_of(sd, "patch_embed.proj.weight", what)[:2]
  cout = shape_of(sd, "output.weight", what)[0]
  num_blocks = tuple(count_blocks(sd, s) for s in
                     ("encoder_level1", "encoder_level2", "encoder_level3", "latent"))
  return dict(
      inp_channels=cin, out_channels=cout, dim=dim, num_blocks=num_blocks,
      num_refinement_blocks=count_blocks(sd, "refinement"), heads=infer_heads(sd),
      ffn_expansion_factor=infer_ffn_factor(ffn_widths(sd)), bias="output.bias" in sd,
      layernorm_type=("WithBias" if any(k.endswith("norm1.body.bias") for k in sd)
                      else "BiasFree"))


def infer_options(sd: StateDict) -> dict[str, Any]:
  """Restormer constructor options implied by a state_dict's keys and shapes."""
  if any(k.startswith("prompt1.") for k in sd):
    raise ConversionError("this is a PromptIR state_dict (it has prompt1.*): use "
                          "uir_jax.convert.promptir.load_promptir")
  return dict(common_options(sd, "Restormer"), dual_pixel_task="skip_conv.weight" in sd)


def resolve_options(sd: StateDict, inferred: dict[str, Any], options: dict[str, Any],
                    model: str) -> dict[str, Any]:
  """The inferred options, checked against the caller's. A given ffn_expansion_factor is kept
  when it yields the file's hidden widths (2.66 and 2.659 may both do)."""
  options = dict(options)
  f = options.pop("ffn_expansion_factor", None)
  check_options(options, inferred, model)
  kw = dict(inferred)
  if f is not None:
    bad = [k for w, h, k in ffn_widths(sd) if hidden_features(w, f) != h]
    if bad:
      raise ConversionError(f"option ffn_expansion_factor={f!r} disagrees with the checkpoint "
                            f"({bad[0]} has hidden width {sd[bad[0]].shape[1]})")
    kw["ffn_expansion_factor"] = f
  return kw


def unwrap_state_dict(ckpt: StateDict) -> dict[str, Any]:
  """The network inside a file: under "params" (the releases), "params_ema" or "state_dict"
  (Lightning; its "net." prefix is stripped), or a plain state_dict; "module." is stripped."""
  sd = unwrap_network(ckpt, ("params", "params_ema", "state_dict"))
  if any(k.startswith("net.") for k in sd):
    rest = [k for k in sd if not k.startswith("net.")]
    if rest:
      raise ConversionError(f"a Lightning state_dict holds more than the network `net.`: "
                            f"{rest[:5]}")
    sd = {k[4:]: v for k, v in sd.items()}
  return sd


def build_and_load(cls: type, sd: StateDict, kw: dict[str, Any], rules: list[Rule], *,
                   ignore: Iterable[str] = (), dtype=jnp.float32) -> nnx.Module:
  """Builds `cls(**kw)` abstractly, checks the keys, converts and assigns the weights."""
  what = f"{cls.__name__} checkpoint"
  abstract = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(0), dtype=dtype))
  return common.load_checked(abstract, sd, rules, _REVERSE, what=what, ignore=ignore)


def load_restormer(path_or_state_dict: str | os.PathLike | StateDict, *, dtype=jnp.float32,
                   **options) -> Restormer:
  """A `Restormer` holding the weights of a swz30/Restormer checkpoint.

  Args:
    path_or_state_dict: `.pth` file (the releases are {"params": state_dict}) or a mapping.
    dtype: compute dtype of the returned model (parameters stay float32).
    **options: constructor options (`dim`, `heads`, `layernorm_type`, ...); each one given must
      agree with the file.

  Raises:
    ConversionError naming unexpected, missing or mis-shaped PyTorch keys, or an option that
    disagrees with the file.
  """
  sd = unwrap_state_dict(read_state_dict(path_or_state_dict))
  kw = resolve_options(sd, infer_options(sd), options, "Restormer")
  return build_and_load(Restormer, sd, kw, restormer_rules(), dtype=dtype)


__all__ = ["ConversionError", "expected_keys", "infer_options", "load_restormer",
           "restormer_rules", "torch_key", "unwrap_state_dict"]

"""va1shn9v/PromptIR checkpoints -> Flax NNX `PromptIR`.

    net = load_promptir("model.ckpt")     # the released Lightning checkpoint ("state_dict", "net.")

The keys are Restormer's (`uir_jax/convert/restormer.py`) plus `prompt{1,2,3}.prompt_param`
[1, len, dim, size, size], `prompt{k}.linear_layer.*`, `prompt{k}.conv3x3.weight`,
`noise_level{k}.*` (one TransformerBlock each) and `reduce_noise_level{k}.*`. The official model
also holds `chnl_reduce{1,2,3}.*` and `reduce_noise_channel_{1,2,3}.*`, which its forward never
uses: they are dropped by name (and only those).

Prompt widths, sizes and count come from `prompt_param`'s shape; the rest is read as for Restormer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from uir_jax.convert.common import ConversionError, Rule, conv, dense_rules, read_state_dict
from uir_jax.convert.restormer import (
    block_rules,
    build_and_load,
    common_options,
    resolve_options,
    shape_of,
    trunk_rules,
    unwrap_state_dict,
)
from uir_jax.models.promptir import PromptIR

StateDict = Mapping[str, Any]

# Built by the official PromptIR, unused by its forward.
UNUSED = (r"(?:chnl_reduce[123]|reduce_noise_channel_[123])\.(?:weight|bias)",)


def _prompt_param(x: np.ndarray) -> np.ndarray:
  """[1, len, dim, size, size] -> [len, size, size, dim]."""
  if x.ndim != 5 or x.shape[0] != 1:
    raise ConversionError(f"prompt_param must be [1, len, dim, size, size], got {x.shape}")
  return np.transpose(x[0], (0, 2, 3, 1))


def promptir_rules() -> list[Rule]:
  return [
      *block_rules(), *trunk_rules(),
      Rule(r"prompt(?P<k>[123])\.prompt_param", r"prompt\g<k>.prompt_param", _prompt_param),
      *dense_rules(r"prompt(?P<k>[123])\.linear_layer", r"prompt\g<k>.linear_layer"),
      Rule(r"prompt(?P<k>[123])\.conv3x3\.weight", r"prompt\g<k>.conv3x3.kernel", conv),
  ]


def infer_options(sd: StateDict) -> dict[str, Any]:
  """PromptIR constructor options implied by a state_dict's keys and shapes."""
  opts = common_options(sd, "PromptIR")
  shapes = [shape_of(sd, f"prompt{k}.prompt_param", "PromptIR") for k in (1, 2, 3)]
  for k, s in enumerate(shapes, 1):
    if len(s) != 5 or s[0] != 1 or s[3] != s[4]:
      raise ConversionError(f"prompt{k}.prompt_param must be [1, len, dim, size, size], got {s}")
  if len({s[1] for s in shapes}) != 1:
    raise ConversionError(f"the three prompts have different lengths: {[s[1] for s in shapes]}")
  return dict(opts, decoder=True, prompt_dims=tuple(s[2] for s in shapes),
              prompt_sizes=tuple(s[3] for s in shapes), prompt_len=shapes[0][1])


def load_promptir(path_or_state_dict: str | os.PathLike | StateDict, *, dtype=jnp.float32,
                  **options) -> PromptIR:
  """A `PromptIR` holding the weights of a va1shn9v/PromptIR checkpoint.

  Args:
    path_or_state_dict: the Lightning `.ckpt` ({"state_dict": {"net.<key>": ...}}), a plain
      state_dict file, or a mapping.
    dtype: compute dtype of the returned model (parameters stay float32).
    **options: constructor options; each one given must agree with the file.

  Raises:
    ConversionError naming unexpected, missing or mis-shaped PyTorch keys, or an option that
    disagrees with the file.
  """
  sd = unwrap_state_dict(read_state_dict(path_or_state_dict))
  kw = resolve_options(sd, infer_options(sd), options, "PromptIR")
  return build_and_load(PromptIR, sd, kw, promptir_rules(), ignore=UNUSED, dtype=dtype)


__all__ = ["UNUSED", "infer_options", "load_promptir", "promptir_rules"]

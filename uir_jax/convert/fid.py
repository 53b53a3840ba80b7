"""FID Inception-v3 weights from a PyTorch file -> `uir_jax.metrics.fid.InceptionV3`.

Accepted inputs (nothing is downloaded; the path is the user's):
  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TensorFlow FID graph's weights,
    ported; keys `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ..., and a
    1008-way `fc` that FID does not use), or any state_dict of `fid_inception_v3()`;
  * the state_dict of pytorch-fid's `InceptionV3([3])` wrapper (`blocks.{0..3}.{i}.*`).

Every key is consumed and every parameter and BatchNorm statistic filled with its shape checked
(`ConversionError` otherwise). torchvision's ImageNet Inception-v3 has the same block names but
other weights and a 1000-way head (and AuxLogits): it is refused unless `allow_non_fid=True`,
since its "FID" would not be comparable with anyone's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from uir_jax.convert.common import (
    ConversionError,
    Rule,
    conv,
    convert,
    flat_params,
    read_state_dict,
    unflatten,
)
from uir_jax.metrics.fid import InceptionV3

# pytorch-fid's InceptionV3 wrapper: blocks.<b>.<i> -> the torchvision module it holds (the max
# pools in between have no parameters).
_WRAPPER_BLOCKS = {
    0: {0: "Conv2d_1a_3x3", 1: "Conv2d_2a_3x3", 2: "Conv2d_2b_3x3"},
    1: {0: "Conv2d_3b_1x1", 1: "Conv2d_4a_3x3"},
    2: {i: f"Mixed_{n}" for i, n in enumerate(("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"))},
    3: {0: "Mixed_7a", 1: "Mixed_7b", 2: "Mixed_7c"},
}
_FID_CLASSES = 1008  # the 2015 graph's head (1000 ImageNet classes + 8 unused)
_VARIABLES = (nnx.Param, nnx.BatchStat)


def inception_rules() -> list[Rule]:
  # Module names are torchvision's on both sides; only the leaf names change.
  return [
      Rule(r"(.+)\.conv\.weight", r"\1.conv.kernel", conv),
      Rule(r"(.+)\.bn\.weight", r"\1.bn.scale"),
      Rule(r"(.+)\.bn\.bias", r"\1.bn.bias"),
      Rule(r"(.+)\.bn\.running_mean", r"\1.bn.mean"),
      Rule(r"(.+)\.bn\.running_var", r"\1.bn.var"),
  ]


def _unwrap_blocks(sd: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in sd.items():
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m is None:
      out[key] = value
      continue
    name = _WRAPPER_BLOCKS.get(int(m[1]), {}).get(int(m[2]))
    if name is None:
      raise ConversionError(f"unexpected key {key!r} in the pytorch-fid InceptionV3 state_dict")
    out[f"{name}.{m[3]}"] = value
  return out


def _check_fid_weights(sd: Mapping[str, Any]) -> None:
  aux = [k for k in sd if k.startswith("AuxLogits.")]
  fc = sd.get("fc.weight")
  if aux or (fc is not None and tuple(fc.shape)[0] != _FID_CLASSES):
    what = f"AuxLogits keys ({aux[0]!r}, ...)" if aux else f"an fc of shape {tuple(fc.shape)}"
    raise ConversionError(
        f"this checkpoint has {what}: it looks like torchvision's ImageNet Inception-v3, not the "
        "FID weights (pytorch-fid's pt_inception-2015-12-05-*.pth, fc of 1008 classes); FIDs "
        "from it are not comparable with published ones (pass allow_non_fid=True to use it "
        "anyway)")


def load_inception(path_or_state_dict: Any, *, allow_non_fid: bool = False,
                   trust: bool = False) -> InceptionV3:
  """The FID Inception-v3 from PyTorch weights (see the module docstring for the inputs);
  `trust=True` reads a PyTorch file with plain pickle, which runs code from it."""
  sd = _unwrap_blocks(read_state_dict(path_or_state_dict, trust=trust))
  if not allow_non_fid:
    _check_fid_weights(sd)
  # Built abstractly: initialising 22M random parameters eagerly takes ~40 s on a CPU.
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  state = nnx.state(model, _VARIABLES)
  current = flat_params(nnx.to_pure_dict(state))
  flat = convert(sd, inception_rules(), {k: tuple(v.shape) for k, v in current.items()},
                 ignore=[r".*\.num_batches_tracked", r"fc\.(weight|bias)", r"AuxLogits\..*"],
                 what="FID Inception checkpoint")
  # `assign` writes nnx.Param only; the BatchNorm running statistics are nnx.BatchStat.
  nnx.replace_by_pure_dict(state, unflatten({k: jnp.asarray(v, jnp.float32)
                                             for k, v in flat.items()}))
  nnx.update(model, state)
  return model

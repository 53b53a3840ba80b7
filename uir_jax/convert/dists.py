"""DISTS weights from PyTorch files -> `uir_jax.metrics.dists.DISTS`.

Accepted inputs (nothing is downloaded; paths are the user's):
  * a torchvision VGG16 state_dict (`features.{0,2,5,...,28}.weight/bias`; the classifier is
    ignored), e.g. torchvision's `vgg16-397923af.pth`, plus the learned alpha/beta: `weights=` a
    path to `dists-pytorch`'s `weights.pt` or, by default, that file from the installed
    `DISTS_pytorch` package (it ships inside the wheel);
  * a whole `DISTS_pytorch.DISTS()` state_dict (`stage{1..5}.{i}.weight/bias`, `alpha`, `beta`, and
    the `mean` / `std` / L2-pool `filter` buffers, which are checked against the constants).

Every key is consumed and every parameter filled with its shape checked (`ConversionError`
otherwise).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from uir_jax.convert.common import (
    ConversionError,
    Rule,
    assign,
    conv,
    convert,
    flatten,
    param_shapes,
    read_state_dict,
    to_numpy,
)
from uir_jax.metrics.dists import DISTS, IMAGENET_MEAN, IMAGENET_STD, STAGES, l2pool_filter


def dists_rules() -> list[Rule]:
  rules = []
  for n, idx in enumerate(i for stage in STAGES for i in stage):
    src = rf"(?:features|stage[1-5])\.{idx}"
    rules += [Rule(src + r"\.weight", f"convs.{n}.kernel", conv),
              Rule(src + r"\.bias", f"convs.{n}.bias")]
  return rules + [Rule("alpha", "alpha", flatten), Rule("beta", "beta", flatten)]


def _installed_weights() -> str:
  spec = importlib.util.find_spec("DISTS_pytorch")
  if spec is None or spec.origin is None:
    raise ConversionError("this is a VGG16 state_dict without the DISTS alpha/beta: pass weights= "
                          "(dists-pytorch's weights.pt) or pip install dists-pytorch")
  return os.path.join(os.path.dirname(spec.origin), "weights.pt")


def _check_buffers(sd: Mapping[str, Any]) -> None:
  for key, expected in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
    if key in sd and not np.allclose(to_numpy(sd[key]).reshape(-1), expected, atol=1e-6):
      raise ConversionError(f"{key} is {to_numpy(sd[key]).reshape(-1)}, expected {expected}")
  window = l2pool_filter()
  for key in (k for k in sd if k.endswith(".filter")):
    got = to_numpy(sd[key])
    if got.ndim != 4 or not np.allclose(got, window[None, None], atol=1e-7):
      raise ConversionError(f"{key} is not the DISTS L2-pool window (3x3 Hanning / 16)")


def load_dists(vgg: Any, weights: Any = None, *, trust: bool = False) -> DISTS:
  """DISTS from PyTorch weights (see the module docstring for the inputs); `trust=True` reads
  PyTorch files with plain pickle, which runs code from them."""
  sd: dict[str, Any] = dict(read_state_dict(vgg, trust=trust))
  has_weights = "alpha" in sd or "beta" in sd
  if not has_weights:
    extra = read_state_dict(weights if weights is not None else _installed_weights(), trust=trust)
    unknown = sorted(set(extra) - {"alpha", "beta"})
    if unknown:
      raise ConversionError(f"the DISTS weights file holds keys other than alpha/beta: {unknown}")
    sd.update(extra)
  elif weights is not None:
    raise ConversionError("the state_dict already holds DISTS alpha/beta; do not pass weights= too")
  _check_buffers(sd)
  model = nnx.eval_shape(lambda: DISTS(rngs=nnx.Rngs(0)))  # abstract: no random init
  flat = convert(sd, dists_rules(), param_shapes(model),
                 ignore=[r"mean", r"std", r"stage[2-5]\.\d+\.filter", r"classifier\..*"],
                 what="DISTS checkpoint")
  assign(model, flat)
  return model

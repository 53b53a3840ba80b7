"""LPIPS (AlexNet) weights from PyTorch files -> `uir_jax.metrics.lpips.LPIPS`.

Accepted inputs (nothing is downloaded; paths are the user's):
  * a whole `lpips.LPIPS(net='alex')` state_dict, e.g. written once (where torchvision can fetch
    AlexNet) with `torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')`
    (keys `net.slice{1..5}.{i}.weight/bias`, `lin{0..4}.model.1.weight`, scaling buffers);
  * a torchvision AlexNet state_dict (`features.{0,3,6,8,10}.*`, the classifier is ignored) plus the
    lin heads: `lin=` a path to the `lpips` package's `weights/v0.1/alex.pth`, or, by default, that
    file from an installed `lpips` package.

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
    conv1x1_to_linear,
    convert,
    param_shapes,
    read_state_dict,
    to_numpy,
)
from uir_jax.metrics.lpips import _SCALE, _SHIFT, LPIPS

# torchvision `features` index of each conv, and the lpips package's slice holding it.
_FEATURE_INDEX = (0, 3, 6, 8, 10)
_SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def lpips_rules() -> list[Rule]:
  rules = []
  for n, idx in enumerate(_FEATURE_INDEX):
    for src in (rf"net\.slice{_SLICE[idx]}\.{idx}", rf"features\.{idx}"):
      rules += [Rule(src + r"\.weight", f"convs.{n}.kernel", conv),
                Rule(src + r"\.bias", f"convs.{n}.bias")]
  # `model.1` behind a Dropout (the default), `model.0` for LPIPS(use_dropout=False).
  rules.append(Rule(r"lin(\d)\.model\.[01]\.weight", r"lins.\1.kernel", conv1x1_to_linear))
  return rules


def _installed_lin_weights() -> str:
  spec = importlib.util.find_spec("lpips")
  if spec is None or spec.origin is None:
    raise ConversionError("this is an AlexNet state_dict without LPIPS heads: pass lin= (the lpips "
                          "package's weights/v0.1/alex.pth) or a whole LPIPS state_dict")
  return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "alex.pth")


def load_lpips(path_or_state_dict: Any, lin: Any = None, *, trust: bool = False) -> LPIPS:
  """An LPIPS(alex) metric from PyTorch weights (see the module docstring for the inputs);
  `trust=True` reads PyTorch files with plain pickle, which runs code from them."""
  sd: Mapping[str, Any] = dict(read_state_dict(path_or_state_dict, trust=trust))
  has_lins = any(k.startswith("lin") for k in sd)
  if not has_lins:
    sd.update(read_state_dict(lin if lin is not None else _installed_lin_weights(), trust=trust))
  elif lin is not None:
    raise ConversionError("the state_dict already holds LPIPS lin heads; do not pass lin= too")
  for name, expected in (("shift", _SHIFT), ("scale", _SCALE)):
    key = f"scaling_layer.{name}"
    if key in sd and not np.allclose(to_numpy(sd[key]).reshape(-1), expected, atol=1e-6):
      raise ConversionError(f"{key} is {to_numpy(sd[key]).reshape(-1)}, expected {expected} "
                            "(LPIPS v0.1)")
  model = LPIPS(rngs=nnx.Rngs(0))
  flat = convert(sd, lpips_rules(), param_shapes(model),
                 # `lins.N` are the ModuleList's aliases of `linN` (same tensors).
                 ignore=[r"scaling_layer\.(shift|scale)", r"classifier\..*",
                         r"lins\.\d\.model\.[01]\.weight"],
                 what="LPIPS checkpoint")
  assign(model, flat)
  return model

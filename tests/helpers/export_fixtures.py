"""Random-weight checkpoints in the released layouts, for the export, restore and notebook tests.

The DA-CLIP file is written from a Flax `DaCLIP` by running the converter's rule table backwards
(no open_clip needed); `load_daclip` of it must give back the same weights, which
`test_daclip_file_round_trips` checks. The U-Net file comes from the PyTorch reference in
`torch_unet.py`, as in tests/cli/test_cli.py.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

# Tiny settings shared by the tests: 2-level U-Nets (padding multiple 4) and the tiny CLIP (embed
# 64). The reference's cross-attention blocks need widths that are multiples of 32 (GroupNorm(32)),
# hence the conditioned U-Net's ch_mult (2, 2) at nf 16.
UNET_OPTIONS = dict(nf=8, ch_mult=(1, 2))
CONDITIONED_UNET_OPTIONS = dict(nf=16, ch_mult=(2, 2), context_dim=64)
CLIP_CONFIG = "tiny"


def tiny_daclip(seed: int = 0):
  from uir_jax.models.clip import get_config
  from uir_jax.models.daclip import DaCLIP

  return DaCLIP(get_config(CLIP_CONFIG), rngs=nnx.Rngs(seed))


def daclip_state_dict(model) -> dict[str, np.ndarray]:
  """A Flax DaCLIP as the PyTorch DA-CLIP state_dict `load_daclip` reads (inverse of its rules)."""
  from uir_jax.convert import common
  from uir_jax.convert.clip import daclip_keys, daclip_rules

  flat = {k: np.asarray(v) for k, v in common.flat_params(nnx.state(model, nnx.Param)).items()}
  rules = daclip_rules()
  out = {}
  for key in daclip_keys(model.config):
    rule, match = next((r, m) for r in rules if (m := r.match(key)))
    targets = rule.target if isinstance(rule.target, tuple) else (rule.target,)
    parts = [flat[match.expand(t)] for t in targets]
    if len(parts) > 1:  # fused q|k|v rows: undo the split (and the transpose of kernels)
      out[key] = np.concatenate([p.T if p.ndim == 2 else p for p in parts], axis=0)
    elif rule.transform is common.linear:
      out[key] = parts[0].T
    elif rule.transform is common.conv:
      out[key] = np.transpose(parts[0], (3, 2, 0, 1))
    elif rule.transform is common.identity:
      out[key] = parts[0]
    else:
      raise AssertionError(f"no inverse for the transform of {key}")
  return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # (0-d stays 0-d)


def save_daclip(path, seed: int = 0):
  """Writes a random tiny DA-CLIP as a `.safetensors` state_dict; returns the Flax model."""
  from safetensors.numpy import save_file

  model = tiny_daclip(seed)
  save_file(daclip_state_dict(model), str(path))
  return model


def save_torch_unet(path, *, conditioned: bool, seed: int = 0, safetensors: bool = False):
  """A random U-Net state_dict from the PyTorch reference (`.pth`, or `.safetensors`)."""
  import pytest

  torch = pytest.importorskip("torch")
  torch_unet = pytest.importorskip("torch_unet")
  opts = (dict(CONDITIONED_UNET_OPTIONS) if conditioned else dict(UNET_OPTIONS, context_dim=0))
  opts.update(use_degra_context=conditioned, use_image_context=conditioned)
  model = torch_unet.randomize_(torch_unet.ConditionalUNet(**opts), seed=seed)
  if safetensors:
    from safetensors.numpy import save_file

    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(path))
  else:
    torch.save(model.state_dict(), path)
  return path


def save_photo(path, height: int, width: int, seed: int = 0, mode: str = "RGB"):
  from PIL import Image

  rng = np.random.default_rng(seed)
  if mode == "I;16":
    Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path)
  else:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
  return path

"""Guided restoration of photos: a guided network (`net(lq, guidance)`) behind the restorer
interface the photo loop and `uir-jax restore` / `eval` share.

    restorer = GuidedRestorer.from_checkpoint("NAFNetRefFusion.pth")   # official weights (any arch)
    restorer = load_run("runs/tdr_nafnet")                              # a trainer "tdr" run (EMA)
    restored = restorer(lq, guidance=guidance)      # [1, H, W, 3] and [1, Hg, Wg, 3] in [0, 1]

Guidance size rule: any size and aspect ratio is accepted, and the guidance is used whole at its
own resolution (as the official test passes its 512² guidance): photo and guidance are each
zero-padded on the bottom/right to a multiple of the network's `pad_multiple` (16 · lr_block_size,
128 for the released configs), and the coarse search looks for every 128-pixel block of the photo
anywhere in the guidance. Nothing is resized: the matcher compares features at one pixel scale,
so a guidance that shows the scene at about the photo's scale matches best.

Compilation: one jitted function per graphdef; photo and guidance are zero-padded here to the
network's multiple (what the network does itself, so results are identical), so photos of many
sizes share one compilation per padded size pair.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

TRAINER = "tdr"  # config.trainer of this system's training runs

__all__ = ["TRAINER", "GuidedRestorer", "load_run", "run_trainer"]


@functools.cache
def _guided_fn(graphdef: Any):
  @jax.jit
  def restore(state, lq, guidance):
    return jnp.clip(nnx.merge(graphdef, state)(lq, guidance), 0.0, 1.0)

  return restore


def _pad(x: np.ndarray, m: int) -> np.ndarray:
  ph, pw = -x.shape[1] % m, -x.shape[2] % m
  return np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x


def _images(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"expected {name} as RGB images [B, H, W, 3], got shape {x.shape}")
  return x


class GuidedRestorer:
  """Photos + their guidance -> restored photos, one forward pass of a guided network.

  The interface of the system restorers (`restorer(images, key, embeddings)`) with the guidance
  as a keyword; `key` and `embeddings` are unused (no sampler, no DA-CLIP), `words` is empty.
  """

  words: list[str] = []
  needs_guidance = True

  def __init__(self, net: nnx.Module):
    self.net = net
    self._graphdef, self._state = nnx.split(net)
    self.pad_multiple = int(getattr(net, "pad_multiple", 1))

  @classmethod
  def from_checkpoint(cls, path: str, *, trust: bool = False) -> GuidedRestorer:
    """From an official guided-restoration checkpoint (NAFNet / Restormer / PromptIR RefFusion,
    `.pth` or its `.safetensors`, `convert.load_guided`); `trust=True` reads a PyTorch file with
    plain pickle (runs code from it)."""
    from uir_jax.convert.common import checkpoint_errors
    from uir_jax.systems.textual_deg_removal.convert import load_guided

    with checkpoint_errors(path):
      return cls(load_guided(path, trust=trust))

  def __call__(self, images: Any, key: Any = None, embeddings: Any = None, *,
               guidance: Any) -> Array:
    """images [B, H, W, 3] and guidance [B, Hg, Wg, 3] in [0, 1] -> [B, H, W, 3] in [0, 1]."""
    del key, embeddings
    images, guidance = _images(images, "photos"), _images(guidance, "guidance")
    if images.shape[0] != guidance.shape[0]:
      raise ValueError(f"{images.shape[0]} photo(s) but {guidance.shape[0]} guidance image(s)")
    h, w = images.shape[1:3]
    m = self.pad_multiple
    out = _guided_fn(self._graphdef)(self._state, _pad(images, m), _pad(guidance, m))
    return out[:, :h, :w]


def run_trainer(workdir: str) -> str | None:
  """config.trainer of the training run in `workdir` (None: no config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("trainer")


def load_run(workdir: str, step: int | None = None) -> GuidedRestorer:
  """The guided network a trainer "tdr" run trained (`config.model` = {arch, options}), with the
  EMA weights of checkpoint `step` (default: the latest). ValueError / FileNotFoundError name the
  run when it is not one."""
  import ml_collections

  from uir_jax.checkpoint import model_from_run, read_training_run
  from uir_jax.systems.textual_deg_removal.train import build_model

  config, state = read_training_run(workdir, step)
  if config.get("trainer") != TRAINER:
    raise ValueError(f"{workdir}: a {config.get('trainer')!r} run, not a guided restoration "
                     f"(trainer {TRAINER!r}) run")
  cfg = ml_collections.ConfigDict(config)
  net = model_from_run(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), state)
  return GuidedRestorer(net)

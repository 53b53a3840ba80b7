"""Rewrite a PyTorch checkpoint as a plain `.safetensors` state_dict that uir-jax reads without
torch (`uir-jax convert`).

    kind = to_safetensors("daclip_ViT-B-32.pt", "daclip_ViT-B-32.safetensors")   # -> "daclip"

The network's state_dict is taken out of its container the way the matching loader does it
(training-checkpoint wrappers, optimizer state and a DataParallel "module." prefix dropped), then
loaded once through that loader (`load_daclip`, `load_clip`, `load_denoiser`, `load_lpips`) so a
file that would not load later is refused now, and written as float32 arrays with the kind and the
source file name in the metadata. Every loader accepts the result (`read_state_dict` reads
.safetensors with numpy only), so restoring on a machine without torch only needs this one-time
step where torch is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from uir_jax.convert.common import ConversionError, checkpoint_errors, read_state_dict, to_numpy

KINDS = ("daclip", "clip", "denoiser", "lpips")


def _loaders() -> dict[str, tuple[Callable[[Mapping], dict], Callable[[Mapping], Any]]]:
  """kind -> (unwrap: file contents -> network state_dict, load: state_dict -> model)."""
  from uir_jax.convert import clip, lpips
  from uir_jax.convert.denoiser import denoiser_architecture, load_denoiser

  def unwrap_denoiser(ckpt):
    return denoiser_architecture(ckpt)[1]

  return {
      "daclip": (clip.unwrap_checkpoint, clip.load_daclip),
      "clip": (clip.unwrap_checkpoint, clip.load_clip),
      "denoiser": (unwrap_denoiser, load_denoiser),
      "lpips": (dict, lpips.load_lpips),
  }


def detect_kind(ckpt: Mapping[str, Any]) -> str:
  """Which model a checkpoint holds, from its key names (see KINDS)."""
  from uir_jax.convert.clip import unwrap_checkpoint

  try:
    keys = list(unwrap_checkpoint(ckpt))
  except ConversionError:
    keys = list(ckpt)
  if any(k.startswith("clip.") for k in keys) and any(k.startswith("visual_control") for k in keys):
    return "daclip"
  if any(k.startswith(("visual.", "vision_model.")) for k in keys):
    return "clip"
  if any(k.startswith(("net.slice", "lin0.model")) for k in keys):
    return "lpips"
  return "denoiser"  # the denoiser loaders name what they miss if it is not one either


def to_safetensors(src: Any, dest: str, kind: str | None = None, *, trust: bool = False) -> str:
  """Writes the network state_dict of `src` (a path or a mapping) to `dest`; returns its kind.

  `trust=True` reads a PyTorch `src` with plain pickle, which runs code from the file (see
  `read_state_dict`); the written file holds arrays only."""
  from safetensors.numpy import save_file

  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not str(dest).endswith(".safetensors"):
    raise ValueError(f"output must be a .safetensors file, got {dest}")
  with checkpoint_errors(src):  # a refusal names the file
    kind, arrays = _network_arrays(read_state_dict(src, trust=trust), kind)
  source = os.path.basename(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else "mapping"
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  tmp = f"{dest}.tmp"
  save_file(arrays, tmp, metadata={"format": "uir-jax state_dict", "kind": kind,
                                   "source": source})
  os.replace(tmp, dest)  # never a half-written file under the final name
  return kind


def _network_arrays(ckpt: Mapping[str, Any], kind: str | None) -> tuple[str, dict[str, Any]]:
  """(kind, the network's state_dict as float arrays), checked by loading it once."""
  kind = kind or detect_kind(ckpt)
  unwrap, load = _loaders()[kind]
  sd = unwrap(ckpt)
  arrays = {}
  for key, value in sd.items():
    if not (hasattr(value, "shape") or isinstance(value, (int, float, np.number))):
      raise ConversionError(f"{kind} state_dict entry {key!r} is not a tensor ({type(value)})")
    arrays[key] = np.array(to_numpy(value), order="C")  # (ascontiguousarray makes 0-d 1-d)
  load(arrays)  # refuse now what would not load later
  return kind, arrays

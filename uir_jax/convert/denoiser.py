"""Restoration networks from PyTorch checkpoints, whatever their architecture: the one place that
tells a denoiser checkpoint's architecture from its keys (an IR-SDE ConditionalUNet, an IR-SDE
ConditionalNAFNet, or a direct-regression NAFNet)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx


def denoiser_architecture(ckpt: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(model name for `models.registry`: "unet" | "cnafnet" | "nafnet", the network's state_dict)
  of a checkpoint (a state_dict or a training checkpoint that wraps one)."""
  from uir_jax.convert import nafnet, unet

  keys = nafnet.unwrap_state_dict(ckpt)
  if "intro.weight" in keys:
    return ("cnafnet" if "time_mlp.1.weight" in keys else "nafnet"), keys
  return "unet", unet.unwrap_state_dict(ckpt)


def denoiser_spec(ckpt: Mapping[str, Any]) -> dict[str, Any]:
  """{"name", "options"}: the registry name and constructor options of a checkpoint's network."""
  from uir_jax.convert import nafnet, unet

  name, sd = denoiser_architecture(ckpt)
  return {"name": name, "options": (unet if name == "unet" else nafnet).infer_options(sd)}


def load_denoiser(path_or_state_dict: Any, *, trust: bool = False) -> nnx.Module:
  """A ConditionalUNet or ConditionalNAFNet from a PyTorch state_dict (file or mapping).

  `trust=True` reads a PyTorch file with plain pickle, which runs code from the file (see
  `read_state_dict`)."""
  from uir_jax.convert import nafnet, unet
  from uir_jax.convert.common import ConversionError, read_state_dict

  sd = read_state_dict(path_or_state_dict, trust=trust)
  name, _ = denoiser_architecture(sd)
  if name == "nafnet":
    raise ConversionError("this NAFNet checkpoint has no time embedding: it is a direct "
                          "regression model, not an IR-SDE denoiser (use load_nafnet and call "
                          "it on the degraded image)")
  return nafnet.load_nafnet(sd) if name == "cnafnet" else unet.load_unet(sd)

"""Loading an IR-SDE denoiser checkpoint whatever its architecture (U-Net or NAFNet)."""

from __future__ import annotations

from typing import Any

from flax import nnx


def load_denoiser(path_or_state_dict: Any, *, trust: bool = False) -> nnx.Module:
  """A ConditionalUNet or ConditionalNAFNet from a PyTorch state_dict (file or mapping).

  `trust=True` reads a PyTorch file with plain pickle, which runs code from the file (see
  `read_state_dict`)."""
  from uir_jax.convert import nafnet, unet
  from uir_jax.convert.common import ConversionError, read_state_dict

  sd = read_state_dict(path_or_state_dict, trust=trust)
  keys = set(nafnet.unwrap_state_dict(sd))
  if "intro.weight" in keys:
    if "time_mlp.1.weight" not in keys:
      raise ConversionError("this NAFNet checkpoint has no time embedding: it is a direct "
                            "regression model, not an IR-SDE denoiser (use load_nafnet and call "
                            "it on the degraded image)")
    return nafnet.load_nafnet(sd)
  return unet.load_unet(sd)

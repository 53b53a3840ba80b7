"""Stable Diffusion networks in Flax NNX with diffusers' names: UNet2DConditionModel,
AutoencoderKL, ControlNet (spec §3). Weights: `uir_jax.convert.sd`."""

from uir_jax.models.sd.config import ConfigError, UNetConfig, VAEConfig, unet_config, vae_config
from uir_jax.models.sd.controlnet import ControlNet
from uir_jax.models.sd.unet import UNet2DConditionModel
from uir_jax.models.sd.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "ConfigError", "ControlNet", "UNet2DConditionModel", "UNetConfig",
           "VAEConfig", "unet_config", "vae_config"]

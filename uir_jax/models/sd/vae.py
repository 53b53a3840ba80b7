"""diffusers `AutoencoderKL` (the SD VAE) in Flax NNX, NHWC (spec §3.3).

    vae = AutoencoderKL(json.load(open("vae/config.json")), rngs=nnx.Rngs(0))
    mean, logvar = vae.encode(images)                 # images [B, H, W, 3] in [-1, 1]
    z = (mean + jnp.exp(0.5 * logvar) * noise) * vae.scaling_factor   # latents fed to the UNet
    images = vae.decode(z / vae.scaling_factor)      # [B, H, W, 3] in about [-1, 1]

`encode(..., return_features=True)` also returns the encoder's features per level (what
Diff-Restorer's degradation-aware decoder fuses). Names follow diffusers (`encoder.down_blocks[i].
resnets[j]`, `mid_block.attentions[0].to_q`, `quant_conv`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import GroupNorm, conv
from uir_jax.models.sd.blocks import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D
from uir_jax.models.sd.config import VAEConfig, vae_config

Array = jax.Array
VAE_EPS = 1e-6  # every VAE GroupNorm


class UNetMidBlock2D(nnx.Module):
  """resnets[0], then (attentions[i], resnets[i + 1]); single-head attention (head size = C)."""

  def __init__(self, channels: int, *, groups: int, add_attention: bool, rngs: nnx.Rngs, dtype,
               attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups=groups, eps=VAE_EPS,
                                           **kw) for _ in range(2)])
    self.attentions = nnx.List([SpatialSelfAttention(
        channels, channels, groups=groups, eps=VAE_EPS, attention_impl=attention_impl, **kw)]) \
        if add_attention else None

  def __call__(self, h: Array) -> Array:
    h = self.resnets[0](h)
    if self.attentions is not None:
      h = self.attentions[0](h)
    return self.resnets[1](h)


class EncoderBlock(nnx.Module):
  """`DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional down/up sampler."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, groups: int, down: bool, up: bool,
               rngs: nnx.Rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups=groups,
                                           eps=VAE_EPS, **kw) for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(cout, padding=0, **kw)]) if down else None
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if up else None

  def __call__(self, h: Array) -> tuple[Array, Array]:
    """(output, the resnets' output before the sampler)."""
    for resnet in self.resnets:
      h = resnet(h)
    feature = h
    if self.downsamplers is not None:
      h = self.downsamplers[0](h)
    if self.upsamplers is not None:
      h = self.upsamplers[0](h)
    return h, feature


class Encoder(nnx.Module):
  """Image [B, H, W, 3] -> moments [B, H/2^(n-1), W/2^(n-1), 2·latent_channels]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype, attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        EncoderBlock(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block, groups=g,
                     down=i < len(ch) - 1, up=False, **kw) for i in range(len(ch))])
    self.mid_block = UNetMidBlock2D(ch[-1], groups=g, add_attention=cfg.mid_block_add_attention,
                                    attention_impl=attention_impl, **kw)
    self.conv_norm_out = GroupNorm(ch[-1], g, eps=VAE_EPS, dtype=dtype)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x: Array) -> tuple[Array, list[Array]]:
    h = self.conv_in(x)
    features = []
    for block in self.down_blocks:
      h, f = block(h)
      features.append(f)
    h = self.mid_block(h)
    features.append(h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h))), features


class Decoder(nnx.Module):
  """Latent [B, h, w, latent_channels] -> image [B, h·2^(n-1), w·2^(n-1), 3]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype, attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    rch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = conv(cfg.latent_channels, rch[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(rch[0], groups=g, add_attention=cfg.mid_block_add_attention,
                                    attention_impl=attention_impl, **kw)
    self.up_blocks = nnx.List([
        EncoderBlock(rch[max(i - 1, 0)], rch[i], num_layers=cfg.layers_per_block + 1, groups=g,
                     down=False, up=i < len(rch) - 1, **kw) for i in range(len(rch))])
    self.conv_norm_out = GroupNorm(rch[-1], g, eps=VAE_EPS, dtype=dtype)
    self.conv_out = conv(rch[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z: Array) -> Array:
    h = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      h, _ = block(h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder: `encoder` + `quant_conv` -> (mean, logvar); `post_quant_conv` + `decoder`.

  Args:
    config: a diffusers `vae/config.json` dict (or a `VAEConfig`).
    dtype: compute dtype (parameters float32; norms and softmaxes in float32).
    attention_impl: the mid-block attention's implementation (see `uir_jax.models.layers`).
  """

  def __init__(self, config: Mapping[str, Any] | VAEConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    cfg = vae_config(config)
    kw = dict(rngs=rngs, dtype=dtype)
    self.config, self.dtype = cfg, dtype
    self.encoder = Encoder(cfg, attention_impl=attention_impl, **kw)
    self.decoder = Decoder(cfg, attention_impl=attention_impl, **kw)
    lc = cfg.latent_channels
    self.quant_conv = conv(2 * lc, 2 * lc, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(lc, lc, 1, **kw) if cfg.use_post_quant_conv else None

  @property
  def scaling_factor(self) -> float:
    """Latents fed to the UNet are `sample * scaling_factor` (0.18215 for SD 1.x and 2.x)."""
    return self.config.scaling_factor

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.config.block_out_channels) - 1)

  def encode(self, x: Array, *, return_features: bool = False
             ) -> tuple[Array, Array] | tuple[Array, Array, list[Array]]:
    """Posterior of images x [B, H, W, 3] in [-1, 1] (H, W multiples of `downsample_factor`).

    Returns float32 (mean, logvar), each [B, H/f, W/f, latent_channels], logvar clipped to
    [-30, 20] as diffusers' `DiagonalGaussianDistribution`; with `return_features`, also the
    encoder's features: per level the last resnet's output before its downsampler
    ([B, H/2^i, W/2^i, block_out_channels[i]]), then the mid block's output.
    """
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL.encode expects images [B, H, W, {self.config.in_channels}] "
                       f"with H, W multiples of {f}, got {x.shape}")
    moments, features = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return (mean, logvar, features) if return_features else (mean, logvar)

  def decode(self, z: Array) -> Array:
    """Images [B, h·f, w·f, 3] (float32, about [-1, 1]) from unscaled latents z [B, h, w, C]."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"AutoencoderKL.decode expects latents [B, h, w, "
                       f"{self.config.latent_channels}], got {z.shape}")
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mean (diffusers' forward, sample_posterior=False)."""
    return self.decode(self.encode(x)[0])

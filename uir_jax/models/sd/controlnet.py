"""diffusers `ControlNetModel` in Flax NNX, NHWC (spec §3.4).

    cn = ControlNet.from_unet(unet)                          # encoder copy + fresh zero convs
    down, mid = cn(latents, t, text_states, cond_image)     # cond_image [B, 8h, 8w, 3] in [0, 1]
    eps = unet(latents, t, text_states, down_residuals=down, mid_residual=mid)

A trainable copy of the UNet's `conv_in`, time embedding, `down_blocks` and `mid_block`; the
condition image enters through `controlnet_cond_embedding` (convolutions down to the latent size,
the last zero-initialised) added to the `conv_in` output; each skip and the mid output leave through
a zero-initialised 1x1 convolution (`controlnet_down_blocks[i]`, `controlnet_mid_block`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import conv
from uir_jax.models.sd.config import UNetConfig, unet_config
from uir_jax.models.sd.unet import UNet2DConditionModel, UNetEncoder

Array = jax.Array


def zero_conv(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, dtype) -> nnx.Conv:
  """A convolution whose kernel and bias start at zero (diffusers `zero_module`)."""
  c = conv(cin, cout, kernel, rngs=rngs, dtype=dtype)
  c.kernel.set_value(jnp.zeros_like(c.kernel[...]))
  c.bias.set_value(jnp.zeros_like(c.bias[...]))
  return c


class ControlNetConditioningEmbedding(nnx.Module):
  """`conv_in` -> SiLU -> [3x3 conv, SiLU, 3x3 stride-2 conv, SiLU] per step -> zero `conv_out`:
  [B, H, W, conditioning_channels] -> [B, H / 2^(n-1), W / 2^(n-1), embedding_channels]."""

  def __init__(self, embedding_channels: int, conditioning_channels: int,
               block_out_channels: Sequence[int], *, rngs: nnx.Rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    ch = tuple(block_out_channels)
    self.conv_in = conv(conditioning_channels, ch[0], 3, **kw)
    blocks = []
    for a, b in zip(ch[:-1], ch[1:], strict=True):
      blocks += [conv(a, a, 3, **kw), conv(a, b, 3, stride=2, **kw)]
    self.blocks = nnx.List(blocks)
    self.conv_out = zero_conv(ch[-1], embedding_channels, 3, **kw)

  def __call__(self, cond: Array) -> Array:
    h = jax.nn.silu(self.conv_in(cond))
    for block in self.blocks:
      h = jax.nn.silu(block(h))
    return self.conv_out(h)


class ControlNet(UNetEncoder):
  """A ControlNet for a `UNet2DConditionModel`.

  Args:
    config: a diffusers `controlnet/config.json` dict (or a `UNetConfig`).
    dtype, attention_impl: as for the UNet.
  """

  def __init__(self, config: Mapping[str, Any] | UNetConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    cfg = unet_config(config, "ControlNetModel")
    self._build_encoder(cfg, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    kw = dict(rngs=rngs, dtype=dtype)
    ch = cfg.block_out_channels
    self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
        ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, **kw)
    # One zero conv per skip of the UNet: conv_in, each resnet, each downsampler.
    skip_channels = [ch[0]]
    for i, n in enumerate(cfg.layers_per_block):
      skip_channels += [ch[i]] * (n + (i < len(ch) - 1))
    self.controlnet_down_blocks = nnx.List([zero_conv(c, c, 1, **kw) for c in skip_channels])
    self.controlnet_mid_block = zero_conv(ch[-1], ch[-1], 1, **kw)

  @classmethod
  def from_unet(cls, unet: UNet2DConditionModel, *, conditioning_channels: int = 3,
                conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                conditioning_channel_order: str = "rgb", load_weights_from_unet: bool = True,
                rngs: nnx.Rngs | None = None, attention_impl: str = "auto") -> ControlNet:
    """diffusers `ControlNetModel.from_unet`: the UNet's encoder half, copied (new arrays are not
    needed: JAX arrays are immutable, and training replaces them), plus fresh zero convolutions."""
    cfg = dataclasses.replace(
        unet.config, conditioning_channels=int(conditioning_channels),
        conditioning_embedding_out_channels=tuple(int(c) for c in
                                                  conditioning_embedding_out_channels),
        conditioning_channel_order=conditioning_channel_order, global_pool_conditions=False)
    cn = cls(cfg, rngs=rngs or nnx.Rngs(0), dtype=unet.dtype, attention_impl=attention_impl)
    if load_weights_from_unet:
      for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        if getattr(unet, name) is not None:
          nnx.update(getattr(cn, name), nnx.state(getattr(unet, name), nnx.Param))
    return cn

  def __call__(self, sample: Array, timesteps: Array | float, encoder_hidden_states: Array,
               controlnet_cond: Array, *, conditioning_scale: float = 1.0,
               guess_mode: bool = False) -> tuple[list[Array], Array]:
    """(down_residuals, mid_residual) for `UNet2DConditionModel(..., down_residuals=,
    mid_residual=)`: float32 [B, h_i, w_i, C_i] per skip and [B, h, w, C_mid].

    `controlnet_cond` is the condition image [B, H, W, conditioning_channels] at the latent size
    times 2^(len(conditioning_embedding_out_channels) - 1) (8 for SD). `guess_mode` scales the
    residuals by logspace(-1, 0) from the first skip to the mid block, as diffusers.
    """
    cfg = self.config
    self._check_inputs(sample, encoder_hidden_states)
    f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    b, h, w, _ = sample.shape
    if controlnet_cond.shape != (b, h * f, w * f, cfg.conditioning_channels):
      raise ValueError(f"controlnet_cond must be [B, H·{f}, W·{f}, {cfg.conditioning_channels}] = "
                       f"{(b, h * f, w * f, cfg.conditioning_channels)}, got "
                       f"{controlnet_cond.shape}")
    if cfg.conditioning_channel_order == "bgr":
      controlnet_cond = controlnet_cond[..., ::-1]
    emb = self.time_embed(timesteps, b)
    h0 = self.conv_in(sample.astype(self.dtype))
    h0 = h0 + self.controlnet_cond_embedding(controlnet_cond.astype(self.dtype))
    mid, skips = self.encode(h0, emb, encoder_hidden_states)
    down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)]
    mid = self.controlnet_mid_block(mid)
    if guess_mode and not cfg.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1) * conditioning_scale
      down = [d * scales[i] for i, d in enumerate(down)]
      mid = mid * scales[-1]
    else:
      down = [d * conditioning_scale for d in down]
      mid = mid * conditioning_scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return [d.astype(jnp.float32) for d in down], mid.astype(jnp.float32)

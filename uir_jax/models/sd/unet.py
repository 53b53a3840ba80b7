"""diffusers `UNet2DConditionModel` (SD 1.x / 2.x) in Flax NNX, NHWC (spec §3.1-3.2).

    unet = UNet2DConditionModel(json.load(open("unet/config.json")), rngs=nnx.Rngs(0))
    eps = unet(latents, t, text_states)          # [B, h, w, 4], [B] or scalar, [B, 77, D]
    eps = unet(latents, t, text_states, down_residuals=res, mid_residual=mid)   # + ControlNet

Attribute names are diffusers' (`down_blocks[i].resnets[j].conv1`, `...attentions[j].
transformer_blocks[k].attn2.to_k`, `mid_block`, `up_blocks`, `conv_norm_out`), so the converter
(`uir_jax/convert/sd.py`) is a rename + transpose. Exceptions: Dense `to_out` for `to_out.0`,
`ff_proj`/`ff_out` for `ff.net.0.proj`/`ff.net.2` (the shared LDM transformer block), Dense
`proj_in`/`proj_out` for SD 1.x's 1x1 convolutions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import GroupNorm, conv
from uir_jax.models.sd.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)
from uir_jax.models.sd.config import UNetConfig, unet_config

Array = jax.Array


class DownBlock2D(nnx.Module):
  """`CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without): resnets, each followed
  by its attention, then an optional stride-2 `downsamplers[0]`. Returns (h, skips): one skip per
  resnet and one after the downsampler."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, temb: int, cross: bool, heads: int,
               transformer_layers: int, cross_attention_dim: int, add_downsample: bool,
               cfg: UNetConfig, rngs: nnx.Rngs, dtype, attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([
        ResnetBlock2D(cin if i == 0 else cout, cout, temb, groups=cfg.norm_num_groups,
                      eps=cfg.norm_eps, **kw) for i in range(num_layers)])
    self.attentions = nnx.List([
        Transformer2DModel(heads, cout // heads, cout, num_layers=transformer_layers,
                           cross_attention_dim=cross_attention_dim, groups=cfg.norm_num_groups,
                           use_linear_projection=cfg.use_linear_projection,
                           attention_impl=attention_impl, **kw)
        for _ in range(num_layers)]) if cross else None
    self.downsamplers = nnx.List([Downsample2D(cout, padding=cfg.downsample_padding, **kw)]) \
        if add_downsample else None

  def __call__(self, h: Array, emb: Array, context: Array) -> tuple[Array, list[Array]]:
    skips = []
    for i, resnet in enumerate(self.resnets):
      h = resnet(h, emb)
      if self.attentions is not None:
        h = self.attentions[i](h, context)
      skips.append(h)
    if self.downsamplers is not None:
      h = self.downsamplers[0](h)
      skips.append(h)
    return h, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
  """resnets[0], then (attentions[i], resnets[i + 1]) pairs."""

  def __init__(self, channels: int, *, temb: int, heads: int, transformer_layers: int,
               cross_attention_dim: int, cfg: UNetConfig, rngs: nnx.Rngs, dtype,
               attention_impl: str, num_layers: int = 1):
    kw = dict(rngs=rngs, dtype=dtype)
    self.resnets = nnx.List([
        ResnetBlock2D(channels, channels, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                      output_scale_factor=cfg.mid_block_scale_factor, **kw)
        for _ in range(num_layers + 1)])
    self.attentions = nnx.List([
        Transformer2DModel(heads, channels // heads, channels, num_layers=transformer_layers,
                           cross_attention_dim=cross_attention_dim, groups=cfg.norm_num_groups,
                           use_linear_projection=cfg.use_linear_projection,
                           attention_impl=attention_impl, **kw) for _ in range(num_layers)])

  def __call__(self, h: Array, emb: Array, context: Array) -> Array:
    h = self.resnets[0](h, emb)
    for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
      h = resnet(attn(h, context), emb)
    return h


class UpBlock2D(nnx.Module):
  """`CrossAttnUpBlock2D` / `UpBlock2D`: each resnet reads cat[h, skip] (skips popped from the
  end), then its attention; then an optional `upsamplers[0]`."""

  def __init__(self, cin: int, cout: int, prev: int, *, num_layers: int, temb: int, cross: bool,
               heads: int, transformer_layers: int, cross_attention_dim: int, add_upsample: bool,
               cfg: UNetConfig, rngs: nnx.Rngs, dtype, attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    resnets = []
    for i in range(num_layers):
      skip = cin if i == num_layers - 1 else cout
      resnets.append(ResnetBlock2D((prev if i == 0 else cout) + skip, cout, temb,
                                   groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw))
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List([
        Transformer2DModel(heads, cout // heads, cout, num_layers=transformer_layers,
                           cross_attention_dim=cross_attention_dim, groups=cfg.norm_num_groups,
                           use_linear_projection=cfg.use_linear_projection,
                           attention_impl=attention_impl, **kw)
        for _ in range(num_layers)]) if cross else None
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

  def __call__(self, h: Array, skips: list[Array], emb: Array, context: Array,
               upsample_size: Sequence[int] | None = None) -> Array:
    for i, resnet in enumerate(self.resnets):
      h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), emb)
      if self.attentions is not None:
        h = self.attentions[i](h, context)
    if self.upsamplers is not None:
      h = self.upsamplers[0](h, upsample_size)
    return h


class UNetEncoder(nnx.Module):
  """What the UNet and the ControlNet share: `conv_in`, the time embedding, `down_blocks` and
  `mid_block` (the ControlNet is a trainable copy of exactly these)."""

  def _build_encoder(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype, attention_impl: str):
    kw = dict(rngs=rngs, dtype=dtype)
    ch = cfg.block_out_channels
    temb = cfg.time_embed_dim
    self.config, self.dtype = cfg, dtype
    self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
    self.time_embedding = TimestepEmbedding(ch[0], temb, **kw)
    blocks, cout = [], ch[0]
    for i, kind in enumerate(cfg.down_block_types):
      cin, cout = cout, ch[i]
      blocks.append(DownBlock2D(
          cin, cout, num_layers=cfg.layers_per_block[i], temb=temb,
          cross=kind == "CrossAttnDownBlock2D", heads=cfg.heads[i],
          transformer_layers=cfg.transformer_layers_per_block[i],
          cross_attention_dim=cfg.cross_attention_dim[i], add_downsample=i < len(ch) - 1,
          cfg=cfg, attention_impl=attention_impl, **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = UNetMidBlock2DCrossAttn(
        ch[-1], temb=temb, heads=cfg.heads[-1],
        transformer_layers=cfg.transformer_layers_per_block[-1],
        cross_attention_dim=cfg.cross_attention_dim[-1], cfg=cfg, attention_impl=attention_impl,
        **kw) if cfg.mid_block_type else None

  def time_embed(self, timesteps: Array | float, batch: int) -> Array:
    """[B] or scalar steps -> the time embedding [B, time_embed_dim] (compute dtype)."""
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, self.config.block_out_channels[0],
                               flip_sin_to_cos=self.config.flip_sin_to_cos,
                               freq_shift=self.config.freq_shift)
    return self.time_embedding(t_emb.astype(self.dtype))

  def _check_inputs(self, sample: Array, context: Array) -> None:
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"{type(self).__name__} expects latents [B, H, W, {cfg.in_channels}] "
                       f"(NHWC), got {sample.shape}")
    if context.ndim != 3 or context.shape[0] != sample.shape[0] \
        or context.shape[-1] != cfg.cross_attention_dim[0]:
      raise ValueError(f"encoder_hidden_states must be [B, L, {cfg.cross_attention_dim[0]}] with "
                       f"B={sample.shape[0]}, got {context.shape}")

  def encode(self, h: Array, emb: Array, context: Array) -> tuple[Array, list[Array]]:
    """Down blocks and mid block from the conv_in output h: (mid output, the skips)."""
    skips = [h]
    context = context.astype(self.dtype)
    for block in self.down_blocks:
      h, res = block(h, emb, context)
      skips += res
    if self.mid_block is not None:
      h = self.mid_block(h, emb, context)
    return h, skips


class UNet2DConditionModel(UNetEncoder):
  """The SD noise (or v) predictor.

  Args:
    config: a diffusers `unet/config.json` dict (or a `UNetConfig`).
    dtype: compute dtype (parameters stay float32; norms and softmaxes compute in float32).
    attention_impl: see `uir_jax.models.layers.attention` ("auto": cuDNN flash on GPU in bf16,
      blockwise for large token counts, plain otherwise).
  """

  def __init__(self, config: Mapping[str, Any] | UNetConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    cfg = unet_config(config)
    self._build_encoder(cfg, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    kw = dict(rngs=rngs, dtype=dtype)
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    rch, rheads = ch[::-1], cfg.heads[::-1]
    rlayers, rcross = cfg.layers_per_block[::-1], cfg.cross_attention_dim[::-1]
    rtl = cfg.transformer_layers_per_block[::-1]
    blocks, cout = [], rch[0]
    for i, kind in enumerate(cfg.up_block_types):
      prev, cout, cin = cout, rch[i], rch[min(i + 1, n - 1)]
      blocks.append(UpBlock2D(
          cin, cout, prev, num_layers=rlayers[i] + 1, temb=cfg.time_embed_dim,
          cross=kind == "CrossAttnUpBlock2D", heads=rheads[i], transformer_layers=rtl[i],
          cross_attention_dim=rcross[i], add_upsample=i < n - 1, cfg=cfg,
          attention_impl=attention_impl, **kw))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = GroupNorm(ch[0], cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype)
    self.conv_out = conv(ch[0], cfg.out_channels, 3, **kw)

  @classmethod
  def from_config_file(cls, path: str | os.PathLike, **kw) -> UNet2DConditionModel:
    """A randomly initialised network from a diffusers `config.json` (file or its folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path) as f:
      return cls(json.load(f), **kw)

  def __call__(self, sample: Array, timesteps: Array | float, encoder_hidden_states: Array, *,
               down_residuals: Sequence[Array] | None = None,
               mid_residual: Array | None = None) -> Array:
    """ε̂ (or v̂) [B, H, W, out_channels] float32 for latents [B, H, W, in_channels].

    `down_residuals` (one per skip: conv_in + each resnet + each downsampler, 12 for SD) and
    `mid_residual` are a ControlNet's outputs, added to the skips and to the mid-block output.
    """
    self._check_inputs(sample, encoder_hidden_states)
    emb = self.time_embed(timesteps, sample.shape[0])
    h = self.conv_in(sample.astype(self.dtype))
    h, skips = self.encode(h, emb, encoder_hidden_states)
    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"down_residuals has {len(down_residuals)} tensors; this UNet has "
                         f"{len(skips)} skips")
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
    if mid_residual is not None:
      h = h + mid_residual.astype(h.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    for block in self.up_blocks:
      n = len(block.resnets)
      res, skips = skips[-n:], skips[:-n]
      size = skips[-1].shape[1:3] if skips else None
      h = block(h, res, emb, context, upsample_size=size)
    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h)))
    return h.astype(jnp.float32)

"""Blocks of the Stable Diffusion networks (diffusers' names and numerics), NHWC, Flax NNX.

Shared with the IR-SDE U-Net where the block is the same: `GroupNorm`, `conv`, `dense` and the
attention dispatcher from `uir_jax.models.layers`, and the LDM `TransformerBlock` (self-attention,
cross-attention, GEGLU feed-forward, pre-LN with eps 1e-5) from `uir_jax.models.unet`. What differs
lives here: the diffusers sinusoid (cos-first, `freq_shift`), `ResnetBlock2D` (GroupNorm + additive
time embedding; the IR-SDE ResBlock has no norms and a scale-shift), `Transformer2DModel`'s
projections, the stride-2 downsampler and the single-head VAE attention.

Attention precision: every attention path here accumulates q·k in float32 and takes the softmax
in float32 (the dispatcher's naive/blockwise forms; cuDNN flash keeps float32 statistics), so
diffusers' `upcast_attention` (q, k upcast before the product, needed by SD 2.1-768 in float16) is
what we always do; the flag is kept in the config for fidelity and has no second code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import GroupNorm, attention, conv, dense
from uir_jax.models.unet import TransformerBlock

Array = jax.Array


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Array:
  """diffusers `get_timestep_embedding`: f_k = max_period^(-k / (dim/2 - freq_shift)), k < dim/2.

  `t` [B] (int or float steps); returns float32 [B, dim]: [sin, cos] or, with `flip_sin_to_cos`
  (SD), [cos, sin]; an odd `dim` gets a zero last column.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """`linear_1` -> SiLU -> `linear_2`: [B, C_in] -> [B, C_emb]."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.linear_1 = dense(cin, cout, rngs=rngs, dtype=dtype)
    self.linear_2 = dense(cout, cout, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """diffusers `ResnetBlock2D` ("default" time conditioning, pre-norm):

      h = conv1(SiLU(norm1(x))) [+ time_emb_proj(SiLU(emb))]; h = conv2(SiLU(norm2(h)))
      out = (conv_shortcut(x) if C_in != C_out else x) + h, divided by `output_scale_factor`

  x [B, H, W, C_in], emb [B, temb_channels] or None (VAE) -> [B, H, W, C_out].
  """

  def __init__(self, cin: int, cout: int, temb_channels: int | None, *, groups: int, eps: float,
               output_scale_factor: float = 1.0, rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.norm1 = GroupNorm(cin, groups, eps=eps, dtype=dtype)
    self.conv1 = conv(cin, cout, 3, **kw)
    self.time_emb_proj = dense(temb_channels, cout, **kw) if temb_channels else None
    self.norm2 = GroupNorm(cout, groups, eps=eps, dtype=dtype)
    self.conv2 = conv(cout, cout, 3, **kw)
    self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None
    self.output_scale_factor = float(output_scale_factor)

  def __call__(self, x: Array, emb: Array | None = None) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      if emb is None:
        raise ValueError("this ResnetBlock2D is time-conditioned: pass emb [B, temb_channels]")
      h = h + self.time_emb_proj(jax.nn.silu(emb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    out = skip + h
    return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Transformer2DModel(nnx.Module):
  """diffusers `Transformer2DModel` (continuous input): GroupNorm(eps 1e-6) -> `proj_in` ->
  `transformer_blocks` over the H*W tokens -> `proj_out` -> + input.

  `proj_in`/`proj_out` are Dense layers in both SD styles: SD 1.x's 1x1 convolutions
  (`use_linear_projection=False`) are the same map, and the converter squeezes their kernels.
  x [B, H, W, C], context [B, L, cross_attention_dim] -> [B, H, W, C].
  """

  def __init__(self, heads: int, head_dim: int, channels: int, *, num_layers: int,
               cross_attention_dim: int, groups: int, use_linear_projection: bool,
               rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "auto"):
    inner = heads * head_dim
    kw = dict(rngs=rngs, dtype=dtype)
    self.norm = GroupNorm(channels, groups, eps=1e-6, dtype=dtype)
    self.proj_in = dense(channels, inner, **kw)
    self.transformer_blocks = nnx.List([
        TransformerBlock(inner, heads, head_dim, cross_attention_dim, attention_impl=attention_impl,
                         **kw) for _ in range(num_layers)])
    self.proj_out = dense(inner, channels, **kw)
    self.use_linear_projection = bool(use_linear_projection)

  def __call__(self, x: Array, context: Array) -> Array:
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
    context = context.astype(tokens.dtype)
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    return self.proj_out(tokens).reshape(b, h, w, c) + x


class Downsample2D(nnx.Module):
  """3x3 stride-2 `conv`; `padding=0` (the VAE) pads one zero row/column at the bottom/right."""

  def __init__(self, channels: int, *, padding: int, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = conv(channels, channels, 3, stride=2, padding=padding, rngs=rngs, dtype=dtype)
    self.padding = int(padding)

  def __call__(self, x: Array) -> Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


def resize_nearest(x: Array, size: Sequence[int]) -> Array:
  """PyTorch `F.interpolate(mode="nearest", size=size)` on NHWC: source index floor(i * in/out)."""
  _, h, w, _ = x.shape
  oh, ow = int(size[0]), int(size[1])
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  iy = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
  ix = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
  return x[:, iy][:, :, ix]


class Upsample2D(nnx.Module):
  """Nearest x2 (or to `size`: the skip's size when H, W are not multiples of 2^levels), then a
  3x3 `conv`."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, size: Sequence[int] | None = None) -> Array:
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
    return self.conv(resize_nearest(x, size))


class SpatialSelfAttention(nnx.Module):
  """The VAE mid-block attention (diffusers `Attention` from the deprecated attention block):
  `group_norm` -> `to_q`, `to_k`, `to_v` (with bias) -> attention over H*W tokens with
  `channels // head_dim` heads -> `to_out` -> + input. [B, H, W, C] -> [B, H, W, C]."""

  def __init__(self, channels: int, head_dim: int, *, groups: int, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype)
    self.group_norm = GroupNorm(channels, groups, eps=eps, dtype=dtype)
    self.to_q = dense(channels, channels, **kw)
    self.to_k = dense(channels, channels, **kw)
    self.to_v = dense(channels, channels, **kw)
    self.to_out = dense(channels, channels, **kw)
    self.heads = max(1, channels // head_dim)
    self.impl = attention_impl

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    split = lambda y: y.reshape(b, h * w, self.heads, c // self.heads)
    out = attention(split(self.to_q(t)), split(self.to_k(t)), split(self.to_v(t)), impl=self.impl)
    return self.to_out(out.reshape(b, h * w, c)).reshape(b, h, w, c) + x

"""The IR-SDE `ConditionalUNet` with DA-CLIP conditioning, in Flax NNX (spec §4).

    unet = ConditionalUNet(nf=64, ch_mult=(1, 2, 4, 8), context_dim=512, rngs=nnx.Rngs(0))
    eps = unet(x_t, mu, t, text_context=degra_features, image_context=image_features)

Inputs are NHWC in [0, 1] (`mu` is the low-quality image); `t` is an integer step in 1..T, a scalar
or one per example. The output is the predicted noise ε̂ (float32, the input's shape).

Structure, names and numerics follow the reference so released `.pth` files convert by a near-
identity key map (`uir_jax/convert/unet.py`):

  * `downs[i]` = (`block1`, `block2`, `attn`, `down`); `ups[j]` likewise, `ups[0]` is the bottom;
  * ResBlocks without norms, time conditioning by scale-shift; LinearAttention at the upper levels;
    at the bottom (`downs[-1]`, `mid_attn`, `ups[0]`) a SpatialTransformer whose cross-attention
    reads DA-CLIP's content embedding as a single context token;
  * the degradation embedding goes through `text_mlp`, a softmax over the 256 channels times the one
    learned `prompt`, then `prompt_mlp`, and is added to the time embedding;
  * input `cat[x_t - μ, μ]`, reflect padding on the right/bottom to a multiple of 2^len(ch_mult),
    cropped back at the end;
  * the wild variant (`scale=0.5`) runs every level at half resolution behind an extra
    Downsample/Upsample pair.

Every attention module is `x + attn(LayerNorm(x))`, also around the SpatialTransformer that has its
own residual (so its input LayerNorm is added too), exactly as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import (
    ChannelLayerNorm,
    CrossAttention,
    GroupNorm,
    LayerNorm,
    conv,
    dense,
    linear,
    sinusoidal_embedding,
)

Array = jax.Array

HEAD_CHANNELS = 32  # num_head_channels of the SpatialTransformers
LINEAR_ATTN_HEADS, LINEAR_ATTN_DIM_HEAD = 4, 32


class ResBlock(nnx.Module):
  """conv3x3 -> scale-shift(t) -> SiLU -> conv3x3 -> SiLU, plus a (1x1 conv) residual; no norms."""

  def __init__(self, dim_in: int, dim_out: int, time_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.mlp = dense(time_dim, 2 * dim_out, rngs=rngs, dtype=dtype)
    self.block1 = conv(dim_in, dim_out, 3, use_bias=False, rngs=rngs, dtype=dtype)
    self.block2 = conv(dim_out, dim_out, 3, use_bias=False, rngs=rngs, dtype=dtype)
    self.res_conv = (conv(dim_in, dim_out, 1, use_bias=False, rngs=rngs, dtype=dtype)
                     if dim_in != dim_out else None)

  def __call__(self, x: Array, t: Array) -> Array:
    scale, shift = jnp.split(self.mlp(jax.nn.silu(t))[:, None, None, :], 2, axis=-1)
    h = jax.nn.silu(self.block1(x) * (scale + 1) + shift)
    h = jax.nn.silu(self.block2(h))
    return h + (self.res_conv(x) if self.res_conv is not None else x)


class LinearAttention(nnx.Module):
  """O(N) attention: softmax over channels for q, over positions for k (module_util version)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    inner = LINEAR_ATTN_HEADS * LINEAR_ATTN_DIM_HEAD
    self.to_qkv = dense(dim, 3 * inner, use_bias=False, rngs=rngs, dtype=dtype)
    self.to_out = dense(inner, dim, rngs=rngs, dtype=dtype)
    self.out_norm = ChannelLayerNorm(dim, dtype=dtype)

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    del context  # ignored, as in the reference
    b, h, w, _ = x.shape
    n = h * w
    # to_qkv through `linear`: on CPU its kernel gradient avoids a large transposed copy.
    x = x.astype(self.to_qkv.dtype)
    qkv = linear(x, self.to_qkv.kernel[...].astype(x.dtype)).astype(jnp.float32)
    qkv = qkv.reshape(b, n, 3, LINEAR_ATTN_HEADS, LINEAR_ATTN_DIM_HEAD)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, d]
    q = jax.nn.softmax(q, axis=-1) * LINEAR_ATTN_DIM_HEAD ** -0.5
    k = jax.nn.softmax(k, axis=1)
    v = v / n
    ctx = jnp.einsum("bnhd,bnhe->bhde", k, v)
    out = jnp.einsum("bhde,bnhd->bnhe", ctx, q).reshape(b, h, w, -1)
    return self.out_norm(self.to_out(out.astype(x.dtype)))


class TransformerBlock(nnx.Module):
  """LDM BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward (pre-LN)."""

  def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    self.attn1 = CrossAttention(dim, heads, dim_head, rngs=rngs, dtype=dtype, impl=attention_impl)
    self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, rngs=rngs, dtype=dtype,
                                impl=attention_impl)
    self.ff_proj = dense(dim, 8 * dim, rngs=rngs, dtype=dtype)
    self.ff_out = dense(4 * dim, dim, rngs=rngs, dtype=dtype)
    self.norm1 = LayerNorm(dim, dtype=dtype)
    self.norm2 = LayerNorm(dim, dtype=dtype)
    self.norm3 = LayerNorm(dim, dtype=dtype)

  def __call__(self, x: Array, context: Array) -> Array:
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    a, gate = jnp.split(self.ff_proj(self.norm3(x)), 2, axis=-1)
    return self.ff_out(a * jax.nn.gelu(gate, approximate=False)) + x


class SpatialTransformer(nnx.Module):
  """GroupNorm -> 1x1 proj_in -> TransformerBlock over H*W tokens -> zero-init proj_out, + input.

  Heads are `dim // 32` of 32 channels (so the inner width is `dim` for the released models); the
  GroupNorm has gcd(32, dim) groups (32 for every released model).
  """

  def __init__(self, dim: int, context_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               attention_impl: str = "auto"):
    heads = max(1, dim // HEAD_CHANNELS)
    inner = heads * HEAD_CHANNELS
    self.norm = GroupNorm(dim, math.gcd(32, dim), eps=1e-6, dtype=dtype)
    self.proj_in = dense(dim, inner, rngs=rngs, dtype=dtype)
    self.block = TransformerBlock(inner, heads, HEAD_CHANNELS, context_dim, rngs=rngs,
                                  dtype=dtype, attention_impl=attention_impl)
    self.proj_out = dense(inner, dim, rngs=rngs, dtype=dtype, zero=True)

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    if context is None:
      raise ValueError("this ConditionalUNet uses image context (cross-attention on DA-CLIP's "
                       "content embedding): pass image_context=[B, context_dim]")
    b, h, w, c = x.shape
    tokens = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
    tokens = self.block(tokens, context.astype(tokens.dtype))
    return self.proj_out(tokens).reshape(b, h, w, c) + x


class PreNormResidual(nnx.Module):
  """`x + fn(ChannelLayerNorm(x))` (the reference's Residual(PreNorm(dim, fn)))."""

  def __init__(self, dim: int, fn: nnx.Module, *, dtype=jnp.float32):
    self.norm = ChannelLayerNorm(dim, dtype=dtype)
    self.fn = fn

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    return self.fn(self.norm(x), context) + x


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then conv3x3 (with bias)."""

  def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = conv(dim_in, dim_out, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _downsample(dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype) -> nnx.Conv:
  """Conv 4x4, stride 2, padding 1 (with bias)."""
  return conv(dim_in, dim_out, 4, stride=2, padding=1, rngs=rngs, dtype=dtype)


class Level(nnx.Module):
  """One U-Net level: two ResBlocks, an attention module, then the down- or up-sampling op."""

  def __init__(self, block1: ResBlock, block2: ResBlock, attn: PreNormResidual,
               resample: nnx.Module):
    self.block1, self.block2, self.attn, self.resample = block1, block2, attn, resample


class ConditionalUNet(nnx.Module):
  """IR-SDE noise predictor ε̂(x_t, μ, t) with DA-CLIP conditioning (spec §4).

  Args:
    in_nc, out_nc: image channels (3).
    nf: base width (64 in the released models); the time embedding has 4·nf channels.
    ch_mult: width multipliers of the levels (released: (1, 2, 4, 8)).
    context_dim: DA-CLIP embedding width (512 for ViT-B-32, 768 for ViT-L-14); 0 disables both
      conditionings.
    use_degra_context: add the prompt computed from the degradation embedding to the time embedding.
    use_image_context: cross-attend to the content embedding at the bottom level.
    scale: 1 (daclip-sde) or 0.5 (wild: all levels at half resolution).
    dtype: compute dtype; parameters are float32.
    attention_impl: see `uir_jax.models.layers.attention` ("auto" scales to large images).
  """

  def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64,
               ch_mult: Sequence[int] = (1, 2, 4, 8), context_dim: int = 512,
               use_degra_context: bool = True, use_image_context: bool = True,
               scale: float = 1.0, *, rngs: nnx.Rngs, dtype=jnp.float32,
               attention_impl: str = "auto", upscale: int = 1):
    del upscale  # accepted (and unused) like the reference's constructor argument
    ch_mult = tuple(int(m) for m in ch_mult)
    if not ch_mult or min(ch_mult) < 1 or nf < 1:
      raise ValueError(f"need nf >= 1 and a non-empty ch_mult of positive ints; got nf={nf}, "
                       f"ch_mult={ch_mult}")
    if scale not in (1, 1.0, 0.5):
      raise ValueError(f"scale must be 1 (daclip-sde) or 0.5 (wild), got {scale}")
    if (use_degra_context or use_image_context) and context_dim <= 0:
      raise ValueError("use_degra_context/use_image_context need context_dim > 0 "
                       "(512 for DA-CLIP ViT-B-32, 768 for ViT-L-14)")
    self.in_nc, self.out_nc, self.nf, self.ch_mult = in_nc, out_nc, nf, ch_mult
    self.context_dim = context_dim
    self.use_degra_context = bool(use_degra_context)
    self.use_image_context = bool(use_image_context and context_dim > 0)
    self.scale = float(scale)
    self.depth = len(ch_mult)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype)
    time_dim = 4 * nf
    cross = self.use_image_context

    def attn(dim: int, bottom: bool) -> PreNormResidual:
      fn = (SpatialTransformer(dim, context_dim, attention_impl=attention_impl, **kw)
            if cross and bottom else LinearAttention(dim, **kw))
      return PreNormResidual(dim, fn, dtype=dtype)

    self.init_conv = conv(2 * in_nc, nf, 7, use_bias=False, **kw)
    self.time_mlp1 = dense(nf, time_dim, **kw)
    self.time_mlp2 = dense(time_dim, time_dim, **kw)
    if self.use_degra_context:
      self.prompt = nnx.Param(jax.random.uniform(rngs.params(), (1, time_dim), jnp.float32))
      self.text_mlp1 = dense(context_dim, time_dim, **kw)
      self.text_mlp2 = dense(time_dim, time_dim, **kw)
      self.prompt_mlp = dense(time_dim, time_dim, **kw)
    if self.scale == 0.5:
      self.downsample = _downsample(nf, nf, **kw)
      self.upsample = Upsample(nf, nf, **kw)

    dims = [nf, *(nf * m for m in ch_mult)]
    in_out = list(zip(dims[:-1], dims[1:], strict=True))
    downs, ups = [], []
    for i, (d_in, d_out) in enumerate(in_out):
      last = i == self.depth - 1
      downs.append(Level(
          ResBlock(d_in, d_in, time_dim, **kw), ResBlock(d_in, d_in, time_dim, **kw),
          attn(d_in, last),
          conv(d_in, d_out, 3, use_bias=False, **kw) if last else _downsample(d_in, d_out, **kw)))
    for i, (d_in, d_out) in reversed(list(enumerate(in_out))):
      ups.append(Level(
          ResBlock(d_out + d_in, d_out, time_dim, **kw),
          ResBlock(d_out + d_in, d_out, time_dim, **kw),
          attn(d_out, i == self.depth - 1),
          conv(d_out, d_in, 3, use_bias=False, **kw) if i == 0 else Upsample(d_out, d_in, **kw)))
    self.downs = nnx.List(downs)
    self.ups = nnx.List(ups)
    mid = dims[-1]
    self.mid_block1 = ResBlock(mid, mid, time_dim, **kw)
    self.mid_attn = attn(mid, True)
    self.mid_block2 = ResBlock(mid, mid, time_dim, **kw)
    self.final_res_block = ResBlock(2 * nf, nf, time_dim, **kw)
    self.final_conv = conv(nf, out_nc, 3, **kw)

  @property
  def pad_multiple(self) -> int:
    return 2 ** self.depth

  def time_embedding(self, time: Array, batch: int, text_context: Array | None) -> Array:
    t = jnp.broadcast_to(jnp.asarray(time).reshape(-1), (batch,))
    emb = sinusoidal_embedding(t, self.nf).astype(self.dtype)
    emb = self.time_mlp2(jax.nn.gelu(self.time_mlp1(emb), approximate=False))
    if self.use_degra_context and text_context is not None:
      logits = self.text_mlp2(jax.nn.silu(self.text_mlp1(text_context.astype(self.dtype))))
      p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * self.prompt[...]
      emb = emb + self.prompt_mlp(p.astype(self.dtype))
    return emb

  def __call__(self, xt: Array, cond: Array, time: Array | int, *,
               text_context: Array | None = None, image_context: Array | None = None) -> Array:
    if xt.ndim != 4 or xt.shape != cond.shape or xt.shape[-1] != self.in_nc:
      raise ValueError(f"ConditionalUNet expects x_t and μ of the same shape "
                       f"[B, H, W, {self.in_nc}]; got {xt.shape} and {cond.shape}")
    b, h, w, _ = xt.shape
    for name, ctx in (("text_context", text_context), ("image_context", image_context)):
      if ctx is not None and ctx.shape != (b, self.context_dim):
        raise ValueError(f"{name} must be [B, context_dim] = {(b, self.context_dim)}, got "
                         f"{ctx.shape}")
    x = jnp.concatenate([xt - cond, cond], axis=-1).astype(jnp.float32)
    m = self.pad_multiple
    ph, pw = -h % m, -w % m
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    x = self.init_conv(x.astype(self.dtype))
    x_full = x
    if self.scale == 0.5:
      x = self.downsample(x)
    t = self.time_embedding(time, b, text_context)
    context = image_context[:, None, :] if self.use_image_context and image_context is not None \
        else None

    skips = []
    for level in self.downs:
      x = level.block1(x, t)
      skips.append(x)
      x = level.attn(level.block2(x, t), context)
      skips.append(x)
      x = level.resample(x)
    x = self.mid_block2(self.mid_attn(self.mid_block1(x, t), context), t)
    for level in self.ups:
      x = level.block1(jnp.concatenate([x, skips.pop()], axis=-1), t)
      x = level.block2(jnp.concatenate([x, skips.pop()], axis=-1), t)
      x = level.resample(level.attn(x, context))
    if self.scale == 0.5:
      x = self.upsample(x)
    x = self.final_res_block(jnp.concatenate([x, x_full], axis=-1), t)
    x = self.final_conv(x)
    return x[:, :h, :w].astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  """Number of scalar parameters of an NNX model."""
  return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

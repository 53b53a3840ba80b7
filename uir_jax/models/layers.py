"""Blocks shared by the restoration networks: timestep embedding, norms and attention.

All modules take NHWC images, keep float32 parameters and compute in `dtype` (float32 or bfloat16);
norms and softmaxes always compute in float32.

Attention (`attention`) has four interchangeable implementations that agree to rounding:

  * "naive": softmax(q k^T / sqrt(d)) v with the full [B, H, Lq, Lk] score matrix (the reference);
  * "xla": `jax.nn.dot_product_attention(implementation="xla")`;
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`: flash attention on NVIDIA
    GPUs (bfloat16/float16 only);
  * "blockwise": exact attention over chunks of queries under `jax.checkpoint`, so neither the
    forward nor the backward pass holds more than `max_block_elements` scores at once.

"auto" picks cuDNN on a GPU in half precision, blockwise when the score matrix would be large, and
the naive form otherwise. At 1024x1024 the U-Net's bottom self-attention has 16,384 tokens; the
PyTorch reference materialises a 16 GiB score matrix there and runs out of memory (spec §10).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ATTENTION_IMPLS = ("auto", "naive", "xla", "cudnn", "blockwise")
# "auto" switches to blockwise above this many scores per batch element (all heads): 64 Mi floats
# = 256 MiB in float32.
AUTO_BLOCKWISE_THRESHOLD = 1 << 26


def sinusoidal_embedding(t: Array, dim: int) -> Array:
  """The IR-SDE/DDPM timestep embedding: [sin(t f), cos(t f)], f_j = 10000^(-j / (dim/2 - 1)).

  `t` is [B] (raw integer steps, not normalised); returns float32 [B, dim] (sin half first).
  """
  if dim % 2 or dim < 4:
    raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ChannelLayerNorm(nnx.Module):
  """LayerNorm over the channel axis with a gain `g` and no bias (IR-SDE `module_util.LayerNorm`).

  eps is 1e-5 for float32 compute and 1e-3 otherwise, as in the reference.
  """

  def __init__(self, dim: int, *, dtype=jnp.float32):
    self.g = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    eps = 1e-5 if jnp.dtype(self.dtype) == jnp.float32 else 1e-3
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * self.g[...]
    return y.astype(self.dtype)


class LayerNorm(nnx.Module):
  """nn.LayerNorm over the last axis (weight `scale`, `bias`), computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class GroupNorm(nnx.Module):
  """nn.GroupNorm on NHWC (weight `scale`, `bias`), computed in float32."""

  def __init__(self, dim: int, num_groups: int, *, eps: float = 1e-6, dtype=jnp.float32):
    if dim % num_groups:
      raise ValueError(f"GroupNorm: {dim} channels are not divisible into {num_groups} groups")
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype

  def __call__(self, x: Array) -> Array:
    *lead, c = x.shape
    g = x.astype(jnp.float32).reshape(lead[0], -1, self.num_groups, c // self.num_groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------------------------


def _naive_attention(q: Array, k: Array, v: Array) -> Array:
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)


def _block_size(lk: int, heads: int, max_block_elements: int) -> int:
  """Largest power of two of queries whose [heads, block, lk] scores fit the budget (>= 16)."""
  per_query = max(1, lk * heads)
  return max(16, 1 << max(0, (max_block_elements // per_query).bit_length() - 1))


def _blockwise_attention(q: Array, k: Array, v: Array, max_block_elements: int) -> Array:
  b, lq, h, d = q.shape
  block = min(_block_size(k.shape[1], h, max_block_elements), lq)
  n = -(-lq // block)
  qp = jnp.pad(q, ((0, 0), (0, n * block - lq), (0, 0), (0, 0)))
  qb = jnp.moveaxis(qp.reshape(b, n, block, h, d), 1, 0)  # [n, B, block, H, D]
  # Rematerialised per chunk: the backward pass recomputes each chunk's scores instead of storing
  # all of them, so training memory stays O(block * Lk) as well.
  out = jax.lax.map(jax.checkpoint(lambda qc: _naive_attention(qc, k, v)), qb)
  return jnp.moveaxis(out, 0, 1).reshape(b, n * block, h, d)[:, :lq]


def resolve_attention_impl(impl: str, q_len: int, k_len: int, heads: int, dtype) -> str:
  """The concrete implementation "auto" stands for on the default backend."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(
        f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
      and k_len > 1:
    return "cudnn"
  if q_len * k_len * heads > AUTO_BLOCKWISE_THRESHOLD:
    return "blockwise"
  return "naive"


def attention(q: Array, k: Array, v: Array, *, impl: str = "auto",
              max_block_elements: int = 1 << 24) -> Array:
  """softmax(q k^T / sqrt(d)) v for q [B, Lq, H, D], k/v [B, Lk, H, D]; returns [B, Lq, H, D]."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  impl = resolve_attention_impl(impl, q.shape[1], k.shape[1], q.shape[2], q.dtype)
  if impl == "naive":
    return _naive_attention(q, k, v)
  if impl == "blockwise":
    return _blockwise_attention(q, k, v, max_block_elements)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def dense(din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True,
          zero: bool = False) -> nnx.Linear:
  """nn.Linear-like layer (PyTorch's default uniform init unless `zero`)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform")
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class DepthwiseConv(nnx.Module):
  """k x k depthwise convolution (PyTorch Conv2d(c, c, k, padding=k // 2, groups=c)), NHWC.

  Same parameters as `nnx.Conv(c, c, (k, k), feature_group_count=c)` (kernel [k, k, 1, c], bias
  [c]), computed as k² shifted multiply-adds that XLA fuses into one elementwise loop: on CPUs
  XLA's grouped-convolution gradient is ~50x slower than this (a NAFNet train step took seconds),
  and on accelerators it is one memory-bound fusion either way.
  """

  def __init__(self, c: int, kernel: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, c), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.k, self.dtype = kernel, dtype

  def __call__(self, x: Array) -> Array:
    k, (_, h, w, _) = self.k, x.shape
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = self.bias[...].astype(self.dtype)
    for dy in range(k):
      for dx in range(k):
        out = out + xp[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0]
    return out


def conv(din: int, dout: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | None = None, use_bias: bool = True, dtype=jnp.float32) -> nnx.Conv:
  """nn.Conv2d-like NHWC convolution with symmetric zero padding (default kernel // 2)."""
  p = kernel // 2 if padding is None else padding
  return nnx.Conv(din, dout, kernel_size=(kernel, kernel), strides=(stride, stride),
                  padding=((p, p), (p, p)), use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                  rngs=rngs)


class CrossAttention(nnx.Module):
  """LDM CrossAttention: bias-free q/k/v projections, `heads` x `dim_head`, output Linear."""

  def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, *,
               rngs: nnx.Rngs, dtype=jnp.float32, impl: str = "auto"):
    inner = heads * dim_head
    context_dim = context_dim or dim
    self.to_q = dense(dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
    self.to_k = dense(context_dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
    self.to_v = dense(context_dim, inner, use_bias=False, rngs=rngs, dtype=dtype)
    self.to_out = dense(inner, dim, rngs=rngs, dtype=dtype)
    self.heads, self.dim_head, self.impl = heads, dim_head, impl

  def __call__(self, x: Array, context: Array | None = None) -> Array:
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.dim_head)
    out = attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
                    impl=self.impl)
    return self.to_out(out.reshape(*x.shape[:2], self.heads * self.dim_head))


# ----------------------------------------------------------------------------------------------
# Resampling with PyTorch's exact semantics (NHWC).
# ----------------------------------------------------------------------------------------------


def pixel_shuffle(x: Array, r: int = 2) -> Array:
  """nn.PixelShuffle(r) on NHWC: input channel c·r² + i·r + j -> output channel c at (row i,
  column j) of each r x r cell. [B, H, W, C·r²] -> [B, H·r, W·r, C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
  """nn.PixelUnshuffle(r) on NHWC, the inverse of `pixel_shuffle`: [B, H, W, C] ->
  [B, H/r, W/r, C·r²] with output channel c·r² + i·r + j = input channel c at cell offset (i, j)."""
  b, h, w, c = x.shape
  if h % r or w % r:
    raise ValueError(f"pixel_unshuffle({r}) needs sides divisible by {r}, got {h}x{w}")
  x = x.reshape(b, h // r, r, w // r, r, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def _linear_taps(n_in: int, n_out: int):
  """Source indices and weights of PyTorch's bilinear (align_corners=False) along one axis:
  src = max((dst + 0.5)·n_in/n_out − 0.5, 0), taps floor(src) and the next one (clamped)."""
  import numpy as np  # static geometry: computed once per shape in Python

  scale = np.float32(n_in) / np.float32(n_out)
  src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale
                   - np.float32(0.5), np.float32(0))
  i0 = np.floor(src).astype(np.int32)
  lam = np.clip(src - i0, 0, 1).astype(np.float32)
  i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
  return i0, i1, lam


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """F.interpolate(x, size, mode="bilinear", align_corners=False) on NHWC, exactly.

  Unlike `jax.image.resize`, no antialiasing when shrinking (PyTorch's default), so weights
  converted from PyTorch see the same values. [B, H, W, C] -> [B, size[0], size[1], C].
  """
  out = x
  for axis, n_out in ((1, size[0]), (2, size[1])):
    n_in = out.shape[axis]
    if n_in == n_out:
      continue
    i0, i1, lam = _linear_taps(n_in, n_out)
    shape = [1] * out.ndim
    shape[axis] = n_out
    lam = jnp.asarray(lam, jnp.float32).reshape(shape).astype(out.dtype)
    out = jnp.take(out, i0, axis=axis) * (1 - lam) + jnp.take(out, i1, axis=axis) * lam
  return out

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
the naive form otherwise; on the CPU platform (`cpu_formulation`) always blockwise, in chunks of
(batch, head) problems or of one problem's queries within 2^21 scores (one chunk when all scores
are few), with the softmax's division applied to the output: 3-5x faster there than the naive
form at 1024-4096 tokens. At 1024x1024 the U-Net's bottom self-attention has 16,384 tokens; the
PyTorch reference materialises a 16 GiB score matrix there and runs out of memory (spec §10).
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

ATTENTION_IMPLS = ("auto", "naive", "xla", "cudnn", "blockwise")
# "auto" switches to blockwise above this many scores per batch element (all heads): 64 Mi floats
# = 256 MiB in float32.
AUTO_BLOCKWISE_THRESHOLD = 1 << 26


# Forces `cpu_formulation` for every call while set (benchmarks time both formulations in one
# process through `formulation_override`); None: decided by the platform.
_FORMULATION_OVERRIDE: bool | None = None


def cpu_formulation(override: bool | None = None) -> bool:
  """Whether to trace the CPU-tuned formulations (hand-written backward passes) of this module.

  Decided at trace time from the default backend: True on "cpu", False on GPU/TPU, where the
  original formulations (differentiated by JAX) stay. `override` forces one (tests)."""
  if override is not None:
    return override
  if _FORMULATION_OVERRIDE is not None:
    return _FORMULATION_OVERRIDE
  return jax.default_backend() == "cpu"


@contextlib.contextmanager
def formulation_override(cpu: bool | None):
  """Within the block, trace the CPU formulations (True) or the original ones (False)."""
  global _FORMULATION_OVERRIDE
  old, _FORMULATION_OVERRIDE = _FORMULATION_OVERRIDE, cpu
  try:
    yield
  finally:
    _FORMULATION_OVERRIDE = old


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


def _layer_norm_reference(x: Array, scale: Array, bias: Array | None, eps: float) -> Array:
  """float32 LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale (+ bias)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale
  return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """`_layer_norm_reference` with the textbook backward pass, for XLA's CPU backend.

  Saves x and the per-row (mean, 1/std) instead of XLA's chain of intermediates, and computes
  dx = rstd (dŷ - mean(dŷ) - x̂ mean(dŷ x̂)) with dŷ = g·scale in two row reductions."""
  return _layer_norm_reference(x, scale, bias, eps)


def _layer_norm_cpu_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  return (x32 - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_cpu_bwd(eps, res, g):
  del eps
  x, mean, rstd, scale = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g = g.astype(jnp.float32)
  gy = g * scale
  dx = rstd * (gy - jnp.mean(gy, axis=-1, keepdims=True)
               - xhat * jnp.mean(gy * xhat, axis=-1, keepdims=True))
  axes = tuple(range(g.ndim - 1))
  return dx.astype(x.dtype), jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)


_layer_norm_cpu.defvjp(_layer_norm_cpu_fwd, _layer_norm_cpu_bwd)


def layer_norm(x: Array, scale: Array, bias: Array | None, eps: float, *,
               cpu: bool | None = None) -> Array:
  """float32 LayerNorm over the last axis of x [..., C] with scale [C] and optional bias [C].

  On the CPU platform (`cpu_formulation`) the backward pass is hand-written (`_layer_norm_cpu`);
  elsewhere JAX differentiates the reference formulation."""
  if not cpu_formulation(cpu):
    return _layer_norm_reference(x, scale, bias, eps)
  return _layer_norm_cpu(x, scale, jnp.zeros_like(scale) if bias is None else bias, eps)


class ChannelLayerNorm(nnx.Module):
  """LayerNorm over the channel axis with a gain `g` and no bias (IR-SDE `module_util.LayerNorm`).

  eps is 1e-5 for float32 compute and 1e-3 otherwise, as in the reference.
  """

  def __init__(self, dim: int, *, dtype=jnp.float32):
    self.g = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    eps = 1e-5 if jnp.dtype(self.dtype) == jnp.float32 else 1e-3
    return layer_norm(x, self.g[...], None, eps).astype(self.dtype)


class LayerNorm(nnx.Module):
  """nn.LayerNorm over the last axis (weight `scale`, `bias`), computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: Array) -> Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


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


def _cpu_chunks(groups: int, lq: int, lk: int, max_block_elements: int) -> tuple[int, int]:
  """(groups per chunk, queries per chunk) of the CPU attention for `groups` = batch x heads
  independent [lq, lk] problems and a budget of scores per chunk. All problems in one chunk up to
  twice the budget (small problems: there a loop costs more than the chunk's cache misses); else
  whole problems where one fits (as many as fit, a divisor of `groups`); else one problem's
  largest power of two of queries within the budget (>= 16)."""
  if groups * lq * lk <= 2 * max_block_elements:
    return groups, lq
  if lq * lk <= max_block_elements:
    fit = max_block_elements // (lq * lk)
    return max(g for g in range(1, min(fit, groups) + 1) if groups % g == 0), lq
  return 1, min(lq, _block_size(lk, 1, max_block_elements))


# Chunks of the blockwise attention on the CPU: a chunk is some (batch, head) pairs' whole
# problems or one pair's queries, at most 2^21 scores (8 MiB; all problems in one chunk up to
# 2^22). Measured at 2 threads (benchmarks/RESULTS.md, issue 23): 4096 tokens x 8 heads x 40,
# value 273-284 -> 183 ms and value + gradient 859 -> 663 ms against the former chunks of 128
# queries x all heads; 1024 tokens x 8 heads x 80: 29-34 -> 20-22 ms. On accelerators the
# heads stay batched in each chunk of queries, within BLOCK_ELEMENTS scores per batch element, to
# keep the matmuls busy.
BLOCK_ELEMENTS_CPU = 1 << 21
BLOCK_ELEMENTS = 1 << 24


def _chunk_attention(q: Array, k: Array, v: Array) -> Array:
  """Attention of one chunk: q [..., Lq, D] (already scaled), k, v [..., Lk, D] (same leading
  axes). The softmax's normalisation divides the [Lq, D] output instead of the [Lq, Lk] weights.
  The row max only shifts the exponent (it cancels in the ratio), so no gradient flows through
  it: the backward pass skips the max's gradient (1.2 -> 1.0 s at 4096 tokens x 8 heads, 2
  cores)."""
  s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  o = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o / jnp.sum(p, axis=-1, keepdims=True)


def _query_chunks(q: Array, block: int, fn) -> Array:
  """fn over chunks of `block` queries along axis -2 of q (zero-padded to a multiple), each
  rematerialised in the backward pass (which then recomputes a chunk's scores instead of storing
  them all, so training memory stays O(block * Lk) as well); the outputs concatenated."""
  lq, d = q.shape[-2:]
  if block >= lq:
    return fn(q)
  n = -(-lq // block)
  qp = jnp.pad(q, [(0, 0)] * (q.ndim - 2) + [(0, n * block - lq), (0, 0)])
  qb = jnp.moveaxis(qp.reshape(*q.shape[:-2], n, block, d), -3, 0)  # [n, ..., block, D]
  out = jax.lax.map(jax.checkpoint(fn), qb)
  return jnp.moveaxis(out, 0, -3).reshape(*q.shape[:-2], n * block, -1)[..., :lq, :]


def _blockwise_attention(q: Array, k: Array, v: Array, max_block_elements: int) -> Array:
  """Accelerators: chunks of queries x all heads and batch elements, heads-major."""
  b, lq, h, d = q.shape
  block = _block_size(k.shape[1], h, max_block_elements)
  qh = jnp.moveaxis(q * jnp.asarray(d ** -0.5, q.dtype), 2, 1)  # [B, H, Lq, D]
  kh, vh = jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)
  out = _query_chunks(qh, block, lambda qc: _chunk_attention(qc, kh, vh))
  return jnp.moveaxis(out, 1, 2).astype(q.dtype)


def _blockwise_attention_cpu(q: Array, k: Array, v: Array, max_block_elements: int) -> Array:
  """The CPU: the batch x heads problems in groups (`_cpu_chunks`), each group's queries in
  chunks; a loop over groups, and within it over query chunks."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  per_chunk, block = _cpu_chunks(b * h, lq, lk, max_block_elements)
  flat = lambda x: jnp.moveaxis(x, 2, 1).reshape(b * h, x.shape[1], d)  # [B * H, L, D]
  qh, kh, vh = flat(q * jnp.asarray(d ** -0.5, q.dtype)), flat(k), flat(v)

  def group(args):  # [G, L, D] each
    qg, kg, vg = args
    return _query_chunks(qg, block, lambda qc: _chunk_attention(qc, kg, vg))

  n = b * h // per_chunk
  if n == 1:
    out = group((qh, kh, vh))
  else:
    split = lambda x: x.reshape(n, per_chunk, *x.shape[1:])
    out = jax.lax.map(group, (split(qh), split(kh), split(vh)))
  return jnp.moveaxis(out.reshape(b, h, lq, d), 1, 2).astype(q.dtype)


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
  if cpu_formulation() or q_len * k_len * heads > AUTO_BLOCKWISE_THRESHOLD:
    return "blockwise"  # on the CPU also when one chunk holds all: its form is faster
  return "naive"


def attention(q: Array, k: Array, v: Array, *, impl: str = "auto",
              max_block_elements: int | None = None) -> Array:
  """softmax(q k^T / sqrt(d)) v for q [B, Lq, H, D], k/v [B, Lk, H, D]; returns [B, Lq, H, D].

  `max_block_elements`: scores per chunk of "blockwise": on the CPU platform per chunk of
  (batch, head) problems or queries (default `BLOCK_ELEMENTS_CPU`), elsewhere per batch element
  of a chunk of queries x all heads (default `BLOCK_ELEMENTS`)."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, H, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  impl = resolve_attention_impl(impl, q.shape[1], k.shape[1], q.shape[2], q.dtype)
  if impl == "naive":
    return _naive_attention(q, k, v)
  if impl == "blockwise":
    if cpu_formulation():
      return _blockwise_attention_cpu(q, k, v, max_block_elements or BLOCK_ELEMENTS_CPU)
    return _blockwise_attention(q, k, v, max_block_elements or BLOCK_ELEMENTS)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def dense(din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, use_bias: bool = True,
          zero: bool = False) -> nnx.Linear:
  """nn.Linear-like layer (PyTorch's default uniform init unless `zero`)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform")
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


@jax.custom_vjp
def _linear_cpu(x: Array, kernel: Array) -> Array:
  """x [..., Cin] @ kernel [Cin, Cout] with a hand-written backward pass, for XLA's CPU backend.

  For the kernel gradient x^T g, XLA CPU transposes g [N, Cout] into a [Cout, N] copy whose
  strided writes thrash the cache (the U-Net's LinearAttention q/k/v gradient at 64x64: ~10% of
  its training step). Here g^T x is contracted over the rows ([Cout, Cin]) and the small result
  transposed."""
  return jnp.dot(x, kernel)


def _linear_cpu_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _linear_cpu_bwd(res, g):
  x, kernel = res
  gk = jax.lax.dot_general(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]),
                           (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return jnp.dot(g, kernel.T).astype(x.dtype), gk.T.astype(kernel.dtype)


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


def linear(x: Array, kernel: Array, *, cpu: bool | None = None) -> Array:
  """x [..., Cin] @ kernel [Cin, Cout]; on the CPU platform (`cpu_formulation`) with the
  hand-written backward pass of `_linear_cpu`."""
  return (_linear_cpu if cpu_formulation(cpu) else jnp.dot)(x, kernel)


def _shifted_sum(xp: Array, kernel: Array, h: int, w: int) -> Array:
  """sum over (i, j) of xp[:, i:i + h, j:j + w, :] * kernel[i, j]: one fused elementwise loop."""
  k = kernel.shape[0]
  out = None
  for dy in range(k):
    for dx in range(k):
      term = xp[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx]
      out = term if out is None else out + term
  return out


def _dwconv_reference(x: Array, kernel: Array, bias: Array) -> Array:
  """Depthwise k x k convolution, zero padding k // 2: x [B, H, W, C], kernel [k, k, C], bias [C].

  Differentiated by JAX itself (the original formulation; kept on accelerators)."""
  k, (_, h, w, _) = kernel.shape[0], x.shape
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  return bias + _shifted_sum(xp, kernel, h, w)


def _channel_sums(terms: list[Array]) -> list[Array]:
  """[sum over (N, H, W) of t for t in terms] for float32 terms [N, H, W, C], in one pass.

  One variadic reduce over W (then a small sum over N, H): XLA CPU fuses the terms' producers
  (here the shifted slices of the padded input times the output gradient) into one loop that
  reads each input once. Separate per-term sums over (N, H, W) go to YNNPACK reductions that
  first materialise every shifted slice: 4-5x slower for the depthwise kernel gradient."""
  add = lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True))
  partial = jax.lax.reduce(terms, [jnp.float32(0)] * len(terms), add, (2,))
  return [jnp.sum(t, axis=(0, 1)) for t in partial]


@jax.custom_vjp
def _dwconv_cpu(x: Array, kernel: Array, bias: Array) -> Array:
  """`_dwconv_reference` with a hand-written backward pass, for XLA's CPU backend.

  XLA's own gradient of the shifted sum transposes each slice into a zero-padded full-size buffer
  and adds the k² buffers (then transposes the sum for the next matmul in one poorly ordered
  loop), and saves the k² shifted copies of the input for the kernel gradient: together ~60% of a
  NAFNet backward pass on CPU. Here the input gradient is the same shifted sum on the padded
  output gradient with the kernel flipped, and the kernel gradient reads the padded input and the
  output gradient once per tap; only x is saved.
  """
  return _dwconv_reference(x, kernel, bias)


def _dwconv_cpu_fwd(x, kernel, bias):
  return _dwconv_reference(x, kernel, bias), (x, kernel)


def _dwconv_cpu_bwd(res, g):
  x, kernel = res
  k, (_, h, w, _) = kernel.shape[0], x.shape
  p = k // 2
  # out[y] = sum_i xp[y + i] k[i]  =>  dx[y] = sum_i gp[y + 2p - i] k[i] = sum_j gp[y + j] k[2p-j].
  gp = jnp.pad(g, ((0, 0), (p, p), (p, p), (0, 0)))
  dx = _shifted_sum(gp, kernel[::-1, ::-1], h, w).astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  g32 = g.astype(jnp.float32)
  sums = _channel_sums([xp[:, dy:dy + h, dx_:dx_ + w, :].astype(jnp.float32) * g32
                        for dy in range(k) for dx_ in range(k)] + [g32])
  dk = jnp.stack(sums[:-1]).reshape(k, k, -1)
  return dx, dk.astype(kernel.dtype), sums[-1].astype(g.dtype)


_dwconv_cpu.defvjp(_dwconv_cpu_fwd, _dwconv_cpu_bwd)


def depthwise_conv(x: Array, kernel: Array, bias: Array, *, cpu: bool | None = None) -> Array:
  """k x k depthwise convolution with zero padding k // 2 on NHWC: kernel [k, k, C], bias [C].

  The forward pass is k² shifted multiply-adds either way; on the CPU platform (`cpu_formulation`)
  the backward pass is hand-written (`_dwconv_cpu`)."""
  if kernel.ndim != 3 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
    raise ValueError(f"depthwise kernel must be [k, k, C] with odd k, got {kernel.shape}")
  return (_dwconv_cpu if cpu_formulation(cpu) else _dwconv_reference)(x, kernel, bias)


class DepthwiseConv(nnx.Module):
  """k x k depthwise convolution (PyTorch Conv2d(c, c, k, padding=k // 2, groups=c)), NHWC.

  Same parameters as `nnx.Conv(c, c, (k, k), feature_group_count=c)` (kernel [k, k, 1, c], bias
  [c]), computed as k² shifted multiply-adds that XLA fuses into one elementwise loop: on CPUs
  XLA's grouped-convolution gradient is ~50x slower than this (a NAFNet train step took seconds),
  and on accelerators it is one memory-bound fusion either way. On the CPU platform the backward
  pass is hand-written too (see `depthwise_conv`).
  """

  def __init__(self, c: int, kernel: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, c), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.k, self.dtype = kernel, dtype

  def __call__(self, x: Array) -> Array:
    return depthwise_conv(x.astype(self.dtype), self.kernel[...][:, :, 0].astype(self.dtype),
                          self.bias[...].astype(self.dtype))


def conv2d(x: Array, kernel: Array, bias: Array | None, stride: int,
           pad: tuple[tuple[int, int], tuple[int, int]], *, cpu: bool | None = None) -> Array:
  """NHWC convolution, kernel [kh, kw, Cin, Cout] (HWIO), `pad` ((top, bottom), (left, right)).

  The original formulation is `lax.conv_general_dilated`. On the CPU platform (`cpu_formulation`)
  a convolution whose kernel equals its stride without padding (NAFNet's 2x2/2 `downs`, every
  1x1 convolution) is space-to-depth (a reshape) and one matmul: XLA CPU's gradient of a strided
  convolution is an input-dilated convolution on a slow path. Every other convolution is lax's,
  which XLA CPU runs on its Eigen kernels once YNNPACK's convolutions are off (`uir_jax.xla_cpu`;
  a hand-written matmul kernel gradient for 3x3 convolutions measured slower than those, RESULTS
  issue 22)."""
  kh, kw, cin, cout = kernel.shape
  if not cpu_formulation(cpu) or not _conv_cpu_wins(x.shape, (kh, kw), stride, pad):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias
  b, h, w, _ = x.shape
  s = stride
  # Space-to-depth: x'[u, v, (i, j, c)] = x[s·u + i, s·v + j, c]; the kernel likewise.
  ho, wo = h // s, w // s
  x = x[:, :ho * s, :wo * s].reshape(b, ho, s, wo, s, cin).transpose(0, 1, 3, 2, 4, 5)
  y = jnp.dot(x.reshape(-1, s * s * cin), kernel.reshape(s * s * cin, cout))
  y = y.reshape(b, ho, wo, cout)
  return y if bias is None else y + bias


def _conv_cpu_wins(shape, kernel_size, stride: int, pad) -> bool:
  """Whether `conv2d`'s CPU formulation (space-to-depth and a matmul) applies to this NHWC
  convolution: kernel == stride, no padding, concrete spatial sizes (`jax.export` with shape
  polymorphism keeps lax's convolution: an export is inference, where the two agree)."""
  if not all(isinstance(d, int) for d in shape[1:3]):
    return False
  return tuple(kernel_size) == (stride, stride) and all(p == 0 for side in pad for p in side)


class Conv(nnx.Conv):
  """`nnx.Conv` (same parameters, attributes and results). On the CPU platform the convolutions
  for which `_conv_cpu_wins` (kernel == stride, no padding: space-to-depth and a matmul) are
  computed by `conv2d`, every other one exactly as `nnx.Conv`."""

  def __call__(self, x: Array) -> Array:
    pad = self.padding
    strides = self.strides if isinstance(self.strides, (tuple, list)) else (self.strides,) * 2
    simple = (x.ndim == 4 and self.feature_group_count == 1
              and self.input_dilation in (1, (1, 1), None)
              and self.kernel_dilation in (1, (1, 1), None) and len(self.kernel_size) == 2
              and strides[0] == strides[1] and isinstance(pad, (tuple, list))
              and self.mask is None)
    if not simple or not cpu_formulation() or not _conv_cpu_wins(
        x.shape, tuple(self.kernel_size), strides[0], pad):
      return super().__call__(x)
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    bias = self.bias[...].astype(self.dtype) if self.bias is not None else None
    return conv2d(x, kernel, bias, strides[0], tuple(tuple(p) for p in pad))


def conv(din: int, dout: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | None = None, use_bias: bool = True, dtype=jnp.float32) -> Conv:
  """nn.Conv2d-like NHWC convolution with symmetric zero padding (default kernel // 2)."""
  p = kernel // 2 if padding is None else padding
  return Conv(din, dout, kernel_size=(kernel, kernel), strides=(stride, stride),
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

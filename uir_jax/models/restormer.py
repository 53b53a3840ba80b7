"""Restormer (Zamir et al., CVPR 2022) in Flax NNX: swz30/Restormer's `restormer_arch.py`.

    net = Restormer(rngs=nnx.Rngs(0))                            # the released 26 M model
    net = Restormer(**RESTORMER_VARIANTS["real_denoising"], rngs=nnx.Rngs(0))
    restored = net(lq)                                           # NHWC in [0, 1]

A 4-level U-shaped transformer. Each `TransformerBlock` is

  * x = x + MDTA(LN(x)): "transposed" attention across CHANNELS, not pixels: a 1x1 conv to q|k|v,
    a 3x3 depthwise conv on the 3C channels, then per head the [c/h, c/h] matrix of cosine
    similarities between the channel maps (q and k L2-normalised over the pixels), multiplied by
    a learnable per-head `temperature`, softmax over the key channels, applied to v; 1x1 out;
  * x = x + GDFN(LN(x)): 1x1 conv to 2·hidden, 3x3 depthwise, GELU(first half) · second half,
    1x1 back (hidden = int(dim · ffn_expansion_factor)).

LN is a LayerNorm over the channels of each pixel: "WithBias" (nn.LayerNorm, eps 1e-5) or
"BiasFree" (x / sqrt(var + 1e-5) · w: the variance is around the mean, but the mean is NOT
subtracted). Downsample = 3x3 conv c -> c/2 + PixelUnshuffle(2); Upsample = 3x3 conv c -> 2c +
PixelShuffle(2). Level widths dim, 2·dim, 4·dim, 8·dim; the decoder concatenates skips (levels
3, 2 reduced by a 1x1 conv; level 1 stays at 2·dim), then `refinement` blocks, a 3x3 `output` conv
and the input residual. `dual_pixel_task` (6-channel L|R input): the output is
output(x + skip_conv(patch_embed)) with no input residual.

The official forward needs sides divisible by 8; like the official demo we reflect-pad the bottom
and right to a multiple of 8 and crop the output (identical for sizes that are multiples of 8).

Names follow the PyTorch modules (`patch_embed`, `encoder_level1..3`, `down1_2`, `latent`,
`up4_3`, `reduce_chan_level3`, `decoder_level1..3`, `refinement`, `output`, `skip_conv`; inside a
block `norm1/2`, `attn.{qkv, qkv_dwconv, temperature, project_out}`, `ffn.{project_in, dwconv,
project_out}`) so `uir_jax/convert/restormer.py` is a near-identity key map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import (
    DepthwiseConv,
    LayerNorm,
    conv,
    dense,
    pixel_shuffle,
    pixel_unshuffle,
)

Array = jax.Array

LAYERNORM_TYPES = ("WithBias", "BiasFree")
PAD_MULTIPLE = 8  # three 2x downsamplings

# The released checkpoints' constructor options (swz30/Restormer `demo.py` and test scripts); the
# rest is the default: dim 48, num_blocks (4, 6, 6, 8), 4 refinement blocks, heads (1, 2, 4, 8),
# ffn_expansion_factor 2.66, bias False, WithBias LayerNorm.
RESTORMER_VARIANTS: dict[str, dict] = {
    "motion_deblurring": {},
    "single_image_defocus_deblurring": {},
    "deraining": {},
    "dual_pixel_defocus_deblurring": dict(inp_channels=6, dual_pixel_task=True),
    "real_denoising": dict(layernorm_type="BiasFree"),
    "gaussian_color_denoising": dict(layernorm_type="BiasFree"),
    "gaussian_gray_denoising": dict(inp_channels=1, out_channels=1, layernorm_type="BiasFree"),
}

__all__ = ["RESTORMER_VARIANTS", "BiasFreeLayerNorm", "FeedForward", "MDTA", "Restormer",
           "TransformerBlock", "Downsample", "Upsample", "hidden_features", "restormer_norm"]


@dataclasses.dataclass(frozen=True)
class _ZeroBias:
  """Reads like a bias Variable (`bias[...]`) but is a static constant: no parameter, no state,
  so a bias-free conv's parameters are exactly the checkpoint's (and eval_shape leaves nothing
  abstract behind)."""

  c: int

  def __getitem__(self, index) -> Array:
    return jnp.zeros((self.c,), jnp.float32)[index]


def depthwise3x3(c: int, bias: bool, *, rngs: nnx.Rngs, dtype) -> DepthwiseConv:
  """nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias) as the house's `DepthwiseConv`."""
  m = DepthwiseConv(c, 3, rngs=rngs, dtype=dtype)
  if not bias:
    # The released models have no conv biases; a zero constant keeps DepthwiseConv's one code
    # path while leaving the parameter set equal to the checkpoint's.
    m.bias = nnx.static(_ZeroBias(c))
  return m


class BiasFreeLayerNorm(nnx.Module):
  """Restormer's BiasFree_LayerNorm over the last axis: x / sqrt(var(x) + 1e-5) · scale.

  The variance is the biased one around the mean, but the mean is not subtracted from x.
  """

  def __init__(self, dim: int, *, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.var(x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + 1e-5) * self.scale[...]).astype(self.dtype)


def restormer_norm(kind: str, dim: int, dtype) -> nnx.Module:
  if kind == "WithBias":
    return LayerNorm(dim, eps=1e-5, dtype=dtype)
  if kind == "BiasFree":
    return BiasFreeLayerNorm(dim, dtype=dtype)
  raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {kind!r}")


def hidden_features(dim: int, ffn_expansion_factor: float) -> int:
  """GDFN hidden width, computed as the official code does (Python float, truncated)."""
  return int(dim * ffn_expansion_factor)


class MDTA(nnx.Module):
  """Multi-Dconv head Transposed Attention on [B, H, W, dim] (attention across channels)."""

  def __init__(self, dim: int, num_heads: int, bias: bool, *, rngs: nnx.Rngs, dtype):
    if dim % num_heads:
      raise ValueError(f"MDTA: {dim} channels are not divisible into {num_heads} heads")
    kw = dict(rngs=rngs, dtype=dtype)
    self.num_heads, self.dtype = num_heads, dtype
    # [heads] (PyTorch [heads, 1, 1]): scales each head's cosine-similarity logits.
    self.temperature = nnx.Param(jnp.ones((num_heads,), jnp.float32))
    self.qkv = dense(dim, 3 * dim, use_bias=bias, **kw)
    self.qkv_dwconv = depthwise3x3(3 * dim, bias, **kw)
    self.project_out = dense(dim, dim, use_bias=bias, **kw)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    qkv = self.qkv_dwconv(self.qkv(x.astype(self.dtype)))
    # Channel index = head · (c / heads) + channel-in-head, as einops 'b (head c) h w'.
    q, k, v = (t.reshape(b, h * w, self.num_heads, c // self.num_heads)
               for t in jnp.split(qkv, 3, axis=-1))

    def normalize(t):  # F.normalize over the pixels: t / max(||t||, 1e-12)
      # An all-zero channel (a black crop: bias-free convs keep it zero) gets no gradient instead
      # of sqrt'(0) · 0 = NaN (a guided PromptIR run stopped on one); the values are unchanged.
      t = t.astype(jnp.float32)
      sq = jnp.sum(t * t, axis=1, keepdims=True)
      ok = sq > 1e-24
      return jnp.where(ok, t * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)),
                       jax.lax.stop_gradient(t * 1e12))

    logits = jnp.einsum("bnhi,bnhj->bhij", normalize(q), normalize(k))
    attn = jax.nn.softmax(logits * self.temperature[...][None, :, None, None], axis=-1)
    out = jnp.einsum("bhij,bnhj->bnhi", attn.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).astype(self.dtype)
    return self.project_out(out.reshape(b, h, w, c))


class FeedForward(nnx.Module):
  """Gated-Dconv Feed-forward Network: project_out(GELU(a) · b), [a | b] = dwconv(project_in(x))."""

  def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, *, rngs: nnx.Rngs,
               dtype):
    hidden = hidden_features(dim, ffn_expansion_factor)
    kw = dict(rngs=rngs, dtype=dtype)
    self.project_in = dense(dim, 2 * hidden, use_bias=bias, **kw)
    self.dwconv = depthwise3x3(2 * hidden, bias, **kw)
    self.project_out = dense(hidden, dim, use_bias=bias, **kw)

  def __call__(self, x: Array) -> Array:
    x1, x2 = jnp.split(self.dwconv(self.project_in(x)), 2, axis=-1)
    return self.project_out(jax.nn.gelu(x1, approximate=False) * x2)


class TransformerBlock(nnx.Module):
  """x + MDTA(LN(x)), then + GDFN(LN(x)); [B, H, W, dim] -> same."""

  def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool,
               layernorm_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.norm1 = restormer_norm(layernorm_type, dim, dtype)
    self.attn = MDTA(dim, num_heads, bias, **kw)
    self.norm2 = restormer_norm(layernorm_type, dim, dtype)
    self.ffn = FeedForward(dim, ffn_expansion_factor, bias, **kw)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.norm1(x))
    return x + self.ffn(self.norm2(x))


class Downsample(nnx.Module):
  """3x3 conv c -> c/2 (no bias), PixelUnshuffle(2): [B, H, W, c] -> [B, H/2, W/2, 2c]."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype):
    self.conv = conv(c, c // 2, 3, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return pixel_unshuffle(self.conv(x))


class Upsample(nnx.Module):
  """3x3 conv c -> 2c (no bias), PixelShuffle(2): [B, H, W, c] -> [B, 2H, 2W, c/2]."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype):
    self.conv = conv(c, 2 * c, 3, use_bias=False, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return pixel_shuffle(self.conv(x))


def blocks(n: int, dim: int, heads: int, opts: dict, rngs: nnx.Rngs, dtype) -> nnx.List:
  """`n` TransformerBlocks of width `dim` (an nn.Sequential in the reference)."""
  return nnx.List([TransformerBlock(dim, heads, rngs=rngs, dtype=dtype, **opts) for _ in range(n)])


def run(seq: nnx.List, x: Array) -> Array:
  for blk in seq:
    x = blk(x)
  return x


def check_levels(num_blocks: Sequence[int], heads: Sequence[int], dim: int) -> None:
  if len(num_blocks) != 4 or len(heads) != 4:
    raise ValueError(f"num_blocks and heads need 4 entries (3 encoder levels + latent), got "
                     f"{tuple(num_blocks)} and {tuple(heads)}")
  if dim < 2 or dim % 2:
    raise ValueError(f"dim must be even (Downsample halves it), got {dim}")
  if min(num_blocks) < 0:
    raise ValueError(f"block counts must be >= 0, got {tuple(num_blocks)}")


def pad_to_multiple(x: Array, m: int = PAD_MULTIPLE) -> Array:
  """Reflect-pads bottom/right to a multiple of `m` (the official demo's F.pad(..., 'reflect'))."""
  ph, pw = -x.shape[1] % m, -x.shape[2] % m
  if not (ph or pw):
    return x
  if ph >= x.shape[1] or pw >= x.shape[2]:
    raise ValueError(f"image {x.shape[1]}x{x.shape[2]} is too small to reflect-pad to a multiple "
                     f"of {m}")
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")


class Restormer(nnx.Module):
  """Restormer on NHWC images; defaults are the released models' (see `RESTORMER_VARIANTS`).

  Args:
    inp_channels, out_channels: image channels (6 in for dual-pixel L|R, 1 for gray denoising).
    dim: level-1 width; levels are dim · (1, 2, 4, 8).
    num_blocks: transformer blocks at encoder levels 1-3 (mirrored in the decoder) and the latent.
    num_refinement_blocks: blocks after decoder level 1 (width 2·dim).
    heads: attention heads per level (decoder level 1 and refinement use heads[0]).
    ffn_expansion_factor: GDFN hidden width = int(width · factor).
    bias: biases in the blocks' convs, reduce_chan, skip_conv and output.
    layernorm_type: "WithBias" or "BiasFree".
    dual_pixel_task: 6-channel L|R input, skip_conv, no input residual.
    dtype: compute dtype (parameters float32; norms and softmax in float32).
  """

  def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
               num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
               heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
               bias: bool = False, layernorm_type: str = "WithBias",
               dual_pixel_task: bool = False, *, rngs: nnx.Rngs, dtype=jnp.float32):
    check_levels(num_blocks, heads, dim)
    if layernorm_type not in LAYERNORM_TYPES:
      raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
    if not dual_pixel_task and inp_channels != out_channels:
      raise ValueError(f"the input residual needs inp_channels == out_channels, got "
                       f"{inp_channels} and {out_channels} (dual_pixel_task has no residual)")
    self.inp_channels, self.out_channels, self.dim = inp_channels, out_channels, dim
    self.num_blocks, self.heads = tuple(num_blocks), tuple(heads)
    self.dual_pixel_task, self.dtype = bool(dual_pixel_task), dtype
    kw = dict(rngs=rngs, dtype=dtype)
    opts = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                layernorm_type=layernorm_type)
    nb, hd = self.num_blocks, self.heads
    self.patch_embed = conv(inp_channels, dim, 3, use_bias=False, **kw)  # OverlapPatchEmbed
    self.encoder_level1 = blocks(nb[0], dim, hd[0], opts, **kw)
    self.down1_2 = Downsample(dim, **kw)
    self.encoder_level2 = blocks(nb[1], 2 * dim, hd[1], opts, **kw)
    self.down2_3 = Downsample(2 * dim, **kw)
    self.encoder_level3 = blocks(nb[2], 4 * dim, hd[2], opts, **kw)
    self.down3_4 = Downsample(4 * dim, **kw)
    self.latent = blocks(nb[3], 8 * dim, hd[3], opts, **kw)
    self.up4_3 = Upsample(8 * dim, **kw)
    self.reduce_chan_level3 = dense(8 * dim, 4 * dim, use_bias=bias, **kw)
    self.decoder_level3 = blocks(nb[2], 4 * dim, hd[2], opts, **kw)
    self.up3_2 = Upsample(4 * dim, **kw)
    self.reduce_chan_level2 = dense(4 * dim, 2 * dim, use_bias=bias, **kw)
    self.decoder_level2 = blocks(nb[1], 2 * dim, hd[1], opts, **kw)
    self.up2_1 = Upsample(2 * dim, **kw)  # no channel reduction: level 1 decodes at 2·dim
    self.decoder_level1 = blocks(nb[0], 2 * dim, hd[0], opts, **kw)
    self.refinement = blocks(num_refinement_blocks, 2 * dim, hd[0], opts, **kw)
    self.skip_conv = dense(dim, 2 * dim, use_bias=bias, **kw) if dual_pixel_task else None
    self.output = conv(2 * dim, out_channels, 3, use_bias=bias, **kw)

  def __call__(self, x: Array) -> Array:
    """[B, H, W, inp_channels] -> float32 [B, H, W, out_channels]."""
    if x.ndim != 4 or x.shape[-1] != self.inp_channels:
      raise ValueError(f"Restormer expects [B, H, W, {self.inp_channels}], got {x.shape}")
    h, w = x.shape[1:3]
    inp = pad_to_multiple(x.astype(jnp.float32))
    emb1 = self.patch_embed(inp.astype(self.dtype))
    enc1 = run(self.encoder_level1, emb1)
    enc2 = run(self.encoder_level2, self.down1_2(enc1))
    enc3 = run(self.encoder_level3, self.down2_3(enc2))
    lat = run(self.latent, self.down3_4(enc3))
    d3 = self.reduce_chan_level3(jnp.concatenate([self.up4_3(lat), enc3], axis=-1))
    d3 = run(self.decoder_level3, d3)
    d2 = self.reduce_chan_level2(jnp.concatenate([self.up3_2(d3), enc2], axis=-1))
    d2 = run(self.decoder_level2, d2)
    d1 = run(self.decoder_level1, jnp.concatenate([self.up2_1(d2), enc1], axis=-1))
    d1 = run(self.refinement, d1)
    if self.dual_pixel_task:
      out = self.output(d1 + self.skip_conv(emb1)).astype(jnp.float32)
    else:
      out = self.output(d1).astype(jnp.float32) + inp
    return out[:, :h, :w]

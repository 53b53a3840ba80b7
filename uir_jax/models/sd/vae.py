"""diffusers `AutoencoderKL` (the SD VAE) in Flax NNX, NHWC (spec §3.3).

    vae = AutoencoderKL(json.load(open("vae/config.json")), rngs=nnx.Rngs(0))
    mean, logvar = vae.encode(images)                 # images [B, H, W, 3] in [-1, 1]
    z = (mean + jnp.exp(0.5 * logvar) * noise) * vae.scaling_factor   # latents fed to the UNet
    images = vae.decode(z / vae.scaling_factor)      # [B, H, W, 3] in about [-1, 1]

`encode(..., return_features=True)` also returns the encoder's features per level (what
Diff-Restorer's degradation-aware decoder fuses).

Tiled encode/decode (`encode(x, tiled=True)`, `decode(z, tiled=True)`, or `tiled_encode` /
`tiled_decode` directly) bound memory by the tile size for large images, with diffusers'
`enable_tiling` rule exactly (so the outputs equal diffusers' `tiled_encode` / `tiled_decode`):
tiles of `tile_size` pixels (default: the config's `sample_size`, diffusers'
`tile_sample_min_size`; `tile_size // f` latents) start every `int(tile·(1 - overlap))` input
rows/columns (overlap 0.25), the last ones cut by the border; in raster order each tile's output is
blended over its first `e = int(out_tile·overlap)` rows with the (already blended) tile above,
`b[y] = a[y - e] (1 - y/e) + b[y] y/e`, then likewise over its first columns with the tile on its
left, and its first `out_tile - e` rows and columns are kept. Each tile is a separate network
call (GroupNorm statistics are per tile), so the result differs from the untiled one except with a
single tile. Tiles of one shape run in one `lax.map` (a loop): one tile's activations are live at
a time, under `jit` too. Names follow diffusers (`encoder.down_blocks[i].
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
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


def _blend(a: Array, b: Array, extent: int, axis: int) -> Array:
  """diffusers `blend_v` (axis 1) / `blend_h` (axis 2) on NHWC: b's first e rows (columns) become
  a[-e + y] (1 - y/e) + b[y] (y/e), e = min(extent, both sizes)."""
  e = min(a.shape[axis], b.shape[axis], extent)
  if e <= 0:
    return b
  shape = [1, 1, 1, 1]
  shape[axis] = e
  w = (jnp.arange(e, dtype=jnp.float32) / e).reshape(shape).astype(b.dtype)
  head = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis) * (1 - w) \
      + jax.lax.slice_in_dim(b, 0, e, axis=axis) * w
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)


def tiled_apply(fn, x: Array, tile: int, out_tile: int, overlap: float = TILE_OVERLAP) -> Array:
  """`fn` on overlapping `tile`² tiles of x [B, H, W, C], blended as diffusers' tiling (see the
  module docstring): `fn` maps [B, h, w, C] -> [B, h·r, w·r, C'] with r = out_tile / tile.

  Tiles of one shape (at most four: inner, right, bottom, corner) run in one `lax.map`.
  """
  stride = int(tile * (1 - overlap))
  extent = int(out_tile * overlap)
  keep = out_tile - extent
  if stride < 1 or keep < 1:
    raise ValueError(f"tiled VAE: tile size {tile} with overlap {overlap} leaves no stride")
  b, h, w, c = x.shape
  ys, xs = range(0, h, stride), range(0, w, stride)
  groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for y in ys:
    for x0 in xs:
      groups.setdefault((min(tile, h - y), min(tile, w - x0)), []).append((y, x0))
  out: dict[tuple[int, int], Array] = {}
  for (th, tw), starts in groups.items():
    at = jnp.asarray(starts, jnp.int32)
    res = jax.lax.map(
        lambda s, th=th, tw=tw: fn(jax.lax.dynamic_slice(x, (0, s[0], s[1], 0), (b, th, tw, c))),
        at)
    for k, start in enumerate(starts):
      out[start] = res[k]
  rows = []
  for y in ys:
    row = []
    for x0 in xs:
      t = out[(y, x0)]
      if y > 0:
        t = _blend(out[(y - stride, x0)], t, extent, axis=1)
      if x0 > 0:
        t = _blend(out[(y, x0 - stride)], t, extent, axis=2)
      out[(y, x0)] = t  # blended in place, as diffusers' in-place blend_v / blend_h
      row.append(t[:, :keep, :keep])
    rows.append(jnp.concatenate(row, axis=2))
  return jnp.concatenate(rows, axis=1)


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

  def _tile(self, tile_size: int | None) -> int:
    f = self.downsample_factor
    tile = int(tile_size or self.config.sample_size)
    if tile < f or tile % f:
      raise ValueError(f"AutoencoderKL: tile_size must be a multiple of {f}, got {tile}")
    return tile

  def _moments(self, x: Array) -> Array:
    moments, _ = self.encoder(x.astype(self.dtype))
    return moments if self.quant_conv is None else self.quant_conv(moments)

  def _decode(self, z: Array) -> Array:
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  @staticmethod
  def _posterior(moments: Array) -> tuple[Array, Array]:
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x: Array, *, return_features: bool = False, tiled: bool = False,
             tile_size: int | None = None
             ) -> tuple[Array, Array] | tuple[Array, Array, list[Array]]:
    """Posterior of images x [B, H, W, 3] in [-1, 1] (H, W multiples of `downsample_factor`).

    Returns float32 (mean, logvar), each [B, H/f, W/f, latent_channels], logvar clipped to
    [-30, 20] as diffusers' `DiagonalGaussianDistribution`; with `return_features`, also the
    encoder's features: per level the last resnet's output before its downsampler
    ([B, H/2^i, W/2^i, block_out_channels[i]]), then the mid block's output. With `tiled`, images
    larger than the tile (`tile_size`, default the config's sample_size) go through
    `tiled_encode` (diffusers' `enable_tiling`).
    """
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL.encode expects images [B, H, W, {self.config.in_channels}] "
                       f"with H, W multiples of {f}, got {x.shape}")
    if tiled and max(x.shape[1:3]) > self._tile(tile_size):
      if return_features:
        raise ValueError("AutoencoderKL.encode: return_features is not available with tiled=True")
      return self.tiled_encode(x, tile_size=tile_size)
    moments, features = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = self._posterior(moments)
    return (mean, logvar, features) if return_features else (mean, logvar)

  def tiled_encode(self, x: Array, *, tile_size: int | None = None,
                   overlap: float = TILE_OVERLAP) -> tuple[Array, Array]:
    """`encode` tile by tile (diffusers' `tiled_encode`; the rule in the module docstring): the
    moments are blended, then split and clipped. Always tiles, whatever the image size."""
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL.tiled_encode expects images [B, H, W, "
                       f"{self.config.in_channels}] with H, W multiples of {f}, got {x.shape}")
    tile = self._tile(tile_size)
    return self._posterior(tiled_apply(self._moments, x, tile, tile // f, overlap))

  def decode(self, z: Array, *, tiled: bool = False, tile_size: int | None = None) -> Array:
    """Images [B, h·f, w·f, 3] (float32, about [-1, 1]) from unscaled latents z [B, h, w, C].

    With `tiled`, latents larger than the latent tile (`tile_size // f`) go through
    `tiled_decode` (diffusers' `enable_tiling`)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"AutoencoderKL.decode expects latents [B, h, w, "
                       f"{self.config.latent_channels}], got {z.shape}")
    if tiled and max(z.shape[1:3]) > self._tile(tile_size) // self.downsample_factor:
      return self.tiled_decode(z, tile_size=tile_size)
    return self._decode(z).astype(jnp.float32)

  def tiled_decode(self, z: Array, *, tile_size: int | None = None,
                   overlap: float = TILE_OVERLAP) -> Array:
    """`decode` tile by tile (diffusers' `tiled_decode`): latent tiles of `tile_size // f`,
    image tiles of `tile_size` blended. Always tiles, whatever the latent size."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"AutoencoderKL.tiled_decode expects latents [B, h, w, "
                       f"{self.config.latent_channels}], got {z.shape}")
    tile = self._tile(tile_size)
    out = tiled_apply(self._decode, z, tile // self.downsample_factor, tile, overlap)
    return out.astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mean (diffusers' forward, sample_posterior=False)."""
    return self.decode(self.encode(x)[0])

"""TextualDegRemoval's guidance transfer: coarse-to-fine matching of a guidance image to the photo
(paper §3.3; mrluin/TextualDegRemoval `network_nafnet_guided_arch.py`, spec §1.7 (a)-(e)).

  1. `GuidanceEncoder` (the code's `masa_enc`): one shared 5-level residual encoder for the photo
     and the guidance: [f1 (nf, /1), f2 (2nf, /2), f3 (4nf, /4), f4 (8nf, /8), f5 (16nf, /16)].
  2. Coarse search on f5: the photo's f5 is cut into py x px blocks of k x k (k = 8); each block's
     centre 3x3 patch, at dilations (1, 2, 3), is compared (cosine, summed over dilations) with
     every dilated 3x3 patch of the guidance's f5; the best position (top-1) centres a guidance
     block of (d_y + 2) x (d_x + 2) cells, shifted to stay inside the map.
  3. Fine search inside each block pair: every 3x3 patch of the photo block (with a 1-cell
     replicate border: k x k positions) against every 3x3 patch of the guidance block (d_y x d_x
     positions); top-1 index and its cosine `soft_att`.
  4. Transfer to every scale s in (1, 2, 4, 8, 16): the matched 3s x 3s guidance patches of the
     level with 16nf/s channels are overlap-added (fold), divided by the overlap count and
     multiplied by soft_att (bilinearly upsampled x s), then reassembled into maps
     [G0 (nf, /1), G1 (2nf, /2), G2 (4nf, /4), G3 (8nf, /8), G4 (16nf, /16)].

Indices are constants (argmax); gradients flow through the features and soft_att.

That is NAFNet's 5-level (/16) layout. The Restormer family (`guided_restormer.py`) uses 4
levels (`GuidanceEncoder(levels=4)`: f1..f4, /8), matches on f4 and transfers to s in
(1, 2, 4, 8): `geometry(..., down=8)` with padding to 8·8 = 64; `match_and_transfer` follows
the number of levels it is given.

Geometry (computed in Python from the padded sizes; both images are zero-padded to multiples of
16·8 = 128 on the bottom/right, as the code does): px = W/16//8, k = 8,
d_x = 2·int(W_ref/16 // (2 px) · 1.5) + 1, same for y. Fixed here:
  * B8: the code indexes the x16 level with d_y twice (crash whenever d_x != d_y, e.g. a
    non-square photo with a square guidance); we use d_x and d_y where they belong.
  * A guidance block larger than the guidance map (d + 2 > its side: e.g. a photo of one block
    row, py = 1) makes the code index outside the map (negative indices wrap around); we shrink
    d to the map (d = side − 2, or − 3 to stay odd), which changes nothing where the code works.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.models.layers import conv, resize_bilinear

Array = jax.Array

LEVELS = 5  # /1 ... /16
PAD = 16 * 8  # padder (2^4) x lr_block_size (8)

__all__ = ["GuidanceEncoder", "Geometry", "geometry", "match_and_transfer", "pad_to", "PAD"]


class ResidualBlock(nnx.Module):
  """conv3x3 -> ReLU -> conv3x3, + x (no norm)."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv1 = conv(c, c, 3, rngs=rngs, dtype=dtype)
    self.conv2 = conv(c, c, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return x + self.conv2(jax.nn.relu(self.conv1(x)))


class GuidanceEncoder(nnx.Module):
  """The shared multi-level feature encoder (`masa_enc`): conv_L1 (3x3, s1), conv_L2.. (3x3, s2,
  doubling channels), each + ReLU + residual blocks (n_blks[0], n_blks[1], then n_blks[2] for
  every deeper level, as the code builds them). 5 levels (/16) for NAFNet, 4 (/8) for the
  Restormer family."""

  def __init__(self, in_chl: int = 3, nf: int = 64, n_blks=(4, 4, 4, 4), *, levels: int = LEVELS,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if levels < 2:
      raise ValueError(f"GuidanceEncoder needs >= 2 levels, got {levels}")
    kw = dict(rngs=rngs, dtype=dtype)
    counts = (n_blks[0], n_blks[1]) + (n_blks[2],) * (levels - 2)
    convs, blks = [], []
    c_in = in_chl
    for lvl in range(levels):
      c = nf * 2 ** lvl
      convs.append(conv(c_in, c, 3, stride=1 if lvl == 0 else 2, **kw))
      blks.append(nnx.List([ResidualBlock(c, **kw) for _ in range(counts[lvl])]))
      c_in = c
    self.convs, self.blks, self.nf = nnx.List(convs), nnx.List(blks), nf

  def __call__(self, x: Array) -> list[Array]:
    feats = []
    for cv, blks in zip(self.convs, self.blks, strict=True):
      x = jax.nn.relu(cv(x))
      for b in blks:
        x = b(x)
      feats.append(x)
    return feats


def pad_to(x: Array, m: int = PAD) -> Array:
  """Zero-pads bottom/right to multiples of `m` (the code's check_image_size)."""
  ph, pw = -x.shape[1] % m, -x.shape[2] % m
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else x


@dataclasses.dataclass(frozen=True)
class Geometry:
  py: int  # blocks down / across the photo's /16 map
  px: int
  k: int  # block side at /16 (8)
  d_y: int  # guidance block "diameter" (positions searched); the block is d + 2 cells
  d_x: int


def geometry(lq_hw: tuple[int, int], ref_hw: tuple[int, int], *, lr_block_size: int = 8,
             ref_down_block_size: float = 1.5, down: int = 16) -> Geometry:
  """Block geometry from the PADDED photo and guidance sizes (multiples of down·lr_block_size);
  `down` is the deepest level's stride (16 for NAFNet, 8 for the Restormer family)."""
  h, w = lq_hw
  hr, wr = ref_hw
  py, px = h // down // lr_block_size, w // down // lr_block_size
  if not (py and px):
    raise ValueError(f"photo {h}x{w} is smaller than one {down * lr_block_size}-pixel block")
  k_y, k_x = h // down // py, w // down // px
  if k_y != k_x:
    raise ValueError(f"blocks must be square, got {k_y}x{k_x}")

  def diameter(side_r: int, n: int) -> int:
    d = 2 * int(side_r // down // (2 * n) * ref_down_block_size) + 1
    limit = side_r // down - 2  # the block (d + 2 cells) must fit in the guidance map
    if d > limit:
      d = limit if limit % 2 else limit - 1
    if d < 1:
      raise ValueError(f"guidance {hr}x{wr} is too small to hold a search block")
    return d

  return Geometry(py, px, k_y, diameter(hr, py), diameter(wr, px))


def _normalize(t: Array) -> Array:
  """F.normalize over the last axis: t / max(||t||, 1e-12).

  Vectors of norm <= 1e-12 (the zero padding's features: exactly zero while the biases are) get
  no gradient: sqrt's derivative at 0 made it 0 · inf = NaN (a tiny run diverged at step 3), and
  PyTorch's 1 / 1e-12 would swamp Adam's moments; elsewhere the gradient is F.normalize's."""
  sq = jnp.sum(t * t, axis=-1, keepdims=True)
  ok = sq > 1e-24
  return jnp.where(ok, t * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), jax.lax.stop_gradient(t * 1e12))


def _patches3x3(x: Array, dilation: int = 1) -> Array:
  """[M, h, w, C] (already padded) -> [M, h - 2d, w - 2d, 9C]: every dilated 3x3 patch."""
  d = dilation
  h, w = x.shape[1] - 2 * d, x.shape[2] - 2 * d
  return jnp.concatenate([x[:, i * d:i * d + h, j * d:j * d + w] for i in range(3)
                          for j in range(3)], axis=-1)


def _lq_blocks(f5: Array, g: Geometry) -> Array:
  """The photo's /16 map, replicate-padded by 1, cut into (k+2)^2 blocks with stride k:
  [N, H/16, W/16, C] -> [N·P, k+2, k+2, C] (blocks in row-major order)."""
  fp = jnp.pad(f5, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  k = g.k
  blocks = [fp[:, by * k:by * k + k + 2, bx * k:bx * k + k + 2]
            for by in range(g.py) for bx in range(g.px)]
  return jnp.stack(blocks, axis=1).reshape(-1, k + 2, k + 2, f5.shape[-1])


def coarse_search(blocks: Array, f5_ref: Array, g: Geometry,
                  dilations=(1, 2, 3)) -> Array:
  """Top-1 guidance position (flat index into the /16 guidance map) per photo block: [N, P]."""
  n, hr, wr, c = f5_ref.shape
  p = g.py * g.px
  centre = (g.k + 2) // 2
  widest = g.k + 1 - centre  # the dilated 3x3 query must stay inside the (k + 2)-cell block
  if max(dilations) > widest:
    raise ValueError(f"dilations {tuple(dilations)} do not fit {g.k}-cell blocks (largest "
                     f"dilation {widest}): raise lr_block_size or lower the dilations")
  corr = 0.0
  for d in dilations:
    q = blocks[:, centre - d:centre + d + 1:d, centre - d:centre + d + 1:d]  # [N·P, 3, 3, C]
    q = _normalize(q.reshape(n, p, 9 * c))
    r = jnp.pad(f5_ref, ((0, 0), (d, d), (d, d), (0, 0)))  # F.unfold's zero padding
    r = _normalize(_patches3x3(r, d).reshape(n, hr * wr, 9 * c))
    corr = corr + jnp.einsum("npc,nlc->npl", q, r)
  return jnp.argmax(corr, axis=-1)


def _block_origin(index: Array, d: int, side: int) -> Array:
  """Top-left cell of the (d + 2)-cell guidance block centred on `index`, kept in the map."""
  return jnp.clip(index - d // 2 - 1, 0, side - d - 2)


def _ref_blocks(feat: Array, y0: Array, x0: Array, g: Geometry, s: int) -> Array:
  """Guidance blocks at scale s: feat [N, Hr·s, Wr·s, C] -> [N·P, (d_y+2)s, (d_x+2)s, C]."""
  n, c = feat.shape[0], feat.shape[-1]
  size = ((g.d_y + 2) * s, (g.d_x + 2) * s, c)

  def one(f, ys, xs):
    return jax.vmap(lambda yy, xx: jax.lax.dynamic_slice(f, (yy * s, xx * s, 0), size))(ys, xs)

  return jax.vmap(one)(feat, y0, x0).reshape(n * g.py * g.px, *size)


def fine_search(lq_blocks: Array, ref_blocks: Array) -> tuple[Array, Array]:
  """Top-1 3x3 guidance patch per photo position inside each block pair.

  lq_blocks [M, k+2, k+2, C], ref_blocks [M, d_y+2, d_x+2, C] -> index [M, k, k] (flat into
  d_y x d_x) and soft_att [M, k, k] (its cosine similarity).
  """
  m, k = lq_blocks.shape[0], lq_blocks.shape[1] - 2
  q = _normalize(_patches3x3(lq_blocks)).reshape(m, k * k, -1)
  r = _normalize(_patches3x3(ref_blocks)).reshape(m, -1, q.shape[-1])
  corr = jnp.einsum("mqc,mrc->mqr", q, r)
  return jnp.argmax(corr, axis=-1).reshape(m, k, k), jnp.max(corr, axis=-1).reshape(m, k, k)


def transfer(ref_block: Array, index: Array, soft_att: Array, g: Geometry, s: int) -> Array:
  """Fold the matched 3s x 3s guidance patches into each photo block at scale s.

  ref_block [M, (d_y+2)s, (d_x+2)s, C], index/soft_att [M, k, k] -> [M, k·s, k·s, C]: each photo
  position (i, j) places its patch with top-left ((i-1)s, (j-1)s); overlaps are averaged
  (F.fold / fold(ones)), then scaled by soft_att resized bilinearly to k·s.
  """
  m, c, k = ref_block.shape[0], ref_block.shape[-1], g.k
  wy, wx = g.d_y + 2, g.d_x + 2
  cells = ref_block.reshape(m, wy, s, wx, s, c).transpose(0, 1, 3, 2, 4, 5)
  cells = cells.reshape(m, wy * wx, s * s * c)
  u, v = index // g.d_x, index % g.d_x  # matched top-left cell of each 3x3-cell patch
  out = jnp.zeros((m, k + 2, k + 2, s * s * c), ref_block.dtype)
  for e in range(3):
    for f in range(3):
      flat = ((u + e) * wx + (v + f)).reshape(m, k * k, 1)
      got = jnp.take_along_axis(cells, flat, axis=1).reshape(m, k, k, s * s * c)
      # Position (i, j)'s cell (e, f) lands on output cell (i - 1 + e, j - 1 + f); the canvas
      # has a 1-cell margin that is cropped (fold's padding).
      out = out.at[:, e:e + k, f:f + k].add(got)
  out = out[:, 1:k + 1, 1:k + 1]
  ones = np.zeros((k + 2, k + 2), np.float32)
  for e in range(3):
    for f in range(3):
      ones[e:e + k, f:f + k] += 1
  out = out / jnp.asarray(ones[1:k + 1, 1:k + 1])[None, :, :, None]
  out = out.reshape(m, k, k, s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(m, k * s, k * s, c)
  att = resize_bilinear(soft_att[..., None], (k * s, k * s))
  return out * att


def match_and_transfer(feat_lq: list[Array], feat_ref: list[Array], g: Geometry,
                       dilations=(1, 2, 3)) -> list[Array]:
  """The warped guidance at every scale: [G0 (/1), G1 (/2), ..., G_{L-1} (deepest)] for L
  encoder levels (matching on the deepest)."""
  levels = len(feat_ref)
  scales = tuple(2 ** i for i in range(levels))
  f5, f5_ref = feat_lq[-1], feat_ref[-1]
  n, _, wr, _ = f5_ref.shape
  hr = f5_ref.shape[1]
  lq_blocks = _lq_blocks(f5, g)
  index = jax.lax.stop_gradient(coarse_search(lq_blocks, f5_ref, g, dilations))  # [N, P]
  y0 = _block_origin(index // wr, g.d_y, hr)
  x0 = _block_origin(index % wr, g.d_x, wr)
  blocks = {s: _ref_blocks(feat_ref[levels - 1 - lvl], y0, x0, g, s)
            for lvl, s in enumerate(scales)}
  fine_index, soft_att = fine_search(lq_blocks, blocks[1])
  fine_index = jax.lax.stop_gradient(fine_index)
  warped = []
  for s in scales[::-1]:
    t = transfer(blocks[s], fine_index, soft_att, g, s)  # [N·P, k s, k s, C]
    c = t.shape[-1]
    t = t.reshape(n, g.py, g.px, g.k * s, g.k * s, c).transpose(0, 1, 3, 2, 4, 5)
    warped.append(t.reshape(n, g.py * g.k * s, g.px * g.k * s, c))
  return warped

"""NAFNet steered by a guidance image (mrluin/TextualDegRemoval `NAFNetRefFusion`, spec §1.7 (f)).

    net = GuidedNAFNet(width=64, enc_blk_nums=(1, 1, 1, 28), dec_blk_nums=(1, 1, 1, 1),
                       rngs=nnx.Rngs(0))
    restored = net(lq, guidance)          # NHWC in [0, 1]; the guidance may have another size

The guidance is matched to the photo (`guidance.py`) and the warped guidance G_l enters before
each encoder level l and before the middle blocks: x = B(cat[x, G_l])[..., :c_l], where B is a
stack of NAFBlocks of width 2·c_l (`masa_blk_enc[l]`, `masa_blk_middle`). Their zero-initialised
per-channel β, γ are the paper's α (Eq. 4): at init the network is the plain NAFNet.

`fusion="encoder+decoder"` (the paper's best ablation, Table 10; not in the code, whose
`masa_blk_dec` is an empty ModuleList) also fuses G_l before each decoder level's blocks, after
the up + skip merge: `masa_blk_dec.{i}` before `decoders.{i}` (i = 0 is the /8 level, as the
decoders are ordered), NAFBlocks of width 2·c_l, `reffusion_n_blocks_dec[l]` of them (l = 0 is
full resolution; default reffusion_n_blocks).

Fixed here: B6 (the code builds the middle fusion with `reffusion_n_blocks[4]`, an IndexError;
`reffusion_n_blocks_middle` is used) and B8 (see guidance.py). Requires nf == width (the
concatenations only line up then, as in every config of the code).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import conv, dense, pixel_shuffle
from uir_jax.models.nafnet import NAFBlock
from uir_jax.systems.textual_deg_removal.guidance import (
    GuidanceEncoder,
    geometry,
    match_and_transfer,
    pad_to,
)

Array = jax.Array

__all__ = ["FUSIONS", "GuidedNAFNet"]

FUSIONS = ("encoder+bottleneck", "encoder+decoder")


class GuidedNAFNet(nnx.Module):
  """NAFNet (4 levels) with guidance fusion in the encoder and the bottleneck (and the decoder
  with fusion="encoder+decoder")."""

  def __init__(self, img_channel: int = 3, width: int = 64, middle_blk_num: int = 1,
               enc_blk_nums: Sequence[int] = (1, 1, 1, 28),
               dec_blk_nums: Sequence[int] = (1, 1, 1, 1), *, nf: int | None = None,
               ext_n_blocks: Sequence[int] = (4, 4, 4, 4),
               reffusion_n_blocks: Sequence[int] = (2, 2, 2, 2),
               reffusion_n_blocks_middle: int = 1, lr_block_size: int = 8,
               ref_down_block_size: float = 1.5, dilations: Sequence[int] = (1, 2, 3),
               fusion: str = "encoder+bottleneck",
               reffusion_n_blocks_dec: Sequence[int] | None = None, rngs: nnx.Rngs,
               dtype=jnp.float32):
    nf = width if nf is None else nf
    if fusion not in FUSIONS:
      raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    dec_n = tuple(reffusion_n_blocks if reffusion_n_blocks_dec is None
                  else reffusion_n_blocks_dec)
    if len(dec_n) != 4:
      raise ValueError(f"reffusion_n_blocks_dec needs 4 entries, got {dec_n}")
    if nf != width:
      raise ValueError(f"the guidance width nf ({nf}) must equal the NAFNet width ({width})")
    if len(enc_blk_nums) != 4 or len(dec_blk_nums) != 4 or len(reffusion_n_blocks) != 4:
      raise ValueError("the guided NAFNet has 4 levels: enc_blk_nums, dec_blk_nums and "
                       "reffusion_n_blocks need 4 entries")
    kw = dict(rngs=rngs, dtype=dtype)
    blk = lambda c: NAFBlock(c, norm="layernorm2d", **kw)
    self.img_channel, self.dtype, self.fusion = img_channel, dtype, fusion
    self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
    self.dilations = tuple(dilations)
    self.masa_enc = GuidanceEncoder(img_channel, nf, tuple(ext_n_blocks), **kw)
    self.intro = conv(img_channel, width, 3, **kw)
    self.ending = conv(width, img_channel, 3, **kw)
    encoders, downs, fuse, ups, decoders = [], [], [], [], []
    chan = width
    for lvl, num in enumerate(enc_blk_nums):
      encoders.append(nnx.List([blk(chan) for _ in range(num)]))
      downs.append(conv(chan, 2 * chan, 2, stride=2, padding=0, **kw))
      fuse.append(nnx.List([blk(2 * chan) for _ in range(reffusion_n_blocks[lvl])]))
      chan *= 2
    self.middle_blks = nnx.List([blk(chan) for _ in range(middle_blk_num)])
    self.masa_blk_middle = nnx.List([nnx.List([blk(2 * chan)
                                               for _ in range(reffusion_n_blocks_middle)])])
    dec_fuse = []
    for i, num in enumerate(dec_blk_nums):
      ups.append(dense(chan, 2 * chan, use_bias=False, **kw))
      chan //= 2
      decoders.append(nnx.List([blk(chan) for _ in range(num)]))
      if fusion == "encoder+decoder":
        dec_fuse.append(nnx.List([blk(2 * chan) for _ in range(dec_n[3 - i])]))
    if dec_fuse:
      self.masa_blk_dec = nnx.List(dec_fuse)
    self.encoders, self.downs, self.masa_blk_enc = (nnx.List(encoders), nnx.List(downs),
                                                    nnx.List(fuse))
    self.ups, self.decoders = nnx.List(ups), nnx.List(decoders)

  @property
  def pad_multiple(self) -> int:
    """Photo and guidance are zero-padded (bottom/right) to multiples of this: the code's
    padder_size · lr_block_size = 2^4 · 8 = 128 (one block of the coarse search at /16)."""
    return 16 * self.lr_block_size

  @staticmethod
  def _fuse(blocks: nnx.List, x: Array, g: Array) -> Array:
    y = jnp.concatenate([x, g.astype(x.dtype)], axis=-1)
    for b in blocks:
      y = b(y)
    return y[..., :x.shape[-1]]

  def guidance_features(self, lq: Array, guidance: Array) -> list[Array]:
    """The warped guidance [G0 (/1) ... G4 (/16)] for padded photo and guidance."""
    g = geometry(lq.shape[1:3], guidance.shape[1:3], lr_block_size=self.lr_block_size,
                 ref_down_block_size=self.ref_down_block_size)
    return match_and_transfer(self.masa_enc(lq.astype(self.dtype)),
                              self.masa_enc(guidance.astype(self.dtype)), g, self.dilations)

  def __call__(self, lq: Array, guidance: Array) -> Array:
    """lq [B, H, W, C], guidance [B, Hg, Wg, C] -> float32 [B, H, W, C]."""
    for name, t in (("lq", lq), ("guidance", guidance)):
      if t.ndim != 4 or t.shape[-1] != self.img_channel:
        raise ValueError(f"{name} must be [B, H, W, {self.img_channel}], got {t.shape}")
    if lq.shape[0] != guidance.shape[0]:
      raise ValueError(f"lq and guidance batch sizes differ: {lq.shape[0]} vs {guidance.shape[0]}")
    h, w = lq.shape[1:3]
    m = self.pad_multiple
    inp = pad_to(lq.astype(jnp.float32), m)
    warped = self.guidance_features(inp, pad_to(guidance.astype(jnp.float32), m))
    x = self.intro(inp.astype(self.dtype))
    skips = []
    for lvl, (blocks, down, fuse) in enumerate(zip(self.encoders, self.downs, self.masa_blk_enc,
                                                   strict=True)):
      x = self._fuse(fuse, x, warped[lvl])
      for b in blocks:
        x = b(x)
      skips.append(x)
      x = down(x)
    x = self._fuse(self.masa_blk_middle[0], x, warped[-1])
    for b in self.middle_blks:
      x = b(x)
    for i, (up, blocks) in enumerate(zip(self.ups, self.decoders, strict=True)):
      x = pixel_shuffle(up(x)) + skips.pop()
      if self.fusion == "encoder+decoder":
        x = self._fuse(self.masa_blk_dec[i], x, warped[3 - i])
      for b in blocks:
        x = b(x)
    return (self.ending(x).astype(jnp.float32) + inp)[:, :h, :w]

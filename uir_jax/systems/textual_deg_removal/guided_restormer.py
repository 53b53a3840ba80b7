"""Restormer and PromptIR steered by a guidance image (mrluin/TextualDegRemoval
`RestormerRefFusion`, `PromptIRRefFusion`; spec §1.7 (g)).

    net = GuidedRestormer(dim=48, nf=48, rngs=nnx.Rngs(0))
    net = GuidedPromptIR(dim=48, nf=48, rngs=nnx.Rngs(0))
    restored = net(lq, guidance)          # NHWC in [0, 1]; the guidance may have another size

The guidance is matched to the photo by the shared `guidance.py` with a 4-level encoder (/8:
these backbones downsample three times), giving G0 (nf, /1) ... G3 (8nf, /8). It enters
before `encoder_level1..3` and before `latent`: x = F_l(cat[x, G_l])[..., :c_l], where F_l is a
stack of `FusionBlock`s of width c_l + nf·2^l (`masa_blk_enc_level{l+1}`): a plain Restormer
block T with a learnable scalar α, zero-initialised (the paper's α of Eq. 4):
F(z) = α·T(z) + z. At init the network is the plain backbone.

`fusion="encoder+decoder"` (the paper's best ablation, Table 10; not in the code) also fuses
G_l before each decoder level's blocks, after its skip merge (`masa_blk_dec_level{1,2,3}`, widths
4·dim + 4nf, 2·dim + 2nf, 2·dim + nf; heads of that decoder level), on top of the code's
encoder + bottleneck points.

Both images are zero-padded bottom/right to multiples of 8·lr_block_size = 64 (the code's
check_image_size) and the output is cropped back. Fixed here: B7 (the code indexes
`feat_lq[4]` and `feat_ref[4..1]` of a 4-level encoder, an IndexError; the levels are
`[3..0]`), and the guidance-block shrink of `guidance.py`. Requires nf == dim (the code's
concatenations only give its block widths then).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import conv, dense
from uir_jax.models.promptir import PromptGenBlock
from uir_jax.models.restormer import (
    LAYERNORM_TYPES,
    Downsample,
    TransformerBlock,
    Upsample,
    blocks,
    check_levels,
    run,
)
from uir_jax.systems.textual_deg_removal.guidance import (
    GuidanceEncoder,
    geometry,
    match_and_transfer,
    pad_to,
)
from uir_jax.systems.textual_deg_removal.guided_nafnet import FUSIONS

Array = jax.Array

DOWN = 8  # the deepest level's stride (three 2x downsamplings)

__all__ = ["FUSIONS", "FusionBlock", "GuidedPromptIR", "GuidedRestormer"]


class FusionBlock(TransformerBlock):
  """The code's TransformerResFusionBlock: α·T(z) + z, T a Restormer block, α a scalar (0)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, **opts):
    super().__init__(dim, num_heads, rngs=rngs, dtype=dtype, **opts)
    self.alpha = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, z: Array) -> Array:
    return super().__call__(z) * self.alpha[...].astype(z.dtype) + z


def _fuse(stack: nnx.List, x: Array, g: Array) -> Array:
  z = jnp.concatenate([x, g.astype(x.dtype)], axis=-1)
  return run(stack, z)[..., :x.shape[-1]]


class GuidedRestormer(nnx.Module):
  """Restormer with guidance fusion; names follow `RestormerRefFusion` (see module docstring).

  Args: Restormer's (`inp_channels`, `out_channels`, `dim`, `num_blocks`,
  `num_refinement_blocks`, `heads`, `ffn_expansion_factor`, `bias`, `layernorm_type`; no
  dual-pixel mode) plus `nf` (guidance encoder width, = dim), `ext_n_blocks` (its residual
  blocks per level), `reffusion_n_blocks` (fusion blocks before encoder levels 1-3 and the
  latent), `reffusion_n_blocks_dec` (before decoder levels 1-3, with "encoder+decoder"; default
  reffusion_n_blocks[:3]), `lr_block_size`, `ref_down_block_size`, `dilations`, `fusion`.
  """

  def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
               num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
               heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66,
               bias: bool = False, layernorm_type: str = "WithBias", *, nf: int | None = None,
               ext_n_blocks: Sequence[int] = (4, 4, 4, 4),
               reffusion_n_blocks: Sequence[int] = (1, 1, 1, 1),
               reffusion_n_blocks_dec: Sequence[int] | None = None, lr_block_size: int = 8,
               ref_down_block_size: float = 1.5, dilations: Sequence[int] = (1, 2, 3),
               fusion: str = "encoder+bottleneck", rngs: nnx.Rngs, dtype=jnp.float32):
    check_levels(num_blocks, heads, dim)
    nf = dim if nf is None else nf
    if nf != dim:
      raise ValueError(f"the guidance width nf ({nf}) must equal the backbone dim ({dim})")
    if layernorm_type not in LAYERNORM_TYPES:
      raise ValueError(f"layernorm_type must be one of {LAYERNORM_TYPES}, got {layernorm_type!r}")
    if fusion not in FUSIONS:
      raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if inp_channels != out_channels:
      raise ValueError(f"the input residual needs inp_channels == out_channels, got "
                       f"{inp_channels} and {out_channels}")
    if len(reffusion_n_blocks) != 4:
      raise ValueError(f"reffusion_n_blocks needs 4 entries (encoder levels 1-3 + latent), got "
                       f"{tuple(reffusion_n_blocks)}")
    dec_n = tuple(reffusion_n_blocks[:3] if reffusion_n_blocks_dec is None
                  else reffusion_n_blocks_dec)
    if len(dec_n) != 3:
      raise ValueError(f"reffusion_n_blocks_dec needs 3 entries (decoder levels 1-3), got {dec_n}")
    self.inp_channels, self.dim, self.fusion, self.dtype = inp_channels, dim, fusion, dtype
    self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
    self.dilations = tuple(dilations)
    kw = dict(rngs=rngs, dtype=dtype)
    opts = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias,
                layernorm_type=layernorm_type)
    nb, hd = tuple(num_blocks), tuple(heads)

    def fuse(n: int, width: int, h: int) -> nnx.List:
      return nnx.List([FusionBlock(width, h, **opts, **kw) for _ in range(n)])

    self.masa_enc = GuidanceEncoder(inp_channels, nf, tuple(ext_n_blocks), levels=4, **kw)
    self.patch_embed = conv(inp_channels, dim, 3, use_bias=False, **kw)
    # Level l (0-based) of width dim·2^l meets G_l of width nf·2^l = dim·2^l.
    self.masa_blk_enc_level1 = fuse(reffusion_n_blocks[0], 2 * dim, hd[0])
    self.encoder_level1 = blocks(nb[0], dim, hd[0], opts, **kw)
    self.down1_2 = Downsample(dim, **kw)
    self.masa_blk_enc_level2 = fuse(reffusion_n_blocks[1], 4 * dim, hd[1])
    self.encoder_level2 = blocks(nb[1], 2 * dim, hd[1], opts, **kw)
    self.down2_3 = Downsample(2 * dim, **kw)
    self.masa_blk_enc_level3 = fuse(reffusion_n_blocks[2], 8 * dim, hd[2])
    self.encoder_level3 = blocks(nb[2], 4 * dim, hd[2], opts, **kw)
    self.down3_4 = Downsample(4 * dim, **kw)
    self.masa_blk_enc_level4 = fuse(reffusion_n_blocks[3], 16 * dim, hd[3])
    self.latent = blocks(nb[3], 8 * dim, hd[3], opts, **kw)
    self._build_decoder(nb, hd, opts, kw)
    self.refinement = blocks(num_refinement_blocks, 2 * dim, hd[0], opts, **kw)
    self.output = conv(2 * dim, out_channels, 3, use_bias=bias, **kw)
    if fusion == "encoder+decoder":  # decoder widths after the skip merge: 4d, 2d, 2d (+ G_l)
      self.masa_blk_dec_level3 = fuse(dec_n[2], 8 * dim, hd[2])
      self.masa_blk_dec_level2 = fuse(dec_n[1], 4 * dim, hd[1])
      self.masa_blk_dec_level1 = fuse(dec_n[0], 3 * dim, hd[0])

  def _build_decoder(self, nb, hd, opts, kw) -> None:
    dim = self.dim
    self.up4_3 = Upsample(8 * dim, **kw)
    self.reduce_chan_level3 = dense(8 * dim, 4 * dim, use_bias=opts["bias"], **kw)
    self.decoder_level3 = blocks(nb[2], 4 * dim, hd[2], opts, **kw)
    self.up3_2 = Upsample(4 * dim, **kw)
    self.reduce_chan_level2 = dense(4 * dim, 2 * dim, use_bias=opts["bias"], **kw)
    self.decoder_level2 = blocks(nb[1], 2 * dim, hd[1], opts, **kw)
    self.up2_1 = Upsample(2 * dim, **kw)
    self.decoder_level1 = blocks(nb[0], 2 * dim, hd[0], opts, **kw)

  # Hooks for PromptIR's prompts: identity in Restormer.
  def _after_latent(self, x: Array) -> Array:
    return x

  def _after_decoder(self, level: int, x: Array) -> Array:
    return x

  def _dec_fuse(self, level: int, x: Array, g: Array) -> Array:
    if self.fusion != "encoder+decoder":
      return x
    return _fuse(getattr(self, f"masa_blk_dec_level{level}"), x, g)

  def guidance_features(self, lq: Array, guidance: Array) -> list[Array]:
    """The warped guidance [G0 (/1) ... G3 (/8)] for padded photo and guidance."""
    g = geometry(lq.shape[1:3], guidance.shape[1:3], lr_block_size=self.lr_block_size,
                 ref_down_block_size=self.ref_down_block_size, down=DOWN)
    return match_and_transfer(self.masa_enc(lq.astype(self.dtype)),
                              self.masa_enc(guidance.astype(self.dtype)), g, self.dilations)

  def __call__(self, lq: Array, guidance: Array) -> Array:
    """lq [B, H, W, C], guidance [B, Hg, Wg, C] -> float32 [B, H, W, C]."""
    for name, t in (("lq", lq), ("guidance", guidance)):
      if t.ndim != 4 or t.shape[-1] != self.inp_channels:
        raise ValueError(f"{name} must be [B, H, W, {self.inp_channels}], got {t.shape}")
    if lq.shape[0] != guidance.shape[0]:
      raise ValueError(f"lq and guidance batch sizes differ: {lq.shape[0]} vs {guidance.shape[0]}")
    h, w = lq.shape[1:3]
    m = DOWN * self.lr_block_size
    inp = pad_to(lq.astype(jnp.float32), m)
    g = self.guidance_features(inp, pad_to(guidance.astype(jnp.float32), m))
    x = _fuse(self.masa_blk_enc_level1, self.patch_embed(inp.astype(self.dtype)), g[0])
    enc1 = run(self.encoder_level1, x)
    enc2 = run(self.encoder_level2, _fuse(self.masa_blk_enc_level2, self.down1_2(enc1), g[1]))
    enc3 = run(self.encoder_level3, _fuse(self.masa_blk_enc_level3, self.down2_3(enc2), g[2]))
    lat = run(self.latent, _fuse(self.masa_blk_enc_level4, self.down3_4(enc3), g[3]))
    lat = self._after_latent(lat)
    d3 = self.reduce_chan_level3(jnp.concatenate([self.up4_3(lat), enc3], axis=-1))
    d3 = self._after_decoder(3, run(self.decoder_level3, self._dec_fuse(3, d3, g[2])))
    d2 = self.reduce_chan_level2(jnp.concatenate([self.up3_2(d3), enc2], axis=-1))
    d2 = self._after_decoder(2, run(self.decoder_level2, self._dec_fuse(2, d2, g[1])))
    d1 = jnp.concatenate([self.up2_1(d2), enc1], axis=-1)
    d1 = run(self.refinement, run(self.decoder_level1, self._dec_fuse(1, d1, g[0])))
    return (self.output(d1).astype(jnp.float32) + inp)[:, :h, :w]


class GuidedPromptIR(GuidedRestormer):
  """PromptIR (decoder prompts) with guidance fusion: the code's `PromptIRRefFusion`
  (decoder=True, the released all-in-one setting). Extra args as `PromptIR`: `prompt_dims`,
  `prompt_sizes`, `prompt_len` (widths derived from dim as in `uir_jax/models/promptir.py`)."""

  def __init__(self, *args, prompt_dims: Sequence[int] = (64, 128, 320),
               prompt_sizes: Sequence[int] = (64, 32, 16), prompt_len: int = 5, **kwargs):
    if len(prompt_dims) != 3 or len(prompt_sizes) != 3:
      raise ValueError(f"prompt_dims and prompt_sizes need 3 entries (prompt1..3), got "
                       f"{tuple(prompt_dims)} and {tuple(prompt_sizes)}")
    self._prompt_opts = (tuple(prompt_dims), tuple(prompt_sizes), prompt_len)
    super().__init__(*args, **kwargs)
    del self._prompt_opts

  def _build_decoder(self, nb, hd, opts, kw) -> None:
    dim = self.dim
    (p1, p2, p3), sizes, plen = self._prompt_opts
    self.prompt_dims, self.prompt_sizes = (p1, p2, p3), sizes
    self.prompt1 = PromptGenBlock(p1, plen, sizes[0], 2 * dim, **kw)
    self.prompt2 = PromptGenBlock(p2, plen, sizes[1], 4 * dim, **kw)
    self.prompt3 = PromptGenBlock(p3, plen, sizes[2], 8 * dim, **kw)
    self.noise_level3 = TransformerBlock(8 * dim + p3, hd[2], **opts, **kw)
    self.reduce_noise_level3 = dense(8 * dim + p3, 4 * dim, use_bias=opts["bias"], **kw)
    self.up4_3 = Upsample(4 * dim, **kw)
    self.reduce_chan_level3 = dense(6 * dim, 4 * dim, use_bias=opts["bias"], **kw)
    self.decoder_level3 = blocks(nb[2], 4 * dim, hd[2], opts, **kw)
    self.noise_level2 = TransformerBlock(4 * dim + p2, hd[2], **opts, **kw)
    self.reduce_noise_level2 = dense(4 * dim + p2, 4 * dim, use_bias=opts["bias"], **kw)
    self.up3_2 = Upsample(4 * dim, **kw)
    self.reduce_chan_level2 = dense(4 * dim, 2 * dim, use_bias=opts["bias"], **kw)
    self.decoder_level2 = blocks(nb[1], 2 * dim, hd[1], opts, **kw)
    self.noise_level1 = TransformerBlock(2 * dim + p1, hd[2], **opts, **kw)
    self.reduce_noise_level1 = dense(2 * dim + p1, 2 * dim, use_bias=opts["bias"], **kw)
    self.up2_1 = Upsample(2 * dim, **kw)
    self.decoder_level1 = blocks(nb[0], 2 * dim, hd[0], opts, **kw)

  @staticmethod
  def _prompted(x: Array, gen: PromptGenBlock, block: TransformerBlock, reduce: nnx.Linear):
    return reduce(block(jnp.concatenate([x, gen(x)], axis=-1)))

  def _after_latent(self, x: Array) -> Array:
    return self._prompted(x, self.prompt3, self.noise_level3, self.reduce_noise_level3)

  def _after_decoder(self, level: int, x: Array) -> Array:
    if level == 3:
      return self._prompted(x, self.prompt2, self.noise_level2, self.reduce_noise_level2)
    return self._prompted(x, self.prompt1, self.noise_level1, self.reduce_noise_level1)

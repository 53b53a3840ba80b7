"""NAFNet, IR-SDE's ConditionalNAFNet and its DA-CLIP variant, in Flax NNX (spec §6).

    net = NAFNet(width=32, rngs=nnx.Rngs(0))                     # direct regression
    restored = net(lq)
    eps = ConditionalNAFNet(nf=64, context_dim=512, rngs=nnx.Rngs(0))(
        x_t, mu, t, text_context=degra_features, image_context=image_features)

Images are NHWC in [0, 1]. Names follow the PyTorch modules (`intro`, `encoders[i][j]`, `downs[i]`,
`middle_blks[j]`, `ups[i]`, `decoders[i][j]`, `ending`; inside a block `conv1..conv5`, `sca`,
`norm1/2`, `beta`, `gamma`, `mlp`) so `uir_jax/convert/nafnet.py` is a near-identity key map.

The NAFBlock (Chen et al. 2022): two residual branches, each scaled by a zero-initialised
per-channel factor (β, γ) so every block starts as the identity:

  * y = x + β · conv3(SCA(SimpleGate(dwconv3x3(conv1(LN(x))))))
  * out = y + γ · conv5(SimpleGate(conv4(LN(y))))

SimpleGate splits the channels in two halves and multiplies them; SCA multiplies by a 1x1 conv of
the spatial mean. 1x1 convolutions are Dense layers on the channel axis (NHWC).

Conditioning (IR-SDE `DenoisingNAFNet_arch.py`): an embedding `emb` [B, E] reaches every block
through `mlp` = SimpleGate then Linear(E/2 -> 4c), whose output is chunked in the order
(shift_att, scale_att, shift_ffn, scale_ffn) and applied after each LayerNorm as x·(1 + scale) +
shift. The ConditionalNAFNet's `emb` is the time embedding.

DA-CLIP wiring (the code is not released; spec §6 reports the author's description, issues #44/#46):

  * degradation embedding -> `text_mlp` -> softmax over channels x the learned `prompt` ->
    `prompt_mlp`, exactly as in the U-Net (§4.4), added to the time embedding. Through each block's
    `mlp` it therefore lands in the same four shift/scale chunks (the author's "the degradation
    embedding goes through an MLP into the shift/scale"), with one code path and one key layout
    shared with the U-Net (`prompt`, `text_mlp.*`, `prompt_mlp.*`);
  * content embedding: in the MIDDLE (bottom) blocks only, the SCA is replaced by `att`, the U-Net's
    SpatialTransformer with the embedding as a single cross-attention context token.

Two LayerNorm flavours exist: the NAFNet paper's LayerNorm2d (weight and bias, eps 1e-6, `norm=
"layernorm2d"`), and IR-SDE's `module_util.LayerNorm` that its ConditionalNAFNet actually uses (gain
`g` only, eps 1e-5 in float32 and 1e-3 otherwise, `norm="channel"`, the ConditionalNAFNet default).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.layers import (
    ChannelLayerNorm,
    DepthwiseConv,
    LayerNorm,
    conv,
    dense,
    sinusoidal_embedding,
)
from uir_jax.models.unet import SpatialTransformer, count_params

Array = jax.Array

NORMS = ("layernorm2d", "channel")
EXPAND = 2  # DW_Expand = FFN_Expand = 2 in every released NAFNet / IR-SDE config

__all__ = ["NAFBlock", "NAFNet", "ConditionalNAFNet", "count_params", "simple_gate"]


def simple_gate(x: Array) -> Array:
  """SimpleGate: split the last axis in two halves and multiply them."""
  a, b = jnp.split(x, 2, axis=-1)
  return a * b


def _norm(kind: str, dim: int, dtype) -> nnx.Module:
  if kind == "layernorm2d":
    return LayerNorm(dim, eps=1e-6, dtype=dtype)
  if kind == "channel":
    return ChannelLayerNorm(dim, dtype=dtype)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class NAFBlock(nnx.Module):
  """NAFBlock on [B, H, W, c], optionally conditioned on an embedding and cross-attending.

  Args:
    c: channels.
    emb_dim: width of the conditioning embedding (0: unconditioned, no `mlp`).
    norm: "layernorm2d" or "channel" (see the module docstring).
    context_dim: > 0 replaces SCA by a SpatialTransformer cross-attending to a [B, 1, context_dim]
      context (the DA-CLIP content embedding).
  """

  def __init__(self, c: int, emb_dim: int = 0, *, norm: str = "layernorm2d",
               context_dim: int = 0, rngs: nnx.Rngs, dtype=jnp.float32,
               attention_impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype)
    dw = c * EXPAND
    if emb_dim:
      if emb_dim % 2:
        raise ValueError(f"NAFBlock: the embedding width must be even (SimpleGate), got {emb_dim}")
      self.mlp = dense(emb_dim // 2, 4 * c, **kw)
    else:
      self.mlp = None
    self.conv1 = dense(c, dw, **kw)
    # Depthwise 3x3: one filter per channel (PyTorch groups=dw, weight [dw, 1, 3, 3]).
    self.conv2 = DepthwiseConv(dw, 3, **kw)
    self.conv3 = dense(dw // 2, c, **kw)
    if context_dim:
      self.att = SpatialTransformer(dw // 2, context_dim, attention_impl=attention_impl, **kw)
      self.sca = None
    else:
      self.att = None
      self.sca = dense(dw // 2, dw // 2, **kw)
    self.conv4 = dense(c, c * EXPAND, **kw)
    self.conv5 = dense(c * EXPAND // 2, c, **kw)
    self.norm1 = _norm(norm, c, dtype)
    self.norm2 = _norm(norm, c, dtype)
    # Zero-initialised branch scales: a fresh block is the identity.
    self.beta = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.gamma = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.dtype = dtype

  def __call__(self, inp: Array, emb: Array | None = None, context: Array | None = None) -> Array:
    inp = inp.astype(self.dtype)
    if self.mlp is not None:
      if emb is None:
        raise ValueError("this NAFBlock is conditioned: pass the embedding")
      mod = self.mlp(simple_gate(emb.astype(self.dtype)))[:, None, None, :]
      # Chunk order of IR-SDE's NAFBlock.time_forward.
      shift_att, scale_att, shift_ffn, scale_ffn = jnp.split(mod, 4, axis=-1)
    x = self.norm1(inp)
    if self.mlp is not None:
      x = x * (scale_att + 1) + shift_att
    x = simple_gate(self.conv2(self.conv1(x)))
    if self.att is not None:
      x = self.att(x, context)
    else:
      # Simplified channel attention; the spatial mean accumulates in float32.
      pooled = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
      x = x * self.sca(pooled)
    y = inp + self.conv3(x) * self.beta[...].astype(self.dtype)
    x = self.norm2(y)
    if self.mlp is not None:
      x = x * (scale_ffn + 1) + shift_ffn
    x = self.conv5(simple_gate(self.conv4(x)))
    return y + x * self.gamma[...].astype(self.dtype)


class _NAFNetBody(nnx.Module):
  """The U-shaped NAFNet trunk shared by both models: intro -> encoders/downs -> middle ->
  ups (1x1 conv + PixelShuffle) + skip -> decoders -> ending, with zero padding and cropping."""

  def _build(self, in_ch: int, out_ch: int, width: int, middle_blk_num: int,
             enc_blk_nums: Sequence[int], dec_blk_nums: Sequence[int], emb_dim: int, norm: str,
             middle_context_dim: int, rngs: nnx.Rngs, dtype, attention_impl: str):
    enc_blk_nums = tuple(int(n) for n in enc_blk_nums)
    dec_blk_nums = tuple(int(n) for n in dec_blk_nums)
    if len(enc_blk_nums) != len(dec_blk_nums):
      raise ValueError(f"need as many decoder as encoder levels; got enc_blk_nums={enc_blk_nums}, "
                       f"dec_blk_nums={dec_blk_nums}")
    if width < 1 or min((middle_blk_num, *enc_blk_nums, *dec_blk_nums)) < 0:
      raise ValueError("width must be positive and block counts non-negative")
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    self.width, self.middle_blk_num = width, int(middle_blk_num)
    self.enc_blk_nums, self.dec_blk_nums, self.norm = enc_blk_nums, dec_blk_nums, norm
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype)
    block = lambda c, ctx=0: NAFBlock(c, emb_dim, norm=norm, context_dim=ctx,
                                      attention_impl=attention_impl, **kw)
    self.intro = conv(in_ch, width, 3, **kw)
    self.ending = conv(width, out_ch, 3, **kw)
    encoders, downs, ups, decoders = [], [], [], []
    chan = width
    for num in enc_blk_nums:
      encoders.append(nnx.List([block(chan) for _ in range(num)]))
      downs.append(conv(chan, 2 * chan, 2, stride=2, padding=0, **kw))
      chan *= 2
    self.middle_blks = nnx.List([block(chan, middle_context_dim) for _ in range(middle_blk_num)])
    for num in dec_blk_nums:
      ups.append(dense(chan, 2 * chan, use_bias=False, **kw))  # then PixelShuffle(2): chan / 2
      chan //= 2
      decoders.append(nnx.List([block(chan) for _ in range(num)]))
    self.encoders, self.downs = nnx.List(encoders), nnx.List(downs)
    self.ups, self.decoders = nnx.List(ups), nnx.List(decoders)

  @property
  def pad_multiple(self) -> int:
    return 2 ** len(self.enc_blk_nums)

  def _pad(self, x: Array) -> Array:
    m = self.pad_multiple
    ph, pw = -x.shape[1] % m, -x.shape[2] % m
    if ph or pw:  # zeros on the bottom/right, as F.pad(x, (0, pw, 0, ph)) in the reference
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return x

  def _trunk(self, x: Array, emb: Array | None, context: Array | None) -> Array:
    """x: padded [B, H, W, in_ch]; returns ending(...) at the padded size."""
    x = self.intro(x.astype(self.dtype))
    skips = []
    for blocks, down in zip(self.encoders, self.downs, strict=True):
      for blk in blocks:
        x = blk(x, emb)
      skips.append(x)
      x = down(x)
    for blk in self.middle_blks:
      x = blk(x, emb, context)
    for up, blocks in zip(self.ups, self.decoders, strict=True):
      x = _pixel_shuffle(up(x)) + skips.pop()
      for blk in blocks:
        x = blk(x, emb)
    return self.ending(x)


def _pixel_shuffle(x: Array, r: int = 2) -> Array:
  """nn.PixelShuffle on NHWC: input channel c·r² + i·r + j goes to output (c; row i, column j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


class _DaCLIPMixin:
  """The degradation prompt (U-Net §4.4) and context checks shared by both models."""

  def _build_prompt(self, context_dim: int, emb_dim: int, rngs: nnx.Rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype)
    self.prompt = nnx.Param(jax.random.uniform(rngs.params(), (1, emb_dim), jnp.float32))
    self.text_mlp1 = dense(context_dim, emb_dim, **kw)
    self.text_mlp2 = dense(emb_dim, emb_dim, **kw)
    self.prompt_mlp = dense(emb_dim, emb_dim, **kw)

  def degradation_prompt(self, text_context: Array) -> Array:
    """prompt_mlp(softmax(text_mlp(degra), over channels) · prompt): [B, emb_dim]."""
    logits = self.text_mlp2(jax.nn.silu(self.text_mlp1(text_context.astype(self.dtype))))
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * self.prompt[...]
    return self.prompt_mlp(p.astype(self.dtype))

  def _check_contexts(self, b: int, text_context, image_context) -> Array | None:
    for name, ctx in (("text_context", text_context), ("image_context", image_context)):
      if ctx is not None and ctx.shape != (b, self.context_dim):
        raise ValueError(f"{name} must be [B, context_dim] = {(b, self.context_dim)}, got "
                         f"{ctx.shape}")
    if self.use_image_context:
      if image_context is None:
        raise ValueError("this model cross-attends to DA-CLIP's content embedding in its middle "
                         "blocks: pass image_context=[B, context_dim]")
      return image_context[:, None, :]  # one context token
    return None


def _context_flags(context_dim: int, use_degra_context: bool, use_image_context: bool):
  if context_dim < 0:
    raise ValueError(f"context_dim must be >= 0, got {context_dim}")
  return bool(use_degra_context and context_dim), bool(use_image_context and context_dim)


class NAFNet(_DaCLIPMixin, _NAFNetBody):
  """NAFNet (Chen et al. 2022): direct regression, output = ending(trunk(x)) + x.

  Defaults are the paper's SIDD width-64 model. With `context_dim > 0` it becomes the MSE-based
  DA-CLIP variant of the DA-CLIP paper: no time, so the degradation prompt alone is the blocks'
  conditioning embedding (width 4·width), and the middle blocks cross-attend to the content
  embedding. Call as `net(x, text_context=..., image_context=...)`.
  """

  def __init__(self, img_channel: int = 3, width: int = 64, middle_blk_num: int = 12,
               enc_blk_nums: Sequence[int] = (2, 2, 4, 8),
               dec_blk_nums: Sequence[int] = (2, 2, 2, 2), *, context_dim: int = 0,
               use_degra_context: bool = True, use_image_context: bool = True,
               norm: str = "layernorm2d", global_color: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32, attention_impl: str = "auto"):
    self.img_channel, self.context_dim = img_channel, int(context_dim)
    self.use_degra_context, self.use_image_context = _context_flags(
        self.context_dim, use_degra_context, use_image_context)
    emb_dim = 4 * width if self.use_degra_context else 0
    self._build(img_channel, img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums,
                emb_dim, norm, self.context_dim if self.use_image_context else 0, rngs, dtype,
                attention_impl)
    if self.use_degra_context:
      self._build_prompt(self.context_dim, emb_dim, rngs, dtype)
    # Optional (ours, off in every released layout): a per-image colour transform of the input,
    # out = trunk + inp · gain + shift, with (gain, shift) [B, 2C] from the degradation prompt and
    # the input's mean colour through a zero-initialised Linear (the identity at start). The
    # blocks' LayerNorms remove each pixel's intensity, so the trunk learns multiplicative fixes
    # (a dark photo's gain) slowly; this head makes them one Linear away.
    self.color = (dense(emb_dim + img_channel, 2 * img_channel, zero=True, rngs=rngs,
                        dtype=jnp.float32) if global_color else None)

  def __call__(self, x: Array, *, text_context: Array | None = None,
               image_context: Array | None = None, mean_color: Array | None = None) -> Array:
    """`mean_color` [B, C]: the global colour head's input mean when `x` is already padded
    (exports of any size pad before the call); default: the mean of `x`."""
    if x.ndim != 4 or x.shape[-1] != self.img_channel:
      raise ValueError(f"NAFNet expects [B, H, W, {self.img_channel}], got {x.shape}")
    b, h, w, _ = x.shape
    context = self._check_contexts(b, text_context, image_context)
    emb = None
    if self.use_degra_context:
      if text_context is None:
        raise ValueError("this NAFNet is conditioned on DA-CLIP's degradation embedding: pass "
                         "text_context=[B, context_dim]")
      emb = self.degradation_prompt(text_context)
    inp = self._pad(x.astype(jnp.float32))
    out = self._trunk(inp, emb, context).astype(jnp.float32) + inp
    if self.color is not None:
      stats = (jnp.mean(x.astype(jnp.float32), axis=(1, 2)) if mean_color is None
               else mean_color.astype(jnp.float32))  # the unpadded mean colour [B, C]
      if emb is not None:
        stats = jnp.concatenate([emb.astype(jnp.float32), stats], axis=-1)
      gain, shift = jnp.split(self.color(stats), 2, axis=-1)
      out = out + inp * gain[:, None, None, :] + shift[:, None, None, :]
    return out[:, :h, :w]


class ConditionalNAFNet(_DaCLIPMixin, _NAFNetBody):
  """IR-SDE's noise predictor ε̂(x_t, μ, t) built from NAFBlocks (spec §6), optionally DA-CLIP-
  conditioned.

  Same call as `ConditionalUNet`: `model(xt, cond, time, *, text_context=None, image_context=None)`
  -> float32 [B, H, W, out_nc]. Input cat[x_t − μ, μ] (6 channels), zero-padded on the bottom/right
  to a multiple of 2^len(enc_blk_nums), cropped back. Following IR-SDE's ConditionalNAFNet the
  output is `ending(...)` alone: the predicted noise, with no input residual.

  Args:
    in_nc, out_nc: image channels (3).
    nf: width (64 in IR-SDE/Refusion); the time embedding has 4·nf channels.
    middle_blk_num, enc_blk_nums, dec_blk_nums: block counts; defaults are Refusion's
      (`options/train/refusion.yml`: width 64, enc [1, 1, 1, 28], middle 1, dec [1, 1, 1, 1]).
    context_dim: DA-CLIP embedding width (512 for ViT-B-32, 768 for ViT-L-14); 0 = plain IR-SDE.
    use_degra_context: add the degradation prompt to the time embedding (needs context_dim > 0).
    use_image_context: cross-attention on the content embedding in the middle blocks.
    norm: "channel" (IR-SDE's g-only LayerNorm, default) or "layernorm2d".
    dtype: compute dtype; parameters are float32.
  """

  def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, middle_blk_num: int = 1,
               enc_blk_nums: Sequence[int] = (1, 1, 1, 28),
               dec_blk_nums: Sequence[int] = (1, 1, 1, 1), *, context_dim: int = 0,
               use_degra_context: bool = True, use_image_context: bool = True,
               norm: str = "channel", rngs: nnx.Rngs, dtype=jnp.float32,
               attention_impl: str = "auto"):
    if nf % 2 or nf < 4:
      raise ValueError(f"nf must be even and >= 4 (sinusoidal embedding), got {nf}")
    self.in_nc, self.out_nc, self.nf = in_nc, out_nc, nf
    self.context_dim = int(context_dim)
    self.use_degra_context, self.use_image_context = _context_flags(
        self.context_dim, use_degra_context, use_image_context)
    time_dim = 4 * nf
    self._build(2 * in_nc, out_nc, nf, middle_blk_num, enc_blk_nums, dec_blk_nums, time_dim, norm,
                self.context_dim if self.use_image_context else 0, rngs, dtype, attention_impl)
    kw = dict(rngs=rngs, dtype=dtype)
    self.time_mlp1 = dense(nf, 2 * time_dim, **kw)
    self.time_mlp2 = dense(time_dim, time_dim, **kw)
    if self.use_degra_context:
      self._build_prompt(self.context_dim, time_dim, rngs, dtype)

  def time_embedding(self, time: Array | int, batch: int,
                     text_context: Array | None = None) -> Array:
    """time_mlp(t) (+ the degradation prompt): [B, 4·nf] in the compute dtype."""
    t = jnp.broadcast_to(jnp.asarray(time).reshape(-1), (batch,))
    emb = sinusoidal_embedding(t, self.nf).astype(self.dtype)
    emb = self.time_mlp2(simple_gate(self.time_mlp1(emb)))
    if self.use_degra_context and text_context is not None:
      emb = emb + self.degradation_prompt(text_context)
    return emb

  def __call__(self, xt: Array, cond: Array, time: Array | int, *,
               text_context: Array | None = None, image_context: Array | None = None) -> Array:
    if xt.ndim != 4 or xt.shape != cond.shape or xt.shape[-1] != self.in_nc:
      raise ValueError(f"ConditionalNAFNet expects x_t and μ of the same shape "
                       f"[B, H, W, {self.in_nc}]; got {xt.shape} and {cond.shape}")
    b, h, w, _ = xt.shape
    context = self._check_contexts(b, text_context, image_context)
    x = jnp.concatenate([xt - cond, cond], axis=-1).astype(jnp.float32)
    emb = self.time_embedding(time, b, text_context)
    out = self._trunk(self._pad(x), emb, context)
    return out[:, :h, :w].astype(jnp.float32)

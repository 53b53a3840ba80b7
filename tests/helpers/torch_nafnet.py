"""PyTorch reference NAFNet / ConditionalNAFNet (+ DA-CLIP variant), written from spec §6 and §4.2.

Test helper only (imports torch). Module and attribute names reproduce the IR-SDE / NAFNet
state_dict layout (`intro`, `encoders.i.j.*`, `downs.i`, `middle_blks.j.*`, `ups.i.0`,
`decoders.i.j.*`, `ending`, `time_mlp.1/.3`, block `mlp.1`, `sca.1`, `norm1.g` or
`norm1.weight/bias`, `beta`, `gamma`), and the DA-CLIP pieces use the U-Net's names (`prompt`,
`text_mlp.0/.2`, `prompt_mlp`, a SpatialTransformer `att` with `transformer_blocks.0.*`), so its
state_dict is what `uir_jax.convert.nafnet.load_nafnet` must read. Written in NCHW, the PyTorch
way, independently of the JAX code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_unet
from torch import nn


class SimpleGate(nn.Module):
  def forward(self, x):
    a, b = x.chunk(2, dim=1)
    return a * b


ChannelLayerNorm = torch_unet.ChanLayerNorm  # IR-SDE module_util.LayerNorm: gain only


class LayerNorm2d(nn.Module):
  """NAFNet's LayerNorm2d: per-pixel LayerNorm over channels, weight and bias, eps 1e-6."""

  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.eps = eps

  def forward(self, x):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + self.eps).sqrt()
    return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


SinusoidalPosEmb = torch_unet.SinusoidalPosEmb


# --- LDM SpatialTransformer (spec §4.2): the U-Net reference's, with NAFNet's argument order ---


def SpatialTransformer(dim, context_dim, d_head=32):  # noqa: N802 - stands in for a class
  return torch_unet.SpatialTransformer(dim, dim // d_head, d_head, context_dim)


# --- NAFNet -----------------------------------------------------------------------------------


class NAFBlock(nn.Module):
  def __init__(self, c, emb_dim=0, norm="layernorm2d", context_dim=0):
    super().__init__()
    self.mlp = nn.Sequential(SimpleGate(), nn.Linear(emb_dim // 2, 4 * c)) if emb_dim else None
    dw = 2 * c
    self.conv1 = nn.Conv2d(c, dw, 1)
    self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
    self.conv3 = nn.Conv2d(dw // 2, c, 1)
    if context_dim:
      self.att = SpatialTransformer(dw // 2, context_dim)
    else:
      self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
    self.sg = SimpleGate()
    self.conv4 = nn.Conv2d(c, 2 * c, 1)
    self.conv5 = nn.Conv2d(c, c, 1)
    norm_cls = ChannelLayerNorm if norm == "channel" else LayerNorm2d
    self.norm1, self.norm2 = norm_cls(c), norm_cls(c)
    self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
    self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

  def forward(self, inp, emb=None, context=None):
    if self.mlp is not None:
      shift_att, scale_att, shift_ffn, scale_ffn = self.mlp(emb)[:, :, None, None].chunk(4, dim=1)
    x = self.norm1(inp)
    if self.mlp is not None:
      x = x * (scale_att + 1) + shift_att
    x = self.sg(self.conv2(self.conv1(x)))
    x = self.att(x, context) if hasattr(self, "att") else x * self.sca(x)
    y = inp + self.conv3(x) * self.beta
    x = self.norm2(y)
    if self.mlp is not None:
      x = x * (scale_ffn + 1) + shift_ffn
    x = self.conv5(self.sg(self.conv4(x)))
    return y + x * self.gamma


class _Trunk(nn.Module):
  def _build(self, in_ch, out_ch, width, middle_blk_num, enc_blk_nums, dec_blk_nums, emb_dim,
             norm, middle_context_dim):
    self.intro = nn.Conv2d(in_ch, width, 3, padding=1)
    self.ending = nn.Conv2d(width, out_ch, 3, padding=1)
    self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
    self.ups, self.downs = nn.ModuleList(), nn.ModuleList()
    chan = width
    for num in enc_blk_nums:
      self.encoders.append(nn.Sequential(*[NAFBlock(chan, emb_dim, norm) for _ in range(num)]))
      self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
      chan *= 2
    self.middle_blks = nn.Sequential(
        *[NAFBlock(chan, emb_dim, norm, middle_context_dim) for _ in range(middle_blk_num)])
    for num in dec_blk_nums:
      self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
      chan //= 2
      self.decoders.append(nn.Sequential(*[NAFBlock(chan, emb_dim, norm) for _ in range(num)]))
    self.padder_size = 2 ** len(enc_blk_nums)

  def _pad(self, x):
    _, _, h, w = x.shape
    p = self.padder_size
    return F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))

  def _trunk(self, x, emb, context):
    x = self.intro(x)
    encs = []
    for encoder, down in zip(self.encoders, self.downs, strict=True):
      for blk in encoder:
        x = blk(x, emb)
      encs.append(x)
      x = down(x)
    for blk in self.middle_blks:
      x = blk(x, emb, context)
    for decoder, up, skip in zip(self.decoders, self.ups, encs[::-1], strict=True):
      x = up(x) + skip
      for blk in decoder:
        x = blk(x, emb)
    return self.ending(x)

  def _build_prompt(self, context_dim, emb_dim):
    self.prompt = nn.Parameter(torch.rand(1, emb_dim))
    self.text_mlp = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(),
                                  nn.Linear(emb_dim, emb_dim))
    self.prompt_mlp = nn.Linear(emb_dim, emb_dim)

  def _prompt(self, text_context):
    return self.prompt_mlp(torch.softmax(self.text_mlp(text_context), dim=1) * self.prompt)


class TorchConditionalNAFNet(_Trunk):
  """IR-SDE ConditionalNAFNet (spec §6) with the DA-CLIP options; NCHW in and out."""

  def __init__(self, in_nc=3, out_nc=3, nf=16, middle_blk_num=1, enc_blk_nums=(1, 1),
               dec_blk_nums=(1, 1), context_dim=0, use_degra_context=True,
               use_image_context=True, norm="channel"):
    super().__init__()
    time_dim = 4 * nf
    self.time_mlp = nn.Sequential(SinusoidalPosEmb(nf), nn.Linear(nf, 2 * time_dim), SimpleGate(),
                                  nn.Linear(time_dim, time_dim))
    self.use_degra = bool(use_degra_context and context_dim)
    self.use_image = bool(use_image_context and context_dim)
    self._build(2 * in_nc, out_nc, nf, middle_blk_num, enc_blk_nums, dec_blk_nums, time_dim, norm,
                context_dim if self.use_image else 0)
    if self.use_degra:
      self._build_prompt(context_dim, time_dim)

  def forward(self, xt, cond, time, text_context=None, image_context=None):
    _, _, h, w = xt.shape
    x = torch.cat([xt - cond, cond], dim=1)
    t = self.time_mlp(time)
    if self.use_degra and text_context is not None:
      t = t + self._prompt(text_context)
    context = image_context[:, None, :] if self.use_image else None
    return self._trunk(self._pad(x), t, context)[..., :h, :w]


class TorchNAFNet(_Trunk):
  """NAFNet (megvii layout, LayerNorm2d), optional DA-CLIP conditioning; out = ending + input."""

  def __init__(self, img_channel=3, width=16, middle_blk_num=1, enc_blk_nums=(1, 1),
               dec_blk_nums=(1, 1), context_dim=0, use_degra_context=True,
               use_image_context=True, norm="layernorm2d"):
    super().__init__()
    self.use_degra = bool(use_degra_context and context_dim)
    self.use_image = bool(use_image_context and context_dim)
    emb_dim = 4 * width if self.use_degra else 0
    self._build(img_channel, img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums,
                emb_dim, norm, context_dim if self.use_image else 0)
    if self.use_degra:
      self._build_prompt(context_dim, emb_dim)

  def forward(self, inp, text_context=None, image_context=None):
    _, _, h, w = inp.shape
    x = self._pad(inp)
    emb = self._prompt(text_context) if self.use_degra else None
    context = image_context[:, None, :] if self.use_image else None
    return (self._trunk(x, emb, context) + x)[..., :h, :w]


def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
  """Makes zero/one-initialised parameters matter: adds N(0, scale²) noise to every norm gain/bias,
  β, γ, the zero-init proj_out and the biases, so the parity test sees every tensor."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("beta", "gamma", "g", "bias") or "norm" in name or "proj_out" in name:
        p.add_(scale * torch.randn(p.shape, generator=g))
  return model

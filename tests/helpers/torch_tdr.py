"""PyTorch reference of TextualDegRemoval's `NAFNetRefFusion`, `RestormerRefFusion` and
`PromptIRRefFusion` (parity tests only; imports torch).

Written from the facts of mrluin/TextualDegRemoval@e755c39
`models/archs/network_nafnet_guided_arch.py` (spec §1.7), in its own terms (F.unfold / F.fold,
batch index select, dilated centre-patch search, make_grid), independently of the JAX code.
Module names reproduce its state_dict keys (`masa_enc.conv_L1..5`,
`masa_enc.blk_L1..5.{i}.conv1/2`, `masa_blk_enc.{l}.{j}.*`, `masa_blk_middle.0.{j}.*`, and
NAFNet's `intro`, `encoders`, `downs`, `middle_blks`, `ups`, `decoders`, `ending`). The B6 fix
is applied (the middle fusion uses `reffusion_n_blocks_middle`); `fix_b8=False` keeps the
released code's x16 index (d_y used twice), which crashes whenever d_x != d_y.

The Restormer-family copies (`models/archs/network_{restormer,promptir}_guided_arch.py`) keep
the keys `masa_enc.conv_L1..4`, `masa_blk_enc_level1..4.{j}.*` (+ `.alpha`, a zero-init scalar)
and the backbones' own keys (`torch_restormer.py`). Their B7 is FIXED here (marked below): the
released forward indexes `feat_lq[4]`, `feat_ref[4..1]` of the 4-level encoder (IndexError);
`fix_b7=False` keeps that indexing to show the crash.

NOT in the official code (our definition, marked): `fusion="encoder+decoder"` adds fusion
stacks before each decoder level (NAFNet `masa_blk_dec.{i}`, Restormer family
`masa_blk_dec_level{1,2,3}`), so that option is checked against a second implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_nafnet import NAFBlock
from torch_restormer import (
    PromptGenBlock,
    TransformerBlock,
    Upsample,
    _Encoder,
    _seq,
    official_promptir_widths,
)


class ResidualBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c, 3, padding=1)
    self.conv2 = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv2(F.relu(self.conv1(x))) + x


class Encoder(nn.Module):
  def __init__(self, in_chl, nf, n_blks, levels=5):
    super().__init__()
    counts = [n_blks[0], n_blks[1], n_blks[2], n_blks[2], n_blks[2]][:levels]
    self.levels = levels
    c_in = in_chl
    for lvl in range(levels):
      c = nf * 2 ** lvl
      setattr(self, f"conv_L{lvl + 1}", nn.Conv2d(c_in, c, 3, 1 if lvl == 0 else 2, 1))
      setattr(self, f"blk_L{lvl + 1}",
              nn.Sequential(*[ResidualBlock(c) for _ in range(counts[lvl])]))
      c_in = c

  def forward(self, x):
    out = []
    for lvl in range(1, self.levels + 1):
      x = getattr(self, f"blk_L{lvl}")(F.relu(getattr(self, f"conv_L{lvl}")(x)))
      out.append(x)
    return out


def _blk(c):
  return NAFBlock(c, norm="layernorm2d")


class TorchNAFNetRefFusion(nn.Module):
  def __init__(self, img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1),
               dec_blk_nums=(1, 1, 1, 1), nf=8, ext_n_blocks=(1, 1, 1, 1),
               reffusion_n_blocks=(1, 1, 1, 1), reffusion_n_blocks_middle=1, lr_block_size=8,
               ref_down_block_size=1.5, dilations=(1, 2, 3), fix_b8=True,
               fusion="encoder+bottleneck"):
    super().__init__()
    self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
    self.dilations, self.fix_b8, self.fix_b7, self.fusion = list(dilations), fix_b8, True, fusion
    self.masa_enc = Encoder(img_channel, nf, ext_n_blocks)
    self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
    self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
    self.encoders, self.decoders, self.ups, self.downs = (nn.ModuleList() for _ in range(4))
    self.masa_blk_enc, self.masa_blk_middle = nn.ModuleList(), nn.ModuleList()
    chan = width
    for i, num in enumerate(enc_blk_nums):
      self.encoders.append(nn.Sequential(*[_blk(chan) for _ in range(num)]))
      self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
      self.masa_blk_enc.append(
          nn.Sequential(*[_blk(2 * chan) for _ in range(reffusion_n_blocks[i])]))
      chan *= 2
    self.middle_blks = nn.Sequential(*[_blk(chan) for _ in range(middle_blk_num)])
    self.masa_blk_middle.append(  # B6 fixed
        nn.Sequential(*[_blk(2 * chan) for _ in range(reffusion_n_blocks_middle)]))
    if fusion == "encoder+decoder":  # NOT in the official code: our decoder fusion
      self.masa_blk_dec = nn.ModuleList()
    for i, num in enumerate(dec_blk_nums):
      self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
      chan //= 2
      self.decoders.append(nn.Sequential(*[_blk(chan) for _ in range(num)]))
      if fusion == "encoder+decoder":
        self.masa_blk_dec.append(
            nn.Sequential(*[_blk(2 * chan) for _ in range(reffusion_n_blocks[3 - i])]))
    self.padder_size = 2 ** len(self.encoders)

  # --- matching, as the official code does it ---

  @staticmethod
  def bis(inp, dim, index):
    views = [inp.size(0)] + [1 if i != dim else -1 for i in range(1, inp.dim())]
    expanse = list(inp.size())
    expanse[0] = -1
    expanse[dim] = -1
    return torch.gather(inp, dim, index.clone().view(views).expand(expanse))

  def search_org(self, lr, reflr):
    n, _, h, w = lr.shape
    _, _, hr, wr = reflr.shape
    ref_u = F.normalize(F.unfold(reflr, 3), dim=1)
    lr_u = F.normalize(F.unfold(lr, 3).permute(0, 2, 1), dim=2)
    corr = torch.bmm(lr_u, ref_u).view(n, h - 2, w - 2, (hr - 2) * (wr - 2))
    return torch.topk(corr, 1, dim=-1)

  def search(self, lr, reflr):
    n, c, _, _ = reflr.shape
    k_y, k_x = lr.shape[-2:]
    x, y = k_x // 2, k_y // 2
    corr_sum = 0
    for d in self.dilations:
      ref_p = F.normalize(F.unfold(reflr, 3, padding=d, dilation=d), dim=1)
      lr_p = lr[:, :, :, y - d:y + d + 1:d, x - d:x + d + 1:d].contiguous().view(n, -1, c * 9)
      corr_sum = corr_sum + torch.bmm(F.normalize(lr_p, dim=2), ref_p)
    return torch.topk(corr_sum, 1, dim=-1)

  def transfer(self, fea, index, soft_att, ks, pd, stride):
    out = self.bis(F.unfold(fea, ks, padding=0, stride=stride), 2, index)
    _, hi, wi = index.shape
    size = (hi * stride, wi * stride)
    fold = F.fold(out, size, ks, padding=pd, stride=stride)
    div = F.fold(torch.ones_like(out), size, ks, padding=pd, stride=stride)
    return fold / div * F.interpolate(soft_att, size=size, mode="bilinear")

  @staticmethod
  def make_grid(x1, y1, dx, dy, s):
    x1 = (x1 * s).view(-1, 1) + torch.arange(dx * s).view(1, -1)
    y1 = (y1 * s).view(-1, 1) + torch.arange(dy * s).view(1, -1)
    ys, xs = [], []
    for i in range(x1.size(0)):
      gy, gx = torch.meshgrid(y1[i], x1[i], indexing="ij")
      ys.append(gy.reshape(-1))
      xs.append(gx.reshape(-1))
    return torch.cat(ys), torch.cat(xs)

  def pad(self, x):
    p = self.padder_size * self.lr_block_size
    _, _, h, w = x.shape
    return F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))

  def match(self, inp, ref):
    """The warped guidance [G0 (/1), ...] for padded photo and guidance (official steps)."""
    P, B = self.padder_size, self.lr_block_size
    _, _, h, w = inp.shape
    px, py = w // P // B, h // P // B
    k_x, k_y = w // P // px, h // P // py
    _, _, hr_img, wr_img = ref.shape
    dx = 2 * int(wr_img // P // (2 * px) * self.ref_down_block_size) + 1
    dy = 2 * int(hr_img // P // (2 * py) * self.ref_down_block_size) + 1
    fl, fr = self.masa_enc(inp), self.masa_enc(ref)
    # B7 FIXED (Restormer family): the released code indexes level 4 of a 4-level encoder.
    top = len(fl) - 1 if self.fix_b7 else 4
    n, c, H, W = fl[top].shape
    _, _, Hr, Wr = fr[top].shape
    lr_p = F.unfold(F.pad(fl[top], (1, 1, 1, 1), mode="replicate"), (k_y + 2, k_x + 2),
                    stride=(k_y, k_x))
    lr_p = lr_p.view(n, c, k_y + 2, k_x + 2, py * px).permute(0, 4, 1, 2, 3)
    _, ind = self.search(lr_p, fr[top])
    index = ind[:, :, 0]
    ix, iy = index % Wr, index // Wr
    x1, x2 = ix - dx // 2 - 1, ix + dx // 2 + 1
    y1, y2 = iy - dy // 2 - 1, iy + dy // 2 + 1
    m = (x1 < 0).long(); x1 = x1 * (1 - m); x2 = x2 * (1 - m) + (dx + 1) * m  # noqa: E702
    m = (x2 > Wr - 1).long(); x2 = x2 * (1 - m) + (Wr - 1) * m; x1 = x1 * (1 - m) + (x2 - (dx + 1)) * m  # noqa: E501,E702
    m = (y1 < 0).long(); y1 = y1 * (1 - m); y2 = y2 * (1 - m) + (dy + 1) * m  # noqa: E702
    m = (y2 > Hr - 1).long(); y2 = y2 * (1 - m) + (Hr - 1) * m; y1 = y1 * (1 - m) + (y2 - (dy + 1)) * m  # noqa: E501,E702
    npp = n * py * px
    blocks = {}
    scales = (1, 2, 4, 8, 16)[:len(fl)]
    for lvl, s in enumerate(scales):
      gy, gx = self.make_grid(x1, y1, dx + 2, dy + 2, s)
      last = (dy + 2) * s if (s == 16 and not self.fix_b8) else (dx + 2) * s  # B8
      ib = torch.repeat_interleave(torch.arange(n), py * px * ((dy + 2) * s) * last)
      f = fr[top - lvl]
      blocks[s] = f[ib, :, gy, gx].view(npp, (dy + 2) * s, (dx + 2) * s, c // s).permute(0, 3, 1, 2)
    corr, idx = self.search_org(lr_p.contiguous().view(npp, c, k_y + 2, k_x + 2), blocks[1])
    index_all, soft = idx[:, :, :, 0], corr[:, :, :, 0:1].permute(0, 3, 1, 2)
    warped = []
    for s in scales[::-1]:
      t = self.transfer(blocks[s], index_all, soft, 3 * s, s, s)
      t = t.view(n, py, px, c // s, H // py * s, W // px * s).permute(0, 3, 1, 4, 2, 5)
      warped.append(t.reshape(n, c // s, H * s, W * s))
    self.debug = dict(warped=warped, index=index, x1=x1, y1=y1, index_all=index_all, soft=soft)
    return warped

  def forward(self, inp, ref):
    _, _, oh, ow = inp.shape
    inp, ref = self.pad(inp), self.pad(ref)
    warped = self.match(inp, ref)
    x = self.intro(inp)
    chan = x.shape[1]
    encs = []
    for i, (enc, down, fuse) in enumerate(zip(self.encoders, self.downs, self.masa_blk_enc,
                                                          strict=True)):
      x = fuse(torch.cat([x, warped[i]], 1))[:, :chan]
      x = enc(x)
      encs.append(x)
      x = down(x)
      chan *= 2
    x = self.masa_blk_middle[0](torch.cat([x, warped[-1]], 1))[:, :chan]
    x = self.middle_blks(x)
    for i, (dec, up, skip) in enumerate(zip(self.decoders, self.ups, encs[::-1], strict=True)):
      x = up(x) + skip
      chan //= 2
      if self.fusion == "encoder+decoder":  # NOT in the official code
        x = self.masa_blk_dec[i](torch.cat([x, warped[3 - i]], 1))[:, :chan]
      x = dec(x)
    return (self.ending(x) + inp)[:, :, :oh, :ow]


# --- Restormer family ---------------------------------------------------------------------------


class TransformerResFusionBlock(TransformerBlock):
  """The code's fusion block: T(x) · alpha + x, alpha = zeros(1)."""

  def __init__(self, dim, heads, factor, bias, kind):
    super().__init__(dim, heads, factor, bias, kind)
    self.alpha = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    return super().forward(x) * self.alpha + x


def _fuse_seq(n, dim, heads, factor, bias, kind):
  return nn.Sequential(*[TransformerResFusionBlock(dim, heads, factor, bias, kind)
                         for _ in range(n)])


class TorchRestormerRefFusion(_Encoder):
  """`RestormerRefFusion` (`prompt=False`) or `PromptIRRefFusion(decoder=True)` (`prompt=True`).

  Reuses TorchNAFNetRefFusion's matching steps (they are the same functions in the three official
  files) with the 4-level encoder and padder 2^3.
  """

  _m = TorchNAFNetRefFusion.__dict__  # the raw attributes (staticmethods stay static)
  bis, search_org, search, transfer, make_grid, pad, match = (
      _m["bis"], _m["search_org"], _m["search"], _m["transfer"], _m["make_grid"], _m["pad"],
      _m["match"])

  def __init__(self, inp_channels=3, out_channels=3, dim=8, num_blocks=(1, 1, 1, 1),
               num_refinement_blocks=1, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
               bias=False, LayerNorm_type="WithBias", nf=8, ext_n_blocks=(1, 1, 1, 1),  # noqa: N803
               reffusion_n_blocks=(1, 1, 1, 1), lr_block_size=8, ref_down_block_size=1.5,
               dilations=(1, 2, 3), prompt=False, prompt_dims=(64, 128, 320),
               prompt_sizes=(64, 32, 16), prompt_len=5, fix_b7=True,
               fusion="encoder+bottleneck"):
    super().__init__()
    f, k, nb, hd = ffn_expansion_factor, LayerNorm_type, num_blocks, heads
    self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
    self.dilations, self.fix_b8, self.fix_b7 = list(dilations), True, fix_b7
    self.padder_size, self.prompt, self.fusion = 2 ** 3, prompt, fusion
    self.masa_enc = Encoder(inp_channels, nf, ext_n_blocks, levels=4)
    self._build_encoder(inp_channels, dim, nb, hd, f, bias, k)
    for lvl in range(4):
      setattr(self, f"masa_blk_enc_level{lvl + 1}",
              _fuse_seq(reffusion_n_blocks[lvl], 2 * dim * 2 ** lvl, hd[lvl], f, bias, k))
    if prompt:
      p1, p2, p3 = prompt_dims
      n3, n2, n1, r3 = official_promptir_widths(dim, prompt_dims)[1]
      self.prompt1 = PromptGenBlock(p1, prompt_len, prompt_sizes[0], 2 * dim)
      self.prompt2 = PromptGenBlock(p2, prompt_len, prompt_sizes[1], 4 * dim)
      self.prompt3 = PromptGenBlock(p3, prompt_len, prompt_sizes[2], 8 * dim)
      # Built by the official model, never used by its forward.
      self.chnl_reduce1 = nn.Conv2d(p1, p1, 1, bias=bias)
      self.chnl_reduce2 = nn.Conv2d(p2, p2, 1, bias=bias)
      self.chnl_reduce3 = nn.Conv2d(p3, 4 * p3 // 5, 1, bias=bias)
      self.reduce_noise_channel_1 = nn.Conv2d(dim + p1, dim, 1, bias=bias)
      self.reduce_noise_channel_2 = nn.Conv2d(2 * dim + p2, 2 * dim, 1, bias=bias)
      self.reduce_noise_channel_3 = nn.Conv2d(4 * dim + 4 * p3 // 5, 4 * dim, 1, bias=bias)
      self.up4_3 = Upsample(4 * dim)
      self.reduce_chan_level3 = nn.Conv2d(r3, 4 * dim, 1, bias=bias)
      self.noise_level3 = TransformerBlock(n3, hd[2], f, bias, k)
      self.reduce_noise_level3 = nn.Conv2d(n3, 4 * dim, 1, bias=bias)
      self.noise_level2 = TransformerBlock(n2, hd[2], f, bias, k)
      self.reduce_noise_level2 = nn.Conv2d(n2, 4 * dim, 1, bias=bias)
      self.noise_level1 = TransformerBlock(n1, hd[2], f, bias, k)
      self.reduce_noise_level1 = nn.Conv2d(n1, 2 * dim, 1, bias=bias)
    else:
      self.up4_3 = Upsample(8 * dim)
      self.reduce_chan_level3 = nn.Conv2d(8 * dim, 4 * dim, 1, bias=bias)
    self.decoder_level3 = _seq(nb[2], 4 * dim, hd[2], f, bias, k)
    self.up3_2 = Upsample(4 * dim)
    self.reduce_chan_level2 = nn.Conv2d(4 * dim, 2 * dim, 1, bias=bias)
    self.decoder_level2 = _seq(nb[1], 2 * dim, hd[1], f, bias, k)
    self.up2_1 = Upsample(2 * dim)
    self.decoder_level1 = _seq(nb[0], 2 * dim, hd[0], f, bias, k)
    self.refinement = _seq(num_refinement_blocks, 2 * dim, hd[0], f, bias, k)
    self.output = nn.Conv2d(2 * dim, out_channels, 3, padding=1, bias=bias)
    if fusion == "encoder+decoder":  # NOT in the official code: our decoder fusion
      self.masa_blk_dec_level3 = _fuse_seq(reffusion_n_blocks[2], 8 * dim, hd[2], f, bias, k)
      self.masa_blk_dec_level2 = _fuse_seq(reffusion_n_blocks[1], 4 * dim, hd[1], f, bias, k)
      self.masa_blk_dec_level1 = _fuse_seq(reffusion_n_blocks[0], 3 * dim, hd[0], f, bias, k)

  @staticmethod
  def _fuse(seq, x, g):
    c = x.shape[1]
    return seq(torch.cat([x, g], 1))[:, :c]

  def _dec(self, lvl, x, g):
    if self.fusion != "encoder+decoder":
      return x
    return self._fuse(getattr(self, f"masa_blk_dec_level{lvl}"), x, g)

  def forward(self, inp, ref):
    _, _, oh, ow = inp.shape
    inp, ref = self.pad(inp), self.pad(ref)
    g = self.match(inp, ref)  # [x8 (nf, /1), x4, x2, x1 (8nf, /8)] as warp_ref_l
    e1 = self.encoder_level1(self._fuse(self.masa_blk_enc_level1, self.patch_embed(inp), g[0]))
    e2 = self.encoder_level2(self._fuse(self.masa_blk_enc_level2, self.down1_2(e1), g[1]))
    e3 = self.encoder_level3(self._fuse(self.masa_blk_enc_level3, self.down2_3(e2), g[2]))
    lat = self.latent(self._fuse(self.masa_blk_enc_level4, self.down3_4(e3), g[3]))
    if self.prompt:
      lat = self.reduce_noise_level3(self.noise_level3(torch.cat([lat, self.prompt3(lat)], 1)))
    d3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1))
    d3 = self.decoder_level3(self._dec(3, d3, g[2]))
    if self.prompt:
      d3 = self.reduce_noise_level2(self.noise_level2(torch.cat([d3, self.prompt2(d3)], 1)))
    d2 = self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1))
    d2 = self.decoder_level2(self._dec(2, d2, g[1]))
    if self.prompt:
      d2 = self.reduce_noise_level1(self.noise_level1(torch.cat([d2, self.prompt1(d2)], 1)))
    d1 = torch.cat([self.up2_1(d2), e1], 1)
    d1 = self.refinement(self.decoder_level1(self._dec(1, d1, g[0])))
    return (self.output(d1) + inp)[:, :, :oh, :ow]

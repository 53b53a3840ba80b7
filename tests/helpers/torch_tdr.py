"""PyTorch reference of TextualDegRemoval's `NAFNetRefFusion` (parity tests only; imports torch).

Written from the facts of mrluin/TextualDegRemoval@e755c39
`models/archs/network_nafnet_guided_arch.py` (spec §1.7), in its own terms (F.unfold / F.fold,
batch index select, dilated centre-patch search, make_grid), independently of the JAX code.
Module names reproduce its state_dict keys (`masa_enc.conv_L1..5`,
`masa_enc.blk_L1..5.{i}.conv1/2`, `masa_blk_enc.{l}.{j}.*`, `masa_blk_middle.0.{j}.*`, and
NAFNet's `intro`, `encoders`, `downs`, `middle_blks`, `ups`, `decoders`, `ending`). The B6 fix
is applied (the middle fusion uses `reffusion_n_blocks_middle`); `fix_b8=False` keeps the
released code's x16 index (d_y used twice), which crashes whenever d_x != d_y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_nafnet import NAFBlock


class ResidualBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c, 3, padding=1)
    self.conv2 = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, x):
    return self.conv2(F.relu(self.conv1(x))) + x


class Encoder(nn.Module):
  def __init__(self, in_chl, nf, n_blks):
    super().__init__()
    counts = [n_blks[0], n_blks[1], n_blks[2], n_blks[2], n_blks[2]]
    c_in = in_chl
    for lvl in range(5):
      c = nf * 2 ** lvl
      setattr(self, f"conv_L{lvl + 1}", nn.Conv2d(c_in, c, 3, 1 if lvl == 0 else 2, 1))
      setattr(self, f"blk_L{lvl + 1}",
              nn.Sequential(*[ResidualBlock(c) for _ in range(counts[lvl])]))
      c_in = c

  def forward(self, x):
    out = []
    for lvl in range(1, 6):
      x = getattr(self, f"blk_L{lvl}")(F.relu(getattr(self, f"conv_L{lvl}")(x)))
      out.append(x)
    return out


def _blk(c):
  return NAFBlock(c, norm="layernorm2d")


class TorchNAFNetRefFusion(nn.Module):
  def __init__(self, img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 1),
               dec_blk_nums=(1, 1, 1, 1), nf=8, ext_n_blocks=(1, 1, 1, 1),
               reffusion_n_blocks=(1, 1, 1, 1), reffusion_n_blocks_middle=1, lr_block_size=8,
               ref_down_block_size=1.5, dilations=(1, 2, 3), fix_b8=True):
    super().__init__()
    self.lr_block_size, self.ref_down_block_size = lr_block_size, ref_down_block_size
    self.dilations, self.fix_b8 = list(dilations), fix_b8
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
    for num in dec_blk_nums:
      self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
      chan //= 2
      self.decoders.append(nn.Sequential(*[_blk(chan) for _ in range(num)]))
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

  def forward(self, inp, ref):
    _, _, oh, ow = inp.shape
    inp, ref = self.pad(inp), self.pad(ref)
    P, B = self.padder_size, self.lr_block_size
    _, _, h, w = inp.shape
    px, py = w // P // B, h // P // B
    k_x, k_y = w // P // px, h // P // py
    _, _, hr_img, wr_img = ref.shape
    dx = 2 * int(wr_img // P // (2 * px) * self.ref_down_block_size) + 1
    dy = 2 * int(hr_img // P // (2 * py) * self.ref_down_block_size) + 1
    fl, fr = self.masa_enc(inp), self.masa_enc(ref)
    n, c, H, W = fl[4].shape
    _, _, Hr, Wr = fr[4].shape
    lr_p = F.unfold(F.pad(fl[4], (1, 1, 1, 1), mode="replicate"), (k_y + 2, k_x + 2),
                    stride=(k_y, k_x))
    lr_p = lr_p.view(n, c, k_y + 2, k_x + 2, py * px).permute(0, 4, 1, 2, 3)
    _, ind = self.search(lr_p, fr[4])
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
    for lvl, s in enumerate((1, 2, 4, 8, 16)):
      gy, gx = self.make_grid(x1, y1, dx + 2, dy + 2, s)
      last = (dy + 2) * s if (s == 16 and not self.fix_b8) else (dx + 2) * s  # B8
      ib = torch.repeat_interleave(torch.arange(n), py * px * ((dy + 2) * s) * last)
      f = fr[4 - lvl]
      blocks[s] = f[ib, :, gy, gx].view(npp, (dy + 2) * s, (dx + 2) * s, c // s).permute(0, 3, 1, 2)
    corr, idx = self.search_org(lr_p.contiguous().view(npp, c, k_y + 2, k_x + 2), blocks[1])
    index_all, soft = idx[:, :, :, 0], corr[:, :, :, 0:1].permute(0, 3, 1, 2)
    warped = []
    for s in (16, 8, 4, 2, 1):
      t = self.transfer(blocks[s], index_all, soft, 3 * s, s, s)
      t = t.view(n, py, px, c // s, H // py * s, W // px * s).permute(0, 3, 1, 4, 2, 5)
      warped.append(t.reshape(n, c // s, H * s, W * s))
    self.debug = dict(warped=warped, index=index, x1=x1, y1=y1, index_all=index_all, soft=soft)
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
    for dec, up, skip in zip(self.decoders, self.ups, encs[::-1], strict=True):
      x = dec(up(x) + skip)
    return (self.ending(x) + inp)[:, :, :oh, :ow]

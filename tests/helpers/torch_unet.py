"""A PyTorch ConditionalUNet written from the spec (§4, Appendix A), for parity tests only.

This is our own independent NCHW implementation of the reference architecture: module names
reproduce the released state_dict keys (`downs.0.2.fn.fn.to_qkv.weight`, ...), so a state_dict of
this model has the layout of `universal-ir.pth` / `wild-ir.pth`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def default_conv(cin, cout, k=3):
  return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class SinusoidalPosEmb(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dim = dim

  def forward(self, t):
    half = self.dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class Block(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.proj = default_conv(cin, cout)

  def forward(self, x, scale_shift=None):
    x = self.proj(x)
    if scale_shift is not None:
      scale, shift = scale_shift
      x = x * (scale + 1) + shift
    return F.silu(x)


class ResBlock(nn.Module):
  def __init__(self, cin, cout, time_dim):
    super().__init__()
    self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * cout))
    self.block1 = Block(cin, cout)
    self.block2 = Block(cout, cout)
    self.res_conv = default_conv(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x, t):
    scale_shift = self.mlp(t)[:, :, None, None].chunk(2, dim=1)
    h = self.block2(self.block1(x, scale_shift))
    return h + self.res_conv(x)


class ChanLayerNorm(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

  def forward(self, x):
    eps = 1e-5 if x.dtype == torch.float32 else 1e-3
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * self.g


class PreNorm(nn.Module):
  def __init__(self, dim, fn):
    super().__init__()
    self.fn, self.norm = fn, ChanLayerNorm(dim)

  def forward(self, x, **kw):
    return self.fn(self.norm(x), **kw)


class Residual(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x, **kw):
    return self.fn(x, **kw) + x


class LinearAttention(nn.Module):
  def __init__(self, dim, heads=4, dim_head=32):
    super().__init__()
    self.heads, self.scale = heads, dim_head ** -0.5
    hidden = heads * dim_head
    self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
    self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChanLayerNorm(dim))

  def forward(self, x, context=None):
    b, _, h, w = x.shape
    q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
    q = q.softmax(dim=-2) * self.scale
    k = k.softmax(dim=-1)
    v = v / (h * w)
    ctx = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", ctx, q).reshape(b, -1, h, w)
    return self.to_out(out)


class CrossAttention(nn.Module):
  def __init__(self, dim, heads, dim_head, context_dim=None):
    super().__init__()
    inner = heads * dim_head
    context_dim = context_dim or dim
    self.heads, self.scale = heads, dim_head ** -0.5
    self.to_q = nn.Linear(dim, inner, bias=False)
    self.to_k = nn.Linear(context_dim, inner, bias=False)
    self.to_v = nn.Linear(context_dim, inner, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

  def forward(self, x, context=None):
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(x.shape[0], x.shape[1],
                                                                           -1)
    return self.to_out(out)


class GEGLU(nn.Module):
  def __init__(self, din, dout):
    super().__init__()
    self.proj = nn.Linear(din, 2 * dout)

  def forward(self, x):
    a, gate = self.proj(x).chunk(2, dim=-1)
    return a * F.gelu(gate)


class FeedForward(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

  def forward(self, x):
    return self.net(x)


class BasicTransformerBlock(nn.Module):
  def __init__(self, dim, heads, dim_head, context_dim):
    super().__init__()
    self.attn1 = CrossAttention(dim, heads, dim_head)
    self.ff = FeedForward(dim)
    self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
    self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

  def forward(self, x, context=None):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context=context) + x
    return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
  def __init__(self, c, heads, dim_head, context_dim):
    super().__init__()
    inner = heads * dim_head
    self.norm = nn.GroupNorm(32, c, eps=1e-6, affine=True)
    self.proj_in = nn.Conv2d(c, inner, 1)
    self.transformer_blocks = nn.ModuleList(
        [BasicTransformerBlock(inner, heads, dim_head, context_dim)])
    self.proj_out = nn.Conv2d(inner, c, 1)
    nn.init.zeros_(self.proj_out.weight)
    nn.init.zeros_(self.proj_out.bias)

  def forward(self, x, context=None):
    b, c, h, w = x.shape
    x_in = x
    x = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
    for blk in self.transformer_blocks:
      x = blk(x, context=context)
    x = x.transpose(1, 2).reshape(b, -1, h, w)
    return self.proj_out(x) + x_in


def Downsample(cin, cout):  # noqa: N802 - named like the reference factory
  return nn.Conv2d(cin, cout, 4, 2, 1)


def Upsample(cin, cout):  # noqa: N802
  return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(cin, cout, 3, padding=1))


class ConditionalUNet(nn.Module):
  def __init__(self, in_nc=3, out_nc=3, nf=64, ch_mult=(1, 2, 4, 8), context_dim=512,
               use_degra_context=True, use_image_context=True, scale=1.0):
    super().__init__()
    self.depth = len(ch_mult)
    self.context_dim = context_dim
    self.use_degra_context, self.use_image_context = use_degra_context, use_image_context
    self.scale = scale
    time_dim = 4 * nf
    dims = [nf, *(nf * m for m in ch_mult)]
    in_out = list(zip(dims[:-1], dims[1:], strict=True))
    cross = use_image_context and context_dim > 0

    self.init_conv = default_conv(2 * in_nc, nf, 7)
    self.time_mlp = nn.Sequential(SinusoidalPosEmb(nf), nn.Linear(nf, time_dim), nn.GELU(),
                                  nn.Linear(time_dim, time_dim))
    if use_degra_context:
      self.prompt = nn.Parameter(torch.rand(1, time_dim))
      self.text_mlp = nn.Sequential(nn.Linear(context_dim, time_dim), nn.SiLU(),
                                    nn.Linear(time_dim, time_dim))
      self.prompt_mlp = nn.Linear(time_dim, time_dim)
    if scale == 0.5:
      self.downsample = Downsample(nf, nf)
      self.upsample = Upsample(nf, nf)

    def att(dim, bottom):
      if cross and bottom:
        fn = SpatialTransformer(dim, dim // 32, 32, context_dim)
      else:
        fn = LinearAttention(dim)
      return Residual(PreNorm(dim, fn))

    self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
    for i, (d_in, d_out) in enumerate(in_out):
      last = i == self.depth - 1
      self.downs.append(nn.ModuleList([
          ResBlock(d_in, d_in, time_dim), ResBlock(d_in, d_in, time_dim), att(d_in, last),
          default_conv(d_in, d_out) if last else Downsample(d_in, d_out)]))
    for i, (d_in, d_out) in reversed(list(enumerate(in_out))):
      self.ups.append(nn.ModuleList([
          ResBlock(d_out + d_in, d_out, time_dim), ResBlock(d_out + d_in, d_out, time_dim),
          att(d_out, i == self.depth - 1),
          default_conv(d_out, d_in) if i == 0 else Upsample(d_out, d_in)]))
    mid = dims[-1]
    self.mid_block1 = ResBlock(mid, mid, time_dim)
    self.mid_attn = att(mid, True)
    self.mid_block2 = ResBlock(mid, mid, time_dim)
    self.final_res_block = ResBlock(2 * nf, nf, time_dim)
    self.final_conv = nn.Conv2d(nf, out_nc, 3, padding=1)

  def forward(self, xt, cond, time, text_context=None, image_context=None):
    if isinstance(time, (int, float)):
      time = torch.tensor([time], device=xt.device)
    x = torch.cat([xt - cond, cond], dim=1)
    h, w = x.shape[-2:]
    m = 2 ** self.depth
    x = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m), "reflect")
    x = self.init_conv(x)
    x_ = x.clone()
    if self.scale == 0.5:
      x = self.downsample(x)
    t = self.time_mlp(time)
    if self.use_degra_context and text_context is not None:
      p = F.softmax(self.text_mlp(text_context), dim=1) * self.prompt
      t = t + self.prompt_mlp(p)
    context = image_context.unsqueeze(1) if self.use_image_context else None
    hs = []
    for b1, b2, attn, down in self.downs:
      x = b1(x, t)
      hs.append(x)
      x = attn(b2(x, t), context=context)
      hs.append(x)
      x = down(x)
    x = self.mid_block2(self.mid_attn(self.mid_block1(x, t), context=context), t)
    for b1, b2, attn, up in self.ups:
      x = b1(torch.cat([x, hs.pop()], dim=1), t)
      x = b2(torch.cat([x, hs.pop()], dim=1), t)
      x = up(attn(x, context=context))
    if self.scale == 0.5:
      x = self.upsample(x)
    x = self.final_conv(self.final_res_block(torch.cat([x, x_], dim=1), t))
    return x[..., :h, :w]


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
  """Random non-zero weights everywhere (zero-inits included, so every path matters)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".g") or "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
      elif name == "prompt":
        p.copy_(torch.rand(p.shape, generator=g))
      elif name.startswith("final_conv"):  # unit-scale noise predictions, like a trained model
        p.copy_(0.1 * torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
      elif p.ndim == 1:  # biases
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
  return model

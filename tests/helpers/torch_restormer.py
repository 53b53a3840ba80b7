"""PyTorch reference Restormer and PromptIR, for parity tests only (imports torch).

Written from the facts of swz30/Restormer@861974a (`basicsr/models/archs/restormer_arch.py`) and
va1shn9v/PromptIR@20eff77 (`net/model.py`), in NCHW the PyTorch way and independently of the JAX
code. Module and attribute names reproduce the released state_dict keys (`patch_embed.proj`,
`encoder_level1.0.norm1.body.weight`, `attn.temperature` [heads, 1, 1], `attn.qkv`,
`attn.qkv_dwconv`, `ffn.project_in/dwconv/project_out`, `down1_2.body.0`, `up4_3.body.0`,
`reduce_chan_level3`, `skip_conv`, `output`; PromptIR's `prompt1.prompt_param`
[1, len, dim, size, size], `prompt1.linear_layer`, `prompt1.conv3x3`, `noise_level3`,
`reduce_noise_level3`, and the never-used `chnl_reduce1..3`, `reduce_noise_channel_1..3`).

PromptIR's hard-coded widths (prompt widths 64/128/320, sizes 64/32/16, noise-block widths
`4·dim + 512`, `2·dim + 224`, `2·dim + 64`, `2·dim + 192` into reduce_chan_level3) are written
as functions of `dim` and `prompt_dims` that equal the released numbers at dim = 48, so tiny
models can be built; `official_promptir_widths` checks that claim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
  """Restormer's LayerNorm wrapper: `body` is WithBias_LayerNorm or BiasFree_LayerNorm over C."""

  def __init__(self, dim, kind):
    super().__init__()
    self.body = _BiasFree(dim) if kind == "BiasFree" else _WithBias(dim)

  def forward(self, x):
    return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _BiasFree(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    var = x.var(-1, keepdim=True, unbiased=False)
    return x / torch.sqrt(var + 1e-5) * self.weight


class _WithBias(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))

  def forward(self, x):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class FeedForward(nn.Module):
  def __init__(self, dim, factor, bias):
    super().__init__()
    hidden = int(dim * factor)
    self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
    self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
    self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

  def forward(self, x):
    a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
    return self.project_out(F.gelu(a) * b)


class Attention(nn.Module):
  def __init__(self, dim, heads, bias):
    super().__init__()
    self.heads = heads
    self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
    self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
    self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
    self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

  def forward(self, x):
    b, c, h, w = x.shape
    q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
    return self.project_out((attn @ v).reshape(b, c, h, w))


class TransformerBlock(nn.Module):
  def __init__(self, dim, heads, factor, bias, kind):
    super().__init__()
    self.norm1 = LayerNorm(dim, kind)
    self.attn = Attention(dim, heads, bias)
    self.norm2 = LayerNorm(dim, kind)
    self.ffn = FeedForward(dim, factor, bias)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
  def __init__(self, cin, dim):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, 3, padding=1, bias=False)

  def forward(self, x):
    return self.proj(x)


class Downsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.body = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

  def forward(self, x):
    return self.body(x)


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.body = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.PixelShuffle(2))

  def forward(self, x):
    return self.body(x)


def _seq(n, dim, heads, factor, bias, kind):
  return nn.Sequential(*[TransformerBlock(dim, heads, factor, bias, kind) for _ in range(n)])


class _Encoder(nn.Module):
  def _build_encoder(self, cin, dim, nb, heads, factor, bias, kind):
    self.patch_embed = OverlapPatchEmbed(cin, dim)
    self.encoder_level1 = _seq(nb[0], dim, heads[0], factor, bias, kind)
    self.down1_2 = Downsample(dim)
    self.encoder_level2 = _seq(nb[1], 2 * dim, heads[1], factor, bias, kind)
    self.down2_3 = Downsample(2 * dim)
    self.encoder_level3 = _seq(nb[2], 4 * dim, heads[2], factor, bias, kind)
    self.down3_4 = Downsample(4 * dim)
    self.latent = _seq(nb[3], 8 * dim, heads[3], factor, bias, kind)

  def _encode(self, x):
    e0 = self.patch_embed(x)
    e1 = self.encoder_level1(e0)
    e2 = self.encoder_level2(self.down1_2(e1))
    e3 = self.encoder_level3(self.down2_3(e2))
    return e0, e1, e2, e3, self.latent(self.down3_4(e3))


class TorchRestormer(_Encoder):
  """swz30/Restormer `Restormer` (NCHW; sides must be multiples of 8, as in the official code)."""

  def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
               num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
               bias=False, LayerNorm_type="WithBias", dual_pixel_task=False):  # noqa: N803
    super().__init__()
    f, k, nb = ffn_expansion_factor, LayerNorm_type, num_blocks
    self._build_encoder(inp_channels, dim, nb, heads, f, bias, k)
    self.up4_3 = Upsample(8 * dim)
    self.reduce_chan_level3 = nn.Conv2d(8 * dim, 4 * dim, 1, bias=bias)
    self.decoder_level3 = _seq(nb[2], 4 * dim, heads[2], f, bias, k)
    self.up3_2 = Upsample(4 * dim)
    self.reduce_chan_level2 = nn.Conv2d(4 * dim, 2 * dim, 1, bias=bias)
    self.decoder_level2 = _seq(nb[1], 2 * dim, heads[1], f, bias, k)
    self.up2_1 = Upsample(2 * dim)
    self.decoder_level1 = _seq(nb[0], 2 * dim, heads[0], f, bias, k)
    self.refinement = _seq(num_refinement_blocks, 2 * dim, heads[0], f, bias, k)
    self.dual_pixel_task = dual_pixel_task
    if dual_pixel_task:
      self.skip_conv = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
    self.output = nn.Conv2d(2 * dim, out_channels, 3, padding=1, bias=bias)

  def forward(self, inp):
    e0, e1, e2, e3, lat = self._encode(inp)
    d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1)))
    d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1)))
    d1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(d2), e1], 1)))
    if self.dual_pixel_task:
      return self.output(d1 + self.skip_conv(e0))
    return self.output(d1) + inp


class PromptGenBlock(nn.Module):
  def __init__(self, prompt_dim, prompt_len, prompt_size, lin_dim):
    super().__init__()
    self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size,
                                                prompt_size))
    self.linear_layer = nn.Linear(lin_dim, prompt_len)
    self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

  def forward(self, x):
    b, _, h, w = x.shape
    weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)
    prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)
    return self.conv3x3(F.interpolate(prompt, (h, w), mode="bilinear"))


def official_promptir_widths(dim, prompt_dims):
  """Input widths of noise_level3/2/1 and reduce_chan_level3 written the released code's way
  (4·dim + 512, 2·dim + 224, 2·dim + 64, 2·dim + 192) and our way; equal at dim 48, default
  prompts."""
  p1, p2, p3 = prompt_dims
  return ((4 * dim + 512, 2 * dim + 224, 2 * dim + 64, 2 * dim + 192),
          (8 * dim + p3, 4 * dim + p2, 2 * dim + p1, 6 * dim))


class TorchPromptIR(_Encoder):
  """va1shn9v/PromptIR `PromptIR(decoder=True)` with dim-derived widths (see module docstring)."""

  def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
               num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66,
               bias=False, LayerNorm_type="WithBias", prompt_dims=(64, 128, 320),  # noqa: N803
               prompt_sizes=(64, 32, 16), prompt_len=5):
    super().__init__()
    f, k, nb = ffn_expansion_factor, LayerNorm_type, num_blocks
    p1, p2, p3 = prompt_dims
    n3, n2, n1, r3 = official_promptir_widths(dim, prompt_dims)[1]
    self._build_encoder(inp_channels, dim, nb, heads, f, bias, k)
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
    self.noise_level3 = TransformerBlock(n3, heads[2], f, bias, k)
    self.reduce_noise_level3 = nn.Conv2d(n3, 4 * dim, 1, bias=bias)
    self.decoder_level3 = _seq(nb[2], 4 * dim, heads[2], f, bias, k)
    self.up3_2 = Upsample(4 * dim)
    self.reduce_chan_level2 = nn.Conv2d(4 * dim, 2 * dim, 1, bias=bias)
    self.noise_level2 = TransformerBlock(n2, heads[2], f, bias, k)
    self.reduce_noise_level2 = nn.Conv2d(n2, 4 * dim, 1, bias=bias)
    self.decoder_level2 = _seq(nb[1], 2 * dim, heads[1], f, bias, k)
    self.up2_1 = Upsample(2 * dim)
    self.noise_level1 = TransformerBlock(n1, heads[2], f, bias, k)
    self.reduce_noise_level1 = nn.Conv2d(n1, 2 * dim, 1, bias=bias)
    self.decoder_level1 = _seq(nb[0], 2 * dim, heads[0], f, bias, k)
    self.refinement = _seq(num_refinement_blocks, 2 * dim, heads[0], f, bias, k)
    self.output = nn.Conv2d(2 * dim, out_channels, 3, padding=1, bias=bias)

  def forward(self, inp):
    _, e1, e2, e3, lat = self._encode(inp)
    lat = self.reduce_noise_level3(self.noise_level3(torch.cat([lat, self.prompt3(lat)], 1)))
    d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(lat), e3], 1)))
    d3 = self.reduce_noise_level2(self.noise_level2(torch.cat([d3, self.prompt2(d3)], 1)))
    d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], 1)))
    d2 = self.reduce_noise_level1(self.noise_level1(torch.cat([d2, self.prompt1(d2)], 1)))
    d1 = self.refinement(self.decoder_level1(torch.cat([self.up2_1(d2), e1], 1)))
    return self.output(d1) + inp


def perturb_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
  """Moves the one/zero-initialised parameters off their init values (norm weights and biases,
  temperatures, conv biases) so the parity test sees every tensor's role."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("temperature") or name.endswith(".bias"):
        p.add_(scale * torch.randn(p.shape, generator=g))
      if name.endswith("temperature"):  # a wider range than N(1, 0.04): sharper/flatter heads
        p.mul_(1 + torch.rand(p.shape, generator=g) * 2)
  return model

"""Tiled VAE encode/decode (uir_jax.models.sd.vae) against diffusers' `tiled_encode` /
`tiled_decode` on the same tiny random weights, and the memory the tiling saves.

The tiny VAE has 2 levels (f = 2) and `sample_size` 32: image tiles of 32 px, latent tiles of 16,
overlap 0.25 (strides 24 px / 12 latents, blends of 4 latents / 8 px). The images are chosen so
that there are several tile rows and columns with cut tiles at the border, so both blends, their
raster order (each tile blended with already-blended neighbours) and the crops are exercised.
Tolerance: max |ours - diffusers| <= 1e-5 of the output's scale (fp32, `highest` precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.torch

TOL = 1e-5
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=32)


def _nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t) -> np.ndarray:
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _close(ours, ref: np.ndarray, what: str):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = float(np.abs(ref).max())
  err = float(np.abs(ours - ref).max())
  assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL} x scale {scale:.3g}"


class Compiled:
  """One jitted program per (method, input shape), kept for the module's tests."""

  def __init__(self, vae):
    self.graphdef, self.state = nnx.split(vae)
    self.cache: dict = {}

  def get(self, method: str, shape: tuple[int, ...], **kw):
    key = (method, shape, tuple(sorted(kw.items())))
    if key not in self.cache:
      fn = jax.jit(lambda state, a: getattr(nnx.merge(self.graphdef, state), method)(a, **kw))
      self.cache[key] = fn.lower(self.state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    return self.cache[key]

  def __call__(self, method: str, x: np.ndarray, **kw):
    return self.get(method, x.shape, **kw)(self.state, jnp.asarray(x))


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  from uir_jax.convert.sd import load_vae

  torch.manual_seed(0)
  ref = TorchVAE(**VAE)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  ref.eval()
  path = tmp_path_factory.mktemp("tiled") / "vae"
  ref.save_pretrained(path)
  ours = load_vae(path)
  assert ours.config.sample_size == ref.tile_sample_min_size == 32
  assert ref.tile_latent_min_size == 16 and ref.tile_overlap_factor == 0.25
  return ref, ours, Compiled(ours)


def test_tiled_encode_matches_diffusers(vaes, rng):
  import torch

  ref, _, run = vaes
  # 3 tile rows (32/32/8 px) in one column (the 2-D raster order is the decode test's).
  x = rng.uniform(-1, 1, (2, 56, 24, 3)).astype(np.float32)
  with torch.no_grad():
    post = ref.tiled_encode(_nchw(x)).latent_dist
  mean, logvar = run("tiled_encode", x)
  _close(mean, _nhwc(post.mean), "tiled posterior mean")
  _close(logvar, _nhwc(post.logvar), "tiled posterior logvar")


def test_tiled_decode_matches_diffusers(vaes, rng):
  import torch

  ref, _, run = vaes
  z = rng.standard_normal((2, 60, 60, 4)).astype(np.float32)  # 5 x 5 tiles, the last cut to 12
  with torch.no_grad():
    want = _nhwc(ref.tiled_decode(_nchw(z)).sample)
  _close(run("tiled_decode", z), want, "tiled decode")


def test_one_tile_is_the_untiled_decode(vaes, rng, monkeypatch):
  # 44 px tiles = 22 latents, stride 16: 16 x 16 latents are one tile, no blend, nothing cropped.
  _, ours, run = vaes
  z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  _close(run("tiled_decode", z, tile_size=44), np.asarray(run("decode", z)), "one-tile decode")
  # decode/encode(tiled=True) tile only inputs larger than a tile (diffusers' enable_tiling).
  calls = []
  for name in ("tiled_decode", "tiled_encode"):
    monkeypatch.setattr(type(ours), name, lambda self, a, name=name, **kw: calls.append(name))
  jax.eval_shape(lambda a: ours.decode(a, tiled=True), jax.ShapeDtypeStruct((1, 16, 16, 4),
                                                                          jnp.float32))
  jax.eval_shape(lambda a: ours.encode(a, tiled=True), jax.ShapeDtypeStruct((1, 32, 32, 3),
                                                                          jnp.float32))
  assert calls == []
  ours.decode(jnp.zeros((1, 17, 8, 4)), tiled=True)
  ours.encode(jnp.zeros((1, 8, 34, 3)), tiled=True)
  assert calls == ["tiled_decode", "tiled_encode"]


def test_tiled_decode_memory_is_bounded_by_the_tile(vaes):
  # At 60 x 60 latents the untiled decoder's mid-block attention alone holds 2 x 3600² float32
  # scores (~100 MiB); the tiled program holds one 16² tile's activations (the loop body) plus
  # the stacked tile outputs (25 tiles of 32² px, 1.8 x the output).
  _, _, run = vaes
  tiled = run.get("tiled_decode", (2, 60, 60, 4)).memory_analysis()
  one_tile = run.get("decode", (2, 16, 16, 4)).memory_analysis()
  if tiled is None or one_tile is None:
    pytest.skip("this backend has no memory_analysis")
  bound = one_tile.temp_size_in_bytes + 2 * tiled.output_size_in_bytes
  assert tiled.temp_size_in_bytes <= bound, (tiled.temp_size_in_bytes, bound)

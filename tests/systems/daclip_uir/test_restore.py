"""Restoration glue: eps_fn from a denoiser, DA-CLIP conditioning, the Restorer end to end."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.diffusion.irsde import IRSDE
from uir_jax.models.unet import ConditionalUNet
from uir_jax.systems.daclip_uir import restorers as restore


def _tiny_unet(**kw):
  opts = dict(nf=16, ch_mult=(1, 2), context_dim=32, use_degra_context=True,
              use_image_context=True)
  opts.update(kw)
  return ConditionalUNet(**opts, rngs=nnx.Rngs(0))


def test_eps_fn_equals_direct_call():
  unet = _tiny_unet()
  x = jax.random.uniform(jax.random.key(0), (2, 20, 24, 3))
  mu = jax.random.uniform(jax.random.key(1), (2, 20, 24, 3))
  t = jnp.array([5, 80], jnp.int32)
  text = jax.random.normal(jax.random.key(2), (2, 32))
  image = jax.random.normal(jax.random.key(3), (2, 32))
  eps_fn, args = restore.make_eps_fn(unet, text_context=text, image_context=image)
  direct = unet(x, mu, t, text_context=text, image_context=image)
  np.testing.assert_allclose(eps_fn(x, mu, t, *args), direct, atol=1e-6)
  # One cached function per graph: repeated restorations reuse the compiled sampler.
  assert restore.make_eps_fn(unet, text_context=text, image_context=image)[0] is eps_fn


def test_restorer_runs_and_compiles_once():
  unet = _tiny_unet(use_degra_context=False, use_image_context=False, context_dim=0)
  restorer = restore.Restorer(unet, None, IRSDE(), num_steps=4)
  lq = jax.random.uniform(jax.random.key(0), (1, 18, 22, 3))
  sizes = []
  for seed in range(2):
    out = restorer(lq, jax.random.key(seed))
    sizes.append(restore.denoiser_eps_fn.cache_info().currsize)
  assert out.shape == lq.shape and float(out.min()) >= 0 and float(out.max()) <= 1
  assert sizes[0] == sizes[1]
  with pytest.raises(ValueError, match="RGB images"):
    restorer(lq[0], jax.random.key(0))
  with pytest.raises(ValueError, match="num_steps"):
    restore.Restorer(unet, None, IRSDE(), num_steps=0)


def test_restorer_with_daclip_conditioning():
  from uir_jax.models.clip import get_config
  from uir_jax.models.daclip import DaCLIP

  cfg = get_config("tiny")
  daclip = DaCLIP(cfg, rngs=nnx.Rngs(1))
  embed_dim = daclip.encode_text(jnp.zeros((1, 77), jnp.int32)).shape[-1]
  unet = _tiny_unet(context_dim=embed_dim)
  restorer = restore.Restorer(unet, daclip, IRSDE(), num_steps=2)
  lq = jax.random.uniform(jax.random.key(0), (2, 40, 36, 3))
  text, image = restorer.conditioning(lq)
  chex.assert_shape([text, image], (2, embed_dim))
  # The conditioning really reaches the denoiser: other embeddings give another output.
  eps_fn, args = restore.make_eps_fn(unet, text_context=text, image_context=image)
  t = jnp.array([50, 50], jnp.int32)
  a = eps_fn(lq, lq, t, *args)
  b = eps_fn(lq, lq, t, args[0], text + 1.0, image)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-6
  assert restorer(lq, jax.random.key(0)).shape == lq.shape


def test_to_uint8_rounds_and_clamps():
  x = np.array([[-0.1, 0.0, 0.5, 1.0, 1.2, 0.998]])
  np.testing.assert_array_equal(restore.to_uint8(x), [[0, 0, 128, 255, 255, 254]])


@pytest.mark.torch
def test_load_denoiser_tells_unet_and_nafnet_apart():
  torch_nafnet = pytest.importorskip("torch_nafnet")
  torch_unet = pytest.importorskip("torch_unet")
  from uir_jax.convert.common import ConversionError
  from uir_jax.models.nafnet import ConditionalNAFNet

  unet_sd = torch_unet.ConditionalUNet(nf=32, ch_mult=(1, 2), context_dim=16).state_dict()
  assert isinstance(restore.load_denoiser(unet_sd), ConditionalUNet)
  naf = torch_nafnet.TorchConditionalNAFNet(nf=8, enc_blk_nums=(1,), middle_blk_num=1,
                                            dec_blk_nums=(1,))
  assert isinstance(restore.load_denoiser(naf.state_dict()), ConditionalNAFNet)
  plain = torch_nafnet.TorchNAFNet(width=8, enc_blk_nums=(1,), middle_blk_num=1,
                                   dec_blk_nums=(1,))
  with pytest.raises(ConversionError, match="not an IR-SDE denoiser"):
    restore.load_denoiser(plain.state_dict())


# --- Tiling. --------------------------------------------------------------------------------------


def test_tile_starts_cover_the_image_with_the_overlap():
  assert restore.tile_starts(100, 32, 8) == [0, 24, 48, 68]
  assert restore.tile_starts(32, 32, 8) == [0] and restore.tile_starts(5, 32, 0) == [0]
  for size, tile, overlap in [(100, 32, 8), (257, 64, 0), (65, 64, 63), (1000, 512, 64)]:
    starts = restore.tile_starts(size, tile, overlap)
    covered = np.zeros(size, bool)
    for s in starts:
      covered[s:s + tile] = True
    assert covered.all() and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts[:-1], starts[1:], strict=True))
  for tile, overlap in [(0, 0), (16, 16), (16, -1)]:
    with pytest.raises(ValueError, match="tile_overlap"):
      restore.tile_starts(100, tile, overlap)


@pytest.mark.parametrize("overlap,tile_batch", [(5, 1), (0, 1), (7, 3)])
def test_tiled_eps_is_exact_for_a_pointwise_denoiser(overlap, tile_batch):
  # Any per-pixel function gives the same value in every tile covering a pixel, so the blend must
  # return it exactly: checks the crops, the placement and the weight normalisation.
  def eps(x, mu, t, scale):
    return jnp.sin(3.0 * x) * scale + mu * t[:, None, None, None] / 100.0

  x = jax.random.uniform(jax.random.key(0), (2, 37, 53, 3))
  mu = jax.random.uniform(jax.random.key(1), (2, 37, 53, 3))
  t = jnp.array([3, 90], jnp.int32)
  tiled = restore.tiled_eps_fn(eps, 16, overlap, tile_batch)
  assert restore.tiled_eps_fn(eps, 16, overlap, tile_batch) is tiled  # cached: one compilation
  direct = eps(x, mu, t, 0.7)
  np.testing.assert_allclose(jax.jit(tiled)(x, mu, t, 0.7), direct, atol=1e-6)
  np.testing.assert_allclose(tiled(x[:, :16, :9], mu[:, :16, :9], t, 0.7), direct[:, :16, :9],
                             atol=1e-6)  # fits one tile: eps_fn itself
  with pytest.raises(ValueError, match="tile_batch"):
    restore.tiled_eps_fn(eps, 16, 4, 0)


def test_tiled_eps_blends_a_local_denoiser_without_seams():
  # A 5x5 box filter (zero padded) sees wrong neighbours within 2 pixels of a tile's inner edges.
  # Everywhere else every covering tile is exact, so the blend is exact; at those pixels the
  # linear ramps give the wrong tile a small weight, so the error stays small (no seam).
  def eps(x, mu, t):
    del mu, t
    _, h, w, _ = x.shape
    p = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return sum(p[:, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 25.0

  x = jax.random.uniform(jax.random.key(0), (1, 64, 80, 3))
  t = jnp.array([10], jnp.int32)
  direct = eps(x, x, t)
  tiled = restore.tiled_eps_fn(eps, 32, 16)(x, x, t)
  err = np.abs(np.asarray(tiled - direct))[0].max(-1)
  near_inner_edge = np.zeros(err.shape, bool)
  for y in restore.tile_starts(64, 32, 16):
    for x0 in restore.tile_starts(80, 32, 16):
      box = np.zeros(err.shape, bool)
      box[y:y + 32, x0:x0 + 32] = True
      inner = box.copy()
      inner[y + 2 * (y > 0):y + 32 - 2 * (y + 32 < 64),
            x0 + 2 * (x0 > 0):x0 + 32 - 2 * (x0 + 32 < 80)] = False
      near_inner_edge |= inner
  assert 0 < near_inner_edge.mean() < 0.5
  assert err[~near_inner_edge].max() < 1e-6
  assert 1e-4 < err.max() < 0.05 * float(jnp.abs(direct).max())


def test_restorer_tiles_large_images_only():
  unet = _tiny_unet(use_degra_context=False, use_image_context=False, context_dim=0)
  lq = jax.random.uniform(jax.random.key(0), (1, 40, 56, 3))
  key = jax.random.key(3)
  whole = restore.Restorer(unet, None, IRSDE(), num_steps=2)(lq, key)
  one_tile = restore.Restorer(unet, None, IRSDE(), num_steps=2, tile=64)(lq, key)
  np.testing.assert_array_equal(one_tile, whole)  # the image fits: the untiled program
  tiled = restore.Restorer(unet, None, IRSDE(), num_steps=2, tile=24, tile_overlap=8)(lq, key)
  assert tiled.shape == lq.shape and bool(jnp.isfinite(tiled).all())
  assert float(jnp.abs(tiled - whole).mean()) < 0.01  # same model and noise: close (0.0013)
  batched = restore.Restorer(unet, None, IRSDE(), num_steps=2, tile=24, tile_overlap=8,
                             tile_batch=4)(lq, key)  # 4 of the 6 tiles per call (vmapped)
  np.testing.assert_allclose(batched, tiled, atol=1e-5)
  with pytest.raises(ValueError, match="tile_overlap"):
    restore.Restorer(unet, None, IRSDE(), tile=16, tile_overlap=16)


def test_tiling_bounds_the_denoiser_memory():
  unet = _tiny_unet(use_degra_context=False, use_image_context=False, context_dim=0)
  eps_fn, args = restore.make_eps_fn(unet)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)

  def temp_bytes(fn):
    compiled = jax.jit(fn).lower(x, x, t, *args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole = temp_bytes(eps_fn)
  tiled = temp_bytes(restore.tiled_eps_fn(eps_fn, 64, 16))
  assert tiled < whole / 4, (tiled, whole)


def test_pad_multiple_shares_compilations_across_sizes():
  from uir_jax.diffusion.loop import sample_loop as _sample_loop

  unet = _tiny_unet(use_degra_context=False, use_image_context=False, context_dim=0)
  restorer = restore.Restorer(unet, None, IRSDE(), num_steps=2, pad_multiple=16)
  key = jax.random.key(0)
  outs = []
  for i, (h, w) in enumerate([(20, 30), (25, 28), (17, 32)]):  # all pad to 32 x 32
    lq = jax.random.uniform(jax.random.fold_in(key, i), (1, h, w, 3))
    outs.append(restorer(lq, key))
    if i == 0:
      compiled = _sample_loop._cache_size()
  assert _sample_loop._cache_size() == compiled  # no new compilation for the other two sizes
  assert [o.shape[1:3] for o in outs] == [(20, 30), (25, 28), (17, 32)]
  # Already a multiple: the exact-size program and result.
  lq = jax.random.uniform(key, (1, 32, 16, 3))
  np.testing.assert_array_equal(
      restorer(lq, key), restore.Restorer(unet, None, IRSDE(), num_steps=2)(lq, key))
  with pytest.raises(ValueError, match="pad_multiple"):
    restore.Restorer(unet, None, IRSDE(), pad_multiple=0)

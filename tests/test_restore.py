"""Restoration glue: eps_fn from a denoiser, DA-CLIP conditioning, the Restorer end to end."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax import restore
from uir_jax.models.unet import ConditionalUNet
from uir_jax.sde import IRSDE


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

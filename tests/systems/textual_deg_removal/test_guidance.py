"""TextualDegRemoval's guided NAFNet: parity with our PyTorch reference of the official
`NAFNetRefFusion` (`tests/helpers/torch_tdr.py`, B6 fixed; B8 fixed or not), through the
converter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.systems.textual_deg_removal.convert import load_guided_nafnet
from uir_jax.systems.textual_deg_removal.guidance import geometry

TINY = dict(width=4, nf=4, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1), middle_blk_num=1,
            ext_n_blocks=(1, 1, 1, 1), reffusion_n_blocks=(1, 1, 1, 1),
            reffusion_n_blocks_middle=1)


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, lq, guidance):
  return nnx.merge(graphdef, state)(lq, guidance)


def _torch_model(fix_b8=True):
  torch_tdr = pytest.importorskip("torch_tdr")
  import torch
  import torch_nafnet

  torch.manual_seed(0)
  model = torch_nafnet.perturb_(torch_tdr.TorchNAFNetRefFusion(**TINY, fix_b8=fix_b8)).eval()
  # A discriminative matching encoder: with PyTorch's default init (positive-leaning ReLU
  # features and biases) all patches have cosine ~0.9999 and the top-1 choices are rounding-level
  # near-ties; zero-mean He-normal weights and no biases separate them by orders of magnitude
  # more than float32 rounding.
  with torch.no_grad():
    for name, p in model.masa_enc.named_parameters():
      if name.endswith("bias"):
        p.zero_()
      else:
        p.normal_(0, (2 / p[0].numel()) ** 0.5)
  return model


def _nchw(a):
  import torch

  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _check(lq_hw, ref_hw, seed):
  import torch

  tm = _torch_model()
  net = load_guided_nafnet({"params": tm.state_dict()})
  rng = np.random.default_rng(seed)
  lq = rng.uniform(size=(2, *lq_hw, 3)).astype(np.float32)
  ref = rng.uniform(size=(2, *ref_hw, 3)).astype(np.float32)
  with torch.no_grad():
    want = tm(_nchw(lq), _nchw(ref)).numpy().transpose(0, 2, 3, 1)
    other = tm(_nchw(lq), _nchw(ref[::-1].copy())).numpy().transpose(0, 2, 3, 1)
  assert np.abs(other - want).max() > 1e-3  # the guidance reaches the output
  got = np.asarray(_call(*nnx.split(net), jnp.asarray(lq), jnp.asarray(ref)))
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= 1e-5 * scale, f"max abs error {err:.3g} > 1e-5 x output scale {scale:.3g}"
  return tm, lq, ref


@pytest.mark.torch
def test_guided_nafnet_parity_square_photo_larger_guidance():
  # 256² photo: 2 x 2 blocks at /16; a 384² guidance: blocks of 21 x 21 cells in a 24² map.
  assert geometry((256, 256), (384, 384)) == geometry((256, 256), (384, 384)).__class__(
      py=2, px=2, k=8, d_y=19, d_x=19)
  _check((256, 256), (384, 384), seed=0)


@pytest.mark.torch
def test_guided_nafnet_non_square_photo_b8():
  """384 x 256 photo, 256² guidance: d_y = 7 != d_x = 13. The released indexing (B8) crashes;
  fixed, it equals ours."""
  import torch

  g = geometry((384, 256), (256, 256))
  assert (g.py, g.px, g.d_y, g.d_x) == (3, 2, 7, 13)
  _, lq, ref = _check((384, 256), (256, 256), seed=1)
  buggy = _torch_model(fix_b8=False)
  with pytest.raises((IndexError, RuntimeError)), torch.no_grad():
    buggy(_nchw(lq), _nchw(ref))


def test_any_photo_size_and_small_guidance_blocks_fit():
  """A 100 x 200 photo (one block row after padding to 128 x 256) and a 300 x 200 guidance: the
  code's guidance block (d_y = 37 cells + 2) would not fit in the 24-cell map and its indices
  would wrap around; ours shrinks it to fit and runs on any size."""
  from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet

  g = geometry((128, 256), (384, 256))
  assert (g.py, g.px, g.d_y, g.d_x) == (1, 2, 21, 13)
  net = GuidedNAFNet(**TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  lq = jnp.asarray(rng.uniform(size=(1, 100, 200, 3)), jnp.float32)
  out = _call(*nnx.split(net), lq, jnp.asarray(rng.uniform(size=(1, 300, 200, 3)), jnp.float32))
  assert out.shape == lq.shape and bool(jnp.all(jnp.isfinite(out)))
  assert geometry((128, 128), (128, 128)).d_y == 5  # the smallest guidance map (8 cells)


def test_dilations_wider_than_the_block_are_one_line_errors():
  """4-cell blocks (lr_block_size 4) hold dilated 3x3 queries up to dilation 2: dilation 3 used to
  end in a reshape TypeError deep in the search."""
  from uir_jax.systems.textual_deg_removal.guidance import _lq_blocks, coarse_search

  g = geometry((64, 64), (128, 128), lr_block_size=4)
  assert g.k == 4
  rng = np.random.default_rng(0)
  f5 = jnp.asarray(rng.normal(size=(1, 4, 4, 5)), jnp.float32)
  f5_ref = jnp.asarray(rng.normal(size=(1, 8, 8, 5)), jnp.float32)
  blocks = _lq_blocks(f5, g)
  assert coarse_search(blocks, f5_ref, g, (1, 2)).shape == (1, 1)
  with pytest.raises(ValueError, match=r"dilations \(1, 2, 3\) do not fit 4-cell blocks"):
    coarse_search(blocks, f5_ref, g, (1, 2, 3))

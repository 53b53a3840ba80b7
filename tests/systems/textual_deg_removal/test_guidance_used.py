"""The guidance reaches the training signal: in a tiny guided NAFNet trained with Adam, the fusion
blocks get gradients from the first step, the matching encoder none at step 0 (every fusion
block's scales β, γ — the paper's α — start at zero, so the guidance does not yet reach the output)
and nonzero ones once those scales have moved.

Not shown here (see the report of branch tdr-cli): that a GT-guided network beats an LQ-guided one
after a few hundred steps. On CPU-sized runs (32-64 px photos, widths 8) the matcher's top-1
choices at initialisation are near-ties (positive ReLU features: cosines ~0.96-0.99 for every
candidate), so matches are at chance level and neither run learns to use the guidance in the
steps a test can afford.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet

pytestmark = pytest.mark.slow

# lr_block_size 2: photos padded to 32 px, one block of 2 x 2 cells at /16; a 96 px guidance
# (6 x 6 cells) gives a 3 x 3 fine search.
TINY = dict(width=8, enc_blk_nums=(0, 0, 0, 0), dec_blk_nums=(0, 0, 0, 0), middle_blk_num=0,
            ext_n_blocks=(0, 0, 0, 0), reffusion_n_blocks=(1, 1, 1, 1),
            reffusion_n_blocks_middle=1, lr_block_size=2, dilations=(1,))


def _norms(grads) -> dict[str, float]:
  return {k: float(optax.global_norm(grads[k])) for k in ("masa_enc", "masa_blk_enc",
                                                           "masa_blk_middle")}


def _train(steps: int):
  net = GuidedNAFNet(**TINY, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(net)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  rng = np.random.default_rng(0)
  lq = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
  gt = jnp.clip(lq + 0.1, 0, 1)
  guide = jnp.asarray(rng.uniform(size=(2, 96, 96, 3)), jnp.float32)

  @jax.jit
  def step(params, opt):
    loss = lambda p: jnp.mean(jnp.abs(nnx.merge(graphdef, p)(lq, guide) - gt))
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, grads

  history = []
  for _ in range(steps):
    params, opt, grads = step(params, opt)
    history.append(_norms(grads))
  return history


def test_gradients_reach_the_fusion_blocks_then_the_matching_encoder():
  history = _train(4)
  assert history[0]["masa_blk_enc"] > 0 and history[0]["masa_blk_middle"] > 0
  assert history[0]["masa_enc"] == 0.0  # α (β, γ) is zero: the guidance does not reach the loss
  assert all(h["masa_enc"] > 1e-6 for h in history[1:])  # ... until the scales have moved
  assert all(h["masa_blk_enc"] > 1e-6 for h in history)

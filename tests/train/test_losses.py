"""Losses: numpy InfoNCE reference, shard_map == global (value and gradients), DA-CLIP sum."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from uir_jax import losses


def _features(rng, n, e=16):
  f = rng.normal(size=(n, e)).astype(np.float32)
  return f / np.linalg.norm(f, axis=1, keepdims=True)


def _numpy_clip_loss(img, txt, logit_scale):
  """Direct float64 InfoNCE, written independently of the JAX code."""
  s = math.exp(logit_scale)
  logits = s * img.astype(np.float64) @ txt.astype(np.float64).T

  def ce(z):  # cross-entropy with the diagonal as the target class, averaged over rows
    z = z - z.max(axis=1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))

  return (ce(logits) + ce(logits.T)) / 2


def test_clip_loss_matches_numpy(rng):
  img, txt = _features(rng, 12), _features(rng, 12)
  for scale in (0.0, math.log(1 / 0.07), math.log(100.0)):
    got = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale))
    np.testing.assert_allclose(float(got), _numpy_clip_loss(img, txt, scale), rtol=1e-5)
  # Matched pairs must score lower than shuffled ones, or the labels are wrong.
  matched = losses.clip_loss(jnp.asarray(img), jnp.asarray(img), 3.0)
  assert float(matched) < float(losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), 3.0))


def _sharded(fn, mesh):
  """Loss over global arrays computed per device inside shard_map on mesh axis 'data'."""
  return jax.shard_map(lambda a, b, s: fn(a, b, s, axis_name="data"), mesh=mesh,
                       in_specs=(P("data"), P("data"), P()), out_specs=P())


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
  return Mesh(np.array(jax.devices()), ("data",))


def test_shard_map_equals_global_value_and_grads(rng, mesh):
  img, txt = jnp.asarray(_features(rng, 32)), jnp.asarray(_features(rng, 32))
  scale = jnp.float32(math.log(1 / 0.07))
  global_fn = jax.value_and_grad(losses.clip_loss, argnums=(0, 1, 2))
  sharded_fn = jax.jit(jax.value_and_grad(_sharded(losses.clip_loss, mesh), argnums=(0, 1, 2)))
  (v_ref, g_ref), (v, g) = global_fn(img, txt, scale), sharded_fn(img, txt, scale)
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  np.testing.assert_allclose(float(v), _numpy_clip_loss(np.asarray(img), np.asarray(txt),
                                                        float(scale)), rtol=1e-5)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g_ref[2])) > 0 and float(jnp.abs(g_ref[0]).max()) > 0


def test_daclip_loss_is_sum_and_shards(rng, mesh):
  f = [jnp.asarray(_features(rng, 16)) for _ in range(4)]
  scale = jnp.float32(2.0)
  total, aux = losses.daclip_loss(*f, scale)
  np.testing.assert_allclose(float(aux["contrastive"]), _numpy_clip_loss(*map(np.asarray, f[:2]),
                                                                           2.0), rtol=1e-5)
  np.testing.assert_allclose(float(aux["degradation"]), _numpy_clip_loss(*map(np.asarray, f[2:]),
                                                                           2.0), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(aux["contrastive"] + aux["degradation"]),
                             rtol=1e-6)
  sharded = jax.jit(jax.shard_map(
      lambda a, b, c, d, s: losses.daclip_loss(a, b, c, d, s, axis_name="data")[0], mesh=mesh,
      in_specs=(P("data"),) * 4 + (P(),), out_specs=P()))
  np.testing.assert_allclose(float(sharded(*f, scale)), float(total), rtol=1e-6)


def test_embedding_l1_loss(rng):
  lq, hq = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
  n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(float(losses.embedding_l1_loss(lq, hq)),
                             np.mean(np.abs(n(lq) - n(hq))), rtol=1e-5)
  np.testing.assert_allclose(float(losses.embedding_l1_loss(lq, hq, normalize=False)),
                             np.mean(np.abs(lq - hq)), rtol=1e-6)
  assert float(losses.embedding_l1_loss(lq, 3.0 * lq)) < 1e-6  # scale-invariant when normalised
  g_hq = jax.grad(losses.embedding_l1_loss, argnums=1)(jnp.asarray(lq), jnp.asarray(hq))
  assert not np.any(np.asarray(g_hq))  # the frozen-CLIP target gets no gradient


def test_clamp_logit_scale():
  x = jnp.array([-1.0, 0.5, 4.0, 10.0])
  np.testing.assert_allclose(losses.clamp_logit_scale(x), [0.0, 0.5, 4.0, math.log(100.0)],
                             rtol=1e-6)


def test_matching_loss(rng):
  pred, target = rng.normal(size=(3, 4, 5, 3)), rng.normal(size=(3, 4, 5, 3))
  np.testing.assert_allclose(float(losses.matching_loss(pred, target)),
                             np.mean(np.abs(pred - target).mean(axis=(1, 2, 3))), rtol=1e-5)
  np.testing.assert_allclose(float(losses.matching_loss(pred, target, "l2")),
                             np.mean(((pred - target) ** 2).mean(axis=(1, 2, 3))), rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="kind"):
    losses.matching_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), kind="huber")
  with pytest.raises(ValueError, match="shapes differ"):
    losses.matching_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="equal shape"):
    losses.clip_loss(jnp.zeros((4, 8)), jnp.zeros((4, 6)), 1.0)
  with pytest.raises(ValueError, match="shapes differ"):
    losses.embedding_l1_loss(jnp.zeros((4, 8)), jnp.zeros((3, 8)))


def test_nafnet_regression_losses():
  from uir_jax.systems.daclip_uir.nafnet import regression_loss

  rng = np.random.default_rng(0)
  pred, gt = rng.uniform(0, 1, (2, 2, 4, 4, 3)).astype(np.float32)
  pred[1] = gt[1] + 0.01 * (pred[1] - gt[1])  # one bad and one good example
  d = pred.astype(np.float64) - gt
  mse, l1 = (d**2).reshape(2, -1).mean(1), np.abs(d).reshape(2, -1).mean(1)
  psnr_loss = 10 / np.log(10) * np.mean(np.log(mse + 1e-8))
  np.testing.assert_allclose(regression_loss(pred, gt, "l1"), l1.mean(), rtol=1e-6)
  np.testing.assert_allclose(regression_loss(pred, gt, "psnr"), psnr_loss, rtol=1e-6)

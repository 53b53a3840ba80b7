"""The contrastive loss over a batch's distinct texts (`losses.contrastive_directions(text_ids=)`,
`contrastive.distinct_texts`): an independent NumPy form, the exact log-count shift from the
reference's duplicated form, the floor it removes, sharded == global, and the trainer's wiring.

Derivation of the shift (identical texts have identical features, so a text c present n_c times
gives n_c equal columns of the image->text logits l_i):
  duplicated, image i of text g:  LSE_j l_ij - l_ig = LSE_c (l_ic + log n_c) - l_ig
  distinct:                       LSE_c l_ic - l_ig
  difference:                     log sum_c p_ic n_c,  p_i = softmax over the distinct texts,
so the duplicated term is the distinct cross-entropy of logits shifted by log n_c, plus log n_g:
it is >= log n_g, and on a separable batch (p_i one-hot on g) it stops there while the distinct
term goes to 0. text->image, text g's n_g identical rows with logits m over the images (P = its
images): duplicated mean over the rows  LSE m - mean_P m;  distinct row  LSE m - LSE_P m;
difference  log n_g + (LSE_P m - log n_g - mean_P m) >= log n_g, equal when the text's images
score alike (e.g. identical image features).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import daclip_vitb32
from uir_jax import losses
from uir_jax.systems.daclip_uir import daclip
from uir_jax.train import loop


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(z):
  m = z.max()
  return m + np.log(np.exp(z - m).sum())


def _numpy_distinct(img, txt, scale, ids):
  """Independent float64 form, written from the definition with Python loops."""
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  firsts = [j for j in range(len(ids)) if ids[j] not in list(ids[:j])]
  first_of = {ids[j]: k for k, j in enumerate(firsts)}
  i2t = []
  for i in range(len(ids)):
    z = np.asarray([scale * img[i] @ txt[j] for j in firsts])
    i2t.append(_lse(z) - z[first_of[ids[i]]])
  t2i = []
  for j in firsts:
    z = scale * img @ txt[j]
    t2i.append(_lse(z) - _lse(z[ids == ids[j]]))
  return float(np.mean(i2t)), float(np.mean(t2i))


def _directions(img, txt, log_scale, ids=None):
  out = losses.contrastive_directions(
      jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.float32(log_scale),
      text_ids=None if ids is None else jnp.asarray(ids, jnp.int32))
  return tuple(float(x) for x in out)


# A hand-made batch: texts 0..3 with counts 4, 2, 1, 1 in a scrambled order.
IDS = np.asarray([0, 1, 0, 2, 1, 0, 3, 0])


def _hand_made(seed=0, e=8):
  r = np.random.default_rng(seed)
  words = _unit(r.normal(size=(4, e)))
  return _unit(r.normal(size=(len(IDS), e))), words[IDS]  # random images, their texts' features


def test_distinct_texts_equal_an_independent_numpy_form():
  img, txt = _hand_made()
  for log_scale in (0.0, math.log(10.0), math.log(100.0)):
    got = _directions(img, txt, log_scale, IDS)
    want = _numpy_distinct(img, txt, math.exp(log_scale), IDS)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    total = float(losses.clip_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                                   log_scale, text_ids=jnp.asarray(IDS)))
    np.testing.assert_allclose(total, sum(want) / 2, rtol=1e-5)
  # All-distinct ids are the reference's one-hot InfoNCE.
  np.testing.assert_allclose(_directions(img, txt, 2.0, np.arange(len(IDS))),
                             _directions(img, txt, 2.0), rtol=1e-6)


def test_duplicated_form_is_the_distinct_one_shifted_by_the_log_counts():
  img, txt = _hand_made(1)
  s = 10.0
  dup, dist = _directions(img, txt, math.log(s), None), _directions(img, txt, math.log(s), IDS)
  # image -> text, any batch: difference = mean_i log sum_c p_ic n_c.
  words = txt[[0, 1, 3, 6]]  # texts 0, 1, 2, 3
  counts = np.bincount(IDS).astype(np.float64)
  logits = s * img.astype(np.float64) @ words.T
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  shift = float(np.mean(np.log(p @ counts)))
  assert shift > 0.1  # a visible shift, not rounding
  np.testing.assert_allclose(dup[0] - dist[0], shift, rtol=1e-5)
  # Equal counts and each text's images alike: both directions shift by exactly log n.
  r = np.random.default_rng(2)
  ids = np.tile(np.arange(3), 3)  # n = 3 each
  img, txt = _unit(r.normal(size=(3, 8)))[ids], _unit(r.normal(size=(3, 8)))[ids]
  dup, dist = _directions(img, txt, math.log(s), None), _directions(img, txt, math.log(s), ids)
  np.testing.assert_allclose(np.subtract(dup, dist), [math.log(3)] * 2, rtol=1e-5)


def test_distinct_texts_reach_zero_where_the_duplicated_form_stops_at_log_counts():
  # Separable: each image is its text's feature (orthonormal words), the largest temperature.
  words = np.eye(8)[:4]
  img = txt = words[IDS]
  log_scale = losses.LOGIT_SCALE_MAX
  dist = _directions(img, txt, log_scale, IDS)
  dup = _directions(img, txt, log_scale)
  assert max(dist) < 1e-6, dist
  counts = np.bincount(IDS)
  floor = float(np.mean(np.log(counts[IDS])))  # (4 log 4 + 2 log 2) / 8 = 0.866
  np.testing.assert_allclose(dup, [floor, floor], rtol=1e-5)
  # Gradients through the masked softmaxes stay finite.
  grads = jax.grad(lambda a, b: losses.clip_loss(a, b, 2.0, text_ids=jnp.asarray(IDS)),
                   argnums=(0, 1))(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
  return Mesh(np.array(jax.devices()), ("data",))


def test_distinct_texts_shard_map_equals_global_value_and_grads(mesh):
  r = np.random.default_rng(4)
  ids = jnp.asarray(r.integers(0, 5, size=32), jnp.int32)  # repeats within and across devices
  img = jnp.asarray(_unit(r.normal(size=(32, 16))), jnp.float32)
  txt = jnp.asarray(_unit(r.normal(size=(5, 16)))[np.asarray(ids)], jnp.float32)
  scale = jnp.float32(math.log(1 / 0.07))

  def loss(a, b, s, i, axis_name=None):
    return losses.clip_loss(a, b, s, text_ids=i, axis_name=axis_name)

  sharded = jax.shard_map(lambda a, b, s, i: loss(a, b, s, i, "data"), mesh=mesh,
                          in_specs=(P("data"), P("data"), P(), P("data")), out_specs=P())
  v_ref, g_ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(img, txt, scale, ids)
  v, g = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(img, txt, scale, ids)
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  np.testing.assert_allclose(float(v), sum(_numpy_distinct(np.asarray(img), np.asarray(txt),
                                                           float(jnp.exp(scale)),
                                                           np.asarray(ids))) / 2, rtol=1e-5)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g_ref[0]).max()) > 0 and float(jnp.abs(g_ref[2])) > 0


def test_trainer_option_changes_only_the_degradation_term():
  # `contrastive.distinct_texts` must reach the loss: a batch of 8 repeating three texts.
  parts = {}
  r = np.random.default_rng(0)
  host = {"clip_lq": r.normal(0, 1, (8, 32, 32, 3)).astype(np.float32),
          "caption": np.asarray([f"photo {i}".encode() for i in range(8)]),
          "degradation": np.asarray([("noisy", "hazy", "blurry")[i % 3].encode()
                                     for i in range(8)]),
          "index": np.arange(8)}
  for on in (False, True):
    config = daclip_vitb32.get_config("tiny")
    with config.unlocked():
      config.contrastive.distinct_texts = on
    stage = daclip.make_stage(config)
    graphdef, _ = loop.init_state_fn(stage)
    params, rest = stage.initial_state()
    batch = {k: v for k, v in stage.prepare(host).items() if k in stage.batch_keys}
    parts[on] = stage.loss_fn(nnx.merge(graphdef, params, rest), batch, None, None)[1]
  np.testing.assert_allclose(float(parts[True]["contrastive"]), float(parts[False]["contrastive"]),
                             rtol=1e-6)
  # Untrained features score the texts alike, so the shift is ~log E[n_c] = log(22/8) ~ 1.
  assert float(parts[False]["degradation"]) - float(parts[True]["degradation"]) > 0.5

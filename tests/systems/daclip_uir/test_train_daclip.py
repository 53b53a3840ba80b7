"""DA-CLIP controller trainer: sharded loss and gradients equal one device's (with the
distinct-texts degradation term), the frozen CLIP stays frozen, the exact no-op start, and a tiny
run learns the degradations (zero-shot accuracy on held-out photos well above chance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, daclip_vitb32
from uir_jax import losses, parallel
from uir_jax.systems.daclip_uir import daclip
from uir_jax.train import loop


def _tiny(**contrastive):
  config = daclip_vitb32.get_config("tiny")
  with config.unlocked():
    config.contrastive.update(contrastive)
  return config


def _batch(stage, n=16):
  r = np.random.default_rng(0)
  names = [name for name, _ in common.SYNTHETIC_TASKS]
  host = {"clip_lq": r.normal(0, 1, (n, 32, 32, 3)).astype(np.float32),
          "clip_gt": r.normal(0, 1, (n, 32, 32, 3)).astype(np.float32),
          "caption": np.asarray([f"a photo number {i % 5}".encode() for i in range(n)]),
          "degradation": np.asarray([names[i % 3].encode() for i in range(n)]),
          "index": np.arange(n)}
  return {k: v for k, v in stage.prepare(host).items() if k in stage.batch_keys}


def _initial(stage):
  graphdef, init = loop.init_state_fn(stage)
  state = jax.jit(init)()
  params, rest = stage.initial_state()
  return graphdef, dict(state, params=params, rest=rest)


@pytest.mark.slow  # gradients on two 8-device meshes
def test_sharded_contrastive_loss_and_gradients_equal_one_device():
  config = _tiny(distinct_texts=True, robust=True)
  with config.unlocked():
    config.data.clip_gt = True
  stage = daclip.make_stage(config)
  graphdef, state = _initial(stage)
  batch = _batch(stage)

  def value_and_grad(params, rest, batch):
    f = lambda p: stage.loss_fn(nnx.merge(graphdef, p, rest), batch, None, None)[0]
    return jax.value_and_grad(f)(params)

  want = jax.jit(value_and_grad)(state["params"], state["rest"], batch)
  for shape in [(8, 1), (2, 4)]:
    mesh = parallel.make_mesh(shape)
    sh = parallel.shardings_for(jax.eval_shape(lambda: state), mesh, 256)
    fn = jax.jit(value_and_grad, in_shardings=(sh["params"], sh["rest"],
                                               parallel.batch_sharding(mesh)))
    got = fn(parallel.place(state["params"], sh["params"]),
             parallel.place(state["rest"], sh["rest"]), parallel.host_to_global(batch, mesh))
    # fp32, reductions in another order: 1e-6 relative on the loss, and every gradient entry
    # within 1e-5 of the largest gradient (some leaves are ~0, pure rounding noise). A loss that
    # saw only one shard's negatives is off by O(1) of the gradient scale.
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want[1]))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
      assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 1e-5 * scale


@pytest.mark.slow  # compiles and runs DA-CLIP training steps
def test_frozen_clip_stays_frozen_and_the_exact_start_is_a_no_op():
  config = _tiny()
  with config.unlocked():
    config.clip.exact_noop_start = True
  stage = daclip.make_stage(config)
  graphdef, state = _initial(stage)
  batch = _batch(stage)
  model = nnx.merge(graphdef, state["params"], state["rest"])
  images = jnp.asarray(batch["clip_lq"])
  content, _ = model.encode_image(images, control=True)
  plain = model.encode_image(images, control=False)
  # Exactly: every injection is a zero matrix, so the frozen blocks add exact zeros. (The
  # reference's quirk is no exact no-op, though nearly one at the output: its first zero module
  # adds the same value to every channel of a token, which the final LayerNorm removes up to
  # ~1e-6; hence exact equality, which tells the two starts apart.)
  assert np.array_equal(np.asarray(content), np.asarray(plain))
  step = jax.jit(lambda s, b: loop.make_train_step(graphdef, stage, 0.0)(s, b, None,
                                                                         loop.step_key(0), None))
  before = jax.device_get(state)
  for _ in range(2):
    state, metrics = step(state, batch)
  after = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(after["rest"]), jax.tree.leaves(before["rest"]), strict=True):
    assert np.array_equal(a, b)  # the whole frozen CLIP, bit for bit
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(after["params"]),
                                                 jax.tree.leaves(before["params"]), strict=True)]
  assert max(moved) > 0  # the controller trained
  # logit_scale is clamped to [0, ln 100] after each update.
  big = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 10.0 if "logit_scale" in jax.tree_util.keystr(p) else x,
      after["params"])
  clamped = stage.post_update(big)
  assert float(clamped["logit_scale"][...]) == pytest.approx(float(losses.LOGIT_SCALE_MAX))


@pytest.mark.slow
def test_tiny_run_learns_the_degradations_of_held_out_photos(tmp_path):
  # Robust mode (DA-CLIP's extra term on the clean image's CLIP view), the reference's
  # degradation term (the run its bars were measured on; the earlier same-text option was a no-op).
  config = _tiny(robust=True)
  with config.unlocked():
    config.data.clip_gt = True
    config.data.eval_augment = True
    config.total_steps = 120
    config.batch_size = 32
    config.eval_batch = 96
    config.eval_every = 120
    config.checkpoint_every = 120
    config.log_every = 40
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 5
  workdir = str(tmp_path / "wd")
  # The accuracy after one step (the same run, stopped there and resumed: no second run).
  before = daclip.train_and_evaluate(_with(config, total_steps=1, eval_every=1), workdir)
  result = daclip.train_and_evaluate(config, workdir)
  assert result["step"] == 120
  chance = 1 / len(common.SYNTHETIC_TASKS)
  # Six degradations of two photos training never saw: well above chance after 120 steps.
  assert result["eval/degradation_accuracy"] >= 2.5 * chance, (before, result)
  assert result["eval/degradation_accuracy"] > before["eval/degradation_accuracy"] + 0.2


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.update(overrides)
  return config

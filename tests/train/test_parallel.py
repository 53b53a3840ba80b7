"""Sharded training equals single-device training; FSDP really shards; the sharding rules.

The step under test is the real one (`loop.make_train_step` of the IR-SDE stage, DA-CLIP
conditioned with a random tiny DA-CLIP, and of the NAFNet stage), run for three steps from the same
initial state on the same global batch against one device: the IR-SDE step on a (4, 2) data x
fsdp mesh and with pmap over 8 devices, the NAFNet step on (8, 1) and (1, 8).

Tolerance: the programs differ only in the order of floating-point reductions (the batch mean,
gradient all-reduces, FSDP's reduce-scatter). In fp32 the losses agree to ~1e-7 relative; the
parameters to ~1e-7 absolute after three AdamW steps of lr 2e-4 (the PSNR loss's 1/MSE gradients
round the most: measured up to 6e-7) (each step moves a weight by up to
lr, so a wrong gradient, a missing all-reduce or a per-device mean off by a factor moves weights by
~1e-4, four orders of magnitude above the tolerance). Measured worst cases are in the asserts'
messages when they fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import irsde_daclip_universal, nafnet_daclip
from uir_jax import parallel
from uir_jax.systems.daclip_uir import irsde, nafnet
from uir_jax.train import loop

STEPS = 3
PARAM_ATOL = 1e-6
LOSS_RTOL = 2e-6
OPT_RTOL = 1e-5


def _batch(n=8, size=32, clip=32):
  r = np.random.default_rng(0)
  gt = r.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
  lq = np.clip(gt + r.normal(0, 0.1, gt.shape), 0, 1).astype(np.float32)
  return {"lq": lq, "gt": gt, "index": np.arange(100, 100 + n, dtype=np.int32),
          "clip_lq": r.normal(0, 1, (n, clip, clip, 3)).astype(np.float32)}


def _setup(module, config_module):
  config = config_module.get_config("tiny")
  stage = module.make_stage(config)
  graphdef, init = loop.init_state_fn(stage)
  state0 = jax.device_get(jax.jit(init)())
  step = loop.make_train_step(graphdef, stage, config.ema_decay)
  return config, stage, state0, step


def _run_jit(stage, state0, step, batch, mesh_shape, min_size):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = parallel.make_mesh(mesh_shape, devices=devices)
  shardings = parallel.shardings_for(jax.eval_shape(lambda: state0), mesh, min_size)
  aux_sh = parallel.shardings_for(stage.aux, mesh, min_size) if stage.aux is not None else None
  state = parallel.place(state0, shardings)
  aux = parallel.place(stage.aux, aux_sh) if stage.aux is not None else None
  fn = parallel.make_step(step, "jit", mesh, shardings, aux_sh)
  losses = []
  for _ in range(STEPS):
    state, metrics = fn(state, parallel.host_to_global(batch, mesh), aux, loop.step_key(3))
    losses.append(float(metrics["loss"]))
  return state, losses


def _run_pmap(stage, state0, step, batch):
  mesh = parallel.make_mesh((-1, 1))
  fn = parallel.make_step(step, "pmap", mesh, None)
  state = parallel.replicate_local(state0)
  aux = parallel.replicate_local(stage.aux)
  losses = []
  for _ in range(STEPS):
    state, metrics = fn(state, parallel.split_local_batch(batch), aux, loop.step_key(3))
    losses.append(float(metrics["loss"][0]))
  return parallel.unreplicate_local(state), losses


def assert_leaves_close(tree, ref_tree, what, *, atol=None):
  """Every leaf of `tree` within `atol` of `ref_tree`'s, or (atol None: Adam's moments, which
  scale with the gradients, the PSNR loss's O(100)) within OPT_RTOL of the leaf's largest entry
  (+1e-12: a leaf of moments of ~0 gradients holds only rounding noise, ~1e-23 here)."""
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    tol = atol if atol is not None else OPT_RTOL * float(np.max(np.abs(b))) + 1e-12
    worst = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert worst <= tol, f"{what} {a.shape} differ by up to {worst:.3g} (> {tol:.3g})"


def _compare(reference, other, what):
  (ref_state, ref_losses), (state, losses) = reference, other
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, err_msg=f"{what}: loss")
  for name in ("params", "ema", "opt"):
    # Parameters are O(0.01-1): absolute; the moments relative.
    assert_leaves_close(state[name], ref_state[name], f"{what}: {name}",
                        atol=PARAM_ATOL if name != "opt" else None)
  assert int(state["step"]) == int(ref_state["step"]) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("module,config_module", [(irsde, irsde_daclip_universal),
                                                  (nafnet, nafnet_daclip)],
                         ids=["irsde_daclip", "nafnet_daclip"])
def test_sharded_and_pmap_steps_equal_one_device(module, config_module, ):
  assert jax.device_count() >= 8
  _, stage, state0, step = _setup(module, config_module)
  batch = _batch()
  min_size = 256  # small enough that the tiny models have FSDP-sharded weights
  single = _run_jit(stage, state0, step, batch, (1, 1), min_size)
  # The run must move the weights by much more than the tolerance, or the check means nothing.
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(single[0]["params"]),
                              jax.tree.leaves(state0["params"]), strict=True))
  assert moved > 100 * PARAM_ATOL
  # The spine is shared by both stages: the mixed mesh and pmap for the IR-SDE stage (the
  # costlier compile), the data-only and FSDP-only meshes for NAFNet.
  shapes = [(4, 2)] if module is irsde else [(8, 1), (1, 8)]
  for shape in shapes:
    sharded = _run_jit(stage, state0, step, batch, shape, min_size)
    _compare(single, sharded, f"mesh {shape}")
    if shape[1] > 1:  # under FSDP the large parameters really are sharded
      _assert_fsdp_sharded(sharded[0], min_size, shape[1])
  if module is irsde:
    _compare(single, _run_pmap(stage, state0, step, batch), "pmap")


def _assert_fsdp_sharded(state, min_size, fsdp):
  """Leaves of >= min_size elements with an axis divisible by `fsdp` are split `fsdp` ways (each
  device holds 1/fsdp); the others are replicated; Adam's moments follow their parameters."""
  big = small = 0
  for group in ("params", "ema", "opt"):
    for x in jax.tree.leaves(state[group]):
      if not x.ndim:
        continue
      shard = x.addressable_shards[0].data.shape
      if x.size >= min_size and any(n % fsdp == 0 for n in x.shape):
        big += 1
        assert "fsdp" in tuple(x.sharding.spec), (group, x.shape, x.sharding.spec)
        assert int(np.prod(shard)) * fsdp == x.size, (group, x.shape, shard)
      else:
        small += 1
        assert x.sharding.is_fully_replicated, (group, x.shape, x.sharding.spec)
  assert big >= 8 and small >= 8, (big, small)


def test_create_sharded_state_builds_each_leaf_with_its_sharding():
  mesh = parallel.make_mesh((1, 8))
  state, shardings = parallel.create_sharded_state(
      lambda: {"w": jnp.ones((64, 16)), "b": jnp.zeros((16,)), "s": jnp.zeros((), jnp.int32)},
      mesh, min_size=512)
  assert state["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert state["w"].addressable_shards[0].data.shape == (8, 16)
  assert state["b"].sharding.is_fully_replicated and state["s"].sharding.is_fully_replicated
  assert shardings["w"] == state["w"].sharding


def test_sharding_rules_and_mesh_shapes():
  P = jax.sharding.PartitionSpec
  assert parallel.fsdp_spec((3, 3, 64, 128), 4, 100) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((512, 64), 8, 100) == P("fsdp", None)  # the largest divisible axis
  assert parallel.fsdp_spec((30, 7), 4, 1) == P()  # nothing divisible
  assert parallel.fsdp_spec((64, 64), 4, 10_000) == P()  # below the size threshold
  assert parallel.fsdp_spec((64, 64), 1, 1) == P()  # no fsdp axis
  assert parallel.mesh_shape((-1, 1), 8) == (8, 1)
  assert parallel.mesh_shape((2, -1), 8) == (2, 4)
  for bad in [(3, -1), (-1, -1), (2, 2), (0, 8), (8,)]:
    with pytest.raises(ValueError):
      parallel.mesh_shape(bad, 8)
  mesh = parallel.make_mesh((4, 2))
  with pytest.raises(ValueError, match="divisible"):
    parallel.local_batch_size(12, mesh)
  with pytest.raises(ValueError, match="pmap"):
    parallel.make_step(lambda *a: a, "pmap", mesh, None)
  with pytest.raises(ValueError, match="strategy"):
    parallel.make_step(lambda *a: a, "pjit", mesh, None)

"""The "tdr" trainer: every tdr config's :tiny trains, saves and resumes on the spine; the
backbone and the guidance module get their own learning rates; the configs carry the paper's
settings."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.train.test_train_loop import _trains_saves_resumes
from uir_jax.systems.textual_deg_removal import train as tdr
from uir_jax.train import TRAINERS

CONFIGS = ["tdr_nafnet_gopro", "tdr_nafnet_ablation", "tdr_restormer_defocus",
           "tdr_promptir_allinone"]


def _config(name, variant="tiny"):
  return importlib.import_module(f"configs.{name}").get_config(variant)


def test_every_tdr_config_declares_its_fields_and_the_papers_settings():
  for name in CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    tiny, full = module.get_config("tiny"), module.get_config(None)
    assert tiny.trainer == full.trainer == "tdr" and "tdr" in TRAINERS, name
    assert f"uir-jax train --config configs/{name}.py" in module.__doc__, name
    assert full.data.keys() == tiny.data.keys() and full.loss == "l1", name
    assert full.data.guidance_root and not full.data.synthetic_guidance, name
    assert tiny.data.synthetic_guidance and not tiny.data.guidance_root, name
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
  # Paper suppl.: separate initial rates of the backbone and the guidance module.
  rates = {n: (_config(n, None).optimizer.lr, _config(n, None).optimizer.guidance_lr)
           for n in CONFIGS}
  assert rates == {"tdr_nafnet_gopro": (1e-4, 5e-5), "tdr_nafnet_ablation": (1e-4, 5e-5),
                   "tdr_restormer_defocus": (3e-4, 1e-4), "tdr_promptir_allinone": (2e-4, 1e-4)}
  gopro, ablation = _config("tdr_nafnet_gopro", None), _config("tdr_nafnet_ablation", None)
  assert (gopro.model.width, gopro.data.patch_size, gopro.batch_size) == (64, 256, 16)
  assert (ablation.model.width, ablation.total_steps) == (32, 30_000)
  allinone = _config("tdr_promptir_allinone", None)
  assert (allinone.data.patch_size, allinone.batch_size) == (128, 48)


def test_missing_guidance_settings_are_one_line_errors():
  config = _config("tdr_nafnet_gopro")
  with config.unlocked():
    config.data.synthetic_guidance = 0
  with pytest.raises(ValueError, match="needs guidance"):
    tdr.make_stage(config)
  with config.unlocked():
    config.data.synthetic_guidance, config.loss = 64, "l2"
  with pytest.raises(ValueError, match="loss is L1"):
    tdr.make_stage(config)


def test_backbone_and_guidance_module_get_their_own_learning_rates():
  """The guidance module is every parameter under `masa_*`; one AdamW step moves each parameter
  by its group's rate (Adam's first step is lr · sign(g) for |g| >> eps), and a group at rate 0
  stays bit-identical."""
  config = _config("tdr_nafnet_gopro")
  model = nnx.eval_shape(lambda: tdr.build_model(config, nnx.Rngs(0)))
  abstract = nnx.state(model, nnx.Param)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  guided = [p.startswith(("['masa_enc']", "['masa_blk_enc']", "['masa_blk_middle']"))
            for p in paths]
  assert any(guided) and not all(guided)
  assert jax.tree.leaves(tdr.param_groups(abstract)) == [
      "guidance" if g else "backbone" for g in guided]
  # The update on a small tree of the same kind (eager optax over the whole tree takes a minute).
  rng = np.random.default_rng(0)
  params = {"masa_blk_enc": {"0": {"beta": jnp.zeros((3, 4))}}, "masa_enc": {"w": jnp.ones(5)},
            "encoders": {"0": {"beta": jnp.zeros((3, 4))}}, "intro": {"kernel": jnp.ones(7)}}
  grads = jax.tree.map(lambda x: jnp.asarray(np.where(rng.random(x.shape) < 0.5, -1.0, 1.0)
                                             * (1.0 + rng.random(x.shape)), jnp.float32), params)
  for lr, guidance_lr in ((0.0, 1e-3), (1e-3, 0.0), (2e-4, 1e-4)):
    with config.unlocked():
      config.optimizer.lr, config.optimizer.guidance_lr = lr, guidance_lr
      config.optimizer.weight_decay = 0.0
    tx, schedule = tdr.make_optimizer(config.optimizer, config.total_steps)
    assert float(schedule(0)) == pytest.approx(lr)  # the logged rate is the backbone's
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for group, rate in (("masa_blk_enc", guidance_lr), ("masa_enc", guidance_lr),
                        ("encoders", lr), ("intro", lr)):
      before, after = jax.tree.leaves(params[group])[0], jax.tree.leaves(new[group])[0]
      if rate == 0.0:
        np.testing.assert_array_equal(after, before, err_msg=f"{group} moved at rate 0")
      else:
        step = np.asarray(jax.tree.leaves(updates[group])[0])
        np.testing.assert_allclose(np.abs(step), rate, rtol=1e-4, err_msg=group)


# Issue 24's must-show: every tdr config's :tiny trains, saves and resumes (~2 minutes each on one
# core, mostly compilation).
@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_config_trains_saves_and_resumes(name, tmp_path, one_device):
  result = _trains_saves_resumes(_config(name), str(tmp_path / "wd"))
  assert np.isfinite(result["eval/psnr_lq"])

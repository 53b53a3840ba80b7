"""Checkpointer: round trip, keep-latest-N, interval policy, atomic restore target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.checkpoint import Checkpointer, abstract_like


def _state(step):
  return {"params": {"w": jnp.full((3, 4), float(step)), "b": jnp.arange(4.0) + step},
          "step": jnp.asarray(step, jnp.int32)}


def test_save_restore_roundtrip_and_keep_latest(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every=2, keep=2, total_steps=7)
  saved = [s for s in range(1, 8) if ckpt.maybe_save(s, _state(s))]
  ckpt.wait()
  assert saved == [2, 4, 6, 7]  # every 2 steps, plus the last step
  assert ckpt.all_steps() == [6, 7]  # keep-latest-2
  restored = ckpt.restore(abstract_like(_state(0)))
  jax.tree.map(np.testing.assert_array_equal, restored, _state(7))
  older = ckpt.restore(abstract_like(_state(0)), step=6)
  assert int(older["step"]) == 6 and float(older["params"]["w"][0, 0]) == 6.0
  ckpt.close()
  # A new manager on the same workdir (a resumed run) sees the same checkpoints.
  again = Checkpointer(str(tmp_path), save_every=2, keep=2)
  assert again.latest_step == 7
  again.close()


def test_restore_without_checkpoint_and_bad_arguments(tmp_path):
  ckpt = Checkpointer(str(tmp_path), save_every=5)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt.restore(abstract_like(_state(0)))
  ckpt.close()
  with pytest.raises(ValueError, match="save_every"):
    Checkpointer(str(tmp_path), save_every=0)
  with pytest.raises(ValueError, match="keep"):
    Checkpointer(str(tmp_path), save_every=1, keep=0)

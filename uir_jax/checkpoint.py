"""Checkpoints: the only module that imports orbax.

Train-state checkpoints live in `<workdir>/checkpoints/<step>` and are written asynchronously
and atomically (orbax writes to a temporary directory and renames it on commit), so an interrupted
save never replaces the last good checkpoint. Saves happen every `save_every` steps, at the last
step, and when JAX's preemption notice arrives (`reached_preemption`); the trainer then exits.

Trainers restore in this order: the workdir's own latest checkpoint (resume), else converted
weights named by the config (parameters only), else the freshly initialised state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Keep-latest-N, async, preemption-aware train-state checkpoints in `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3,
               total_steps: int | None = None, async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # (Not ContinuousCheckpointingPolicy for save_every=1: it skips a step while the previous
    # save is still being written, so "every step" would silently mean "when idle".)
    policies = [ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
    if total_steps:
      policies.append(ocp.checkpoint_managers.SpecificStepsPolicy(steps=[total_steps]))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save interrupted by a crash or preemption
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves if the policy says so (interval, last step, preemption); returns whether it saved."""
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def should_save(self, step: int) -> bool:
    """Whether `maybe_save(step, ...)` would save (interval, last step, preemption)."""
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True once a preemption notice arrived (all hosts agree); save, `wait()`, then exit."""
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores `step` (default: latest) into the structure/shardings of `abstract_state`."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `state`, as a restore target."""
  def spec(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(spec, state)


def _plain_variables(tree: Any) -> Any:
  """An nnx.State as orbax stores it ({..., name: {"value": array}}) -> {..., name: array}."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return tree["value"]
    return {k: _plain_variables(v) for k, v in tree.items()}
  return tree


def read_training_run(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """(config, state) of a training run of ours: `config.json` as a dict, and the checkpoint
  `step` (default: the latest) as plain nested dicts of arrays ({"params", "rest", "ema", ...}),
  read without knowing the model. For loading trained models (e.g. a DA-CLIP run's controller)."""
  import json

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: not a training run (no config.json)")
  with open(path) as f:
    config = json.load(f)
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint yet")
    state = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  # Host copies: restored without a target, each array keeps the sharding it was saved with (e.g.
  # replicated over a training mesh), which would clash with single-device arrays at inference.
  return config, _plain_variables(jax.device_get(state))


def model_from_run(abstract: Any, state: dict, trainable: Any = None) -> Any:
  """The model of a training run: `abstract` (an `nnx.eval_shape`d module) with its `trainable`
  variables (default: nnx.Param) from the run's EMA (`state["ema"]`) and all others from
  `state["rest"]`, `state` as `read_training_run` returns it. ValueError (one line) when the
  checkpoint does not fit the module."""
  from flax import nnx

  graphdef, params, rest = nnx.split(abstract, nnx.Param if trainable is None else trainable, ...)
  on_device = lambda tree: jax.tree.map(jax.numpy.asarray, tree)  # the default device
  try:
    nnx.replace_by_pure_dict(params, on_device(state["ema"]))
    if jax.tree.leaves(rest):
      nnx.replace_by_pure_dict(rest, on_device(state["rest"]))
  except (KeyError, ValueError) as e:
    raise ValueError(f"checkpoint does not match its config: {str(e).splitlines()[0][:300]}") from e
  return nnx.merge(graphdef, params, rest)


def save_tree(directory: str, tree: Any) -> None:
  """Writes a pytree of arrays as one standalone orbax checkpoint at `directory` (which must not
  exist yet), synchronously: for exports, not for train states (those use `Checkpointer`)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(directory), tree)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def load_tree(directory: str) -> Any:
  """The pytree `save_tree` wrote at `directory`, as numpy-compatible arrays, without a target
  structure (it is read from the checkpoint's metadata)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(directory))
  finally:
    checkpointer.close()

"""Parallelism for every trainer: the mesh, sharding rules, sharded state, global batches, the
multi-process start, and the two step strategies (jit over a mesh, or pmap).

    initialize_distributed(config.distributed)            # no-op on one process
    mesh = make_mesh(config.mesh)                          # axes ('data', 'fsdp'), e.g. (-1, 1)
    state, shardings = create_sharded_state(init_fn, mesh, min_size=config.fsdp_min_size)
    batch = host_to_global(numpy_batch, mesh)              # this host's rows -> one global array

Mesh: two axes. `data` is pure data parallelism; `fsdp` also splits the batch, and in addition
shards every parameter (and its optimizer state and EMA) of at least `min_size` elements along its
largest axis divisible by the `fsdp` size (ZeRO-3 / FSDP: XLA all-gathers a weight where a layer
needs it and reduce-scatters its gradient). Smaller arrays are replicated: sharding a bias costs
more in collectives than it saves in memory. The batch is split over both axes.

The state is created already sharded: `jax.eval_shape` gives its structure without allocating it,
the rules give each leaf its sharding, and the init function is jitted with those out_shardings,
so a state larger than one device's memory never exists whole anywhere.

Strategies: "jit" (the default: one program over the global mesh, any mesh shape) and "pmap"
(pure data parallelism over the local devices, state replicated, gradients averaged with
`lax.pmean`). Both run the very same loss function; `make_step` builds either.

Multi-process: `initialize_distributed` calls `jax.distributed.initialize()` when the config names
a coordinator, or when the environment is that of a multi-process launch (a TPU pod slice, SLURM
with more than one task, or the `JAX_COORDINATOR_ADDRESS` variables); every process then builds the
same global mesh and feeds only its own rows of each batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over both mesh axes
STRATEGIES = ("jit", "pmap")


# ---- Multi-process start ----------------------------------------------------------------------

def _launched_as_several_processes() -> bool:
  """Whether the environment is that of a multi-process launch jax.distributed can read."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_STEP_NODELIST"):
    return True
  # A TPU pod slice: several workers listed by the TPU runtime.
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize_distributed(cfg: Any = None) -> bool:
  """Starts JAX's multi-process runtime when needed; returns whether it did.

  `cfg` (the config's `distributed` block) may name `coordinator_address`, `num_processes` and
  `process_id` explicitly (e.g. two processes on one machine); otherwise the launcher's environment
  (TPU pod, SLURM, `JAX_COORDINATOR_ADDRESS`) decides, and a plain single-process run does nothing.
  Must run before anything touches a JAX device.
  """
  address = getattr(cfg, "coordinator_address", "") if cfg is not None else ""
  if jax.distributed.is_initialized():
    return True
  if address:
    num, pid = int(cfg.num_processes), int(cfg.process_id)
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"distributed: need num_processes >= 1 and 0 <= process_id < "
                       f"num_processes, got {num} and {pid}")
    local = list(cfg.local_device_ids) if getattr(cfg, "local_device_ids", None) else None
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                               local_device_ids=local)
  elif _launched_as_several_processes():
    jax.distributed.initialize()
  else:
    return False
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# ---- Mesh and sharding rules ------------------------------------------------------------------

def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from a config shape with at most one -1 (= the remaining devices)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2:
    raise ValueError(f"mesh must have two sizes (data, fsdp), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive, with at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f"mesh {shape} does not divide the {num_devices} devices")
  shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {shape} uses {math.prod(shape)} devices, but there are "
                     f"{num_devices}")
  return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """The ('data', 'fsdp') mesh over all (global) devices, or `devices`.

  Auto axis types: XLA's sharding propagation places the activations (the models reshape freely,
  which explicit-sharding mode would make every layer annotate).
  """
  devices = list(jax.devices() if devices is None else devices)
  dims = mesh_shape(shape, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(dims, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(dims), AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """PartitionSpec of one array: its largest axis divisible by `fsdp_size` split along 'fsdp' if
  it has at least `min_size` elements, else replicated (ties: the last such axis)."""
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for axis, n in enumerate(shape):
    if n % fsdp_size == 0 and (best is None or n >= shape[best]):
      best = axis
  if best is None:
    return P()
  return P(*[("fsdp" if a == best else None) for a in range(len(shape))])


def shardings_for(tree: Any, mesh: Mesh, min_size: int) -> Any:
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def create_sharded_state(init_fn: Callable[[], Any], mesh: Mesh, *, min_size: int
                         ) -> tuple[Any, Any]:
  """(state, shardings): `init_fn()` run under jit with each leaf placed by the sharding rules.

  `init_fn` takes no arguments (build the model from a seed inside it); its output is never
  materialised unsharded.
  """
  abstract = jax.eval_shape(init_fn)
  shardings = shardings_for(abstract, mesh, min_size)
  lowered = jax.jit(init_fn, out_shardings=shardings).lower()
  # XLA:CPU spends seconds optimising an init of hundreds of independent random fills that runs
  # once; unoptimised it compiles ~2x faster to the same bits (integer RNG, one rounding each).
  options = ({"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu"
             else None)
  return lowered.compile(compiler_options=options)(), shardings


def place(tree: Any, shardings: Any) -> Any:
  """Host or device arrays -> arrays with `shardings` (same tree structure)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# ---- Batches -----------------------------------------------------------------------------------

def local_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Rows of each global batch this process feeds; checks the batch divides the devices."""
  devices, hosts = mesh.size, jax.process_count()
  if global_batch % devices:
    raise ValueError(f"batch_size={global_batch} must be divisible by the {devices} devices of "
                     f"the mesh {dict(mesh.shape)}")
  return global_batch // hosts


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split along the batch axis.

  Each process passes its own contiguous block of rows (process p holds rows
  [p * B/P, (p + 1) * B/P) of the global batch: the input pipeline's host sharding).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# ---- Step strategies ---------------------------------------------------------------------------

def make_step(step_fn: Callable[..., tuple[Any, Any]], strategy: str, mesh: Mesh,
              state_shardings: Any, aux_shardings: Any = None) -> Callable[..., tuple[Any, Any]]:
  """`step_fn(state, batch, aux, key, axis_name) -> (state, metrics)` as a compiled step.

  "jit": one program over the mesh, state donated, shardings as given; `axis_name` is None (the
  loss sees the global batch). "pmap": over the local devices with the state replicated on each
  and the batch split along its leading axis; `axis_name` is "batch" and the step averages
  gradients and metrics over it. Use `to_strategy` / `from_strategy` to move the state and
  batches between the global form and pmap's per-device form.
  """
  if strategy == "jit":
    return jax.jit(lambda s, b, a, k: step_fn(s, b, a, k, None),
                   in_shardings=(state_shardings, batch_sharding(mesh), aux_shardings,
                                 replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
  if strategy == "pmap":
    if mesh.shape["fsdp"] != 1:
      raise ValueError(f"the pmap strategy is pure data parallelism: it needs mesh fsdp = 1, got "
                       f"{dict(mesh.shape)}")
    return jax.pmap(lambda s, b, a, k: step_fn(s, b, a, k, "batch"), axis_name="batch",
                    in_axes=(0, 0, 0, None), donate_argnums=(0,))
  raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def replicate_local(tree: Any) -> Any:
  """A (global, fully replicated) tree -> pmap's stacked per-local-device form."""
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), P("batch"))

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

  return jax.tree.map(put, tree)


def unreplicate_local(tree: Any) -> Any:
  """pmap's per-device form -> one copy (device 0's)."""
  return jax.tree.map(lambda x: x[0], tree)


def split_local_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[B_local, ...] -> [local devices, B_local / devices, ...] for pmap."""
  n = jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"local batch {x.shape[0]} must be divisible by the {n} local devices")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return {k: split(v) for k, v in batch.items()}


def pmean_if(tree: Any, axis_name: str | None) -> Any:
  """`lax.pmean` over `axis_name` (pmap), or the tree itself (jit: already global)."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def is_fully_replicated(x: Any) -> bool:
  return bool(getattr(getattr(x, "sharding", None), "is_fully_replicated", True))


def describe_sharding(tree: Any) -> dict[str, int]:
  """{'sharded': n, 'replicated': n} leaf counts and bytes, for the start-up log."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
  sharded = [x for x in leaves if not is_fully_replicated(x)]
  nbytes = lambda xs: int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in xs))
  return {"sharded_arrays": len(sharded), "replicated_arrays": len(leaves) - len(sharded),
          "sharded_bytes": nbytes(sharded), "total_bytes": nbytes(leaves)}

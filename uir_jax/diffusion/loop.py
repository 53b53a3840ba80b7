"""The one sampling loop: a jitted `lax.scan` over the steps, generic over process, solver, model.

    x_0, path = sample_loop(solver, model_fn, x_T, key, ts, step_inputs, model_args, solver_args)

Per step i (noisiest first), with t = ts[i] broadcast to the batch [B]:

    out = model_fn(x, t, *model_args)                          # the network: ε̂, x̂_0 or v̂
    x, state = solver.step(key_i, x, state, out, t, step_inputs[i], *solver_args)

`solver` is any hashable object with `init(x_T) -> state` (what it carries between steps, e.g. the
previous outputs of a multistep method; any pytree) and `step` as above. It knows the process only
through `step_inputs` (per-step arrays, e.g. coefficients computed on the host from the process's
(α_t, σ_t) tables by `diffusion.solvers`) and `solver_args` (traced arrays shared by all steps,
e.g. IR-SDE's μ). `model_fn` is static too: pass the same function object (or an equal frozen
dataclass) to reuse the compilation, and pass large arrays (weights, conditioning) through
`model_args` so they are not baked into the program as constants.

One compilation per (solver, model_fn, shapes): the loop never re-traces per step or per call.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class Solver(Protocol):
  """What `sample_loop` needs of a solver (hashable: it is a static argument)."""

  def init(self, x: Array) -> Any:
    """The solver's carried state for a sampling run starting at x [B, ...]."""

  def step(self, key: Array, x: Array, state: Any, out: Array, t: Array, inputs: Any,
           *solver_args: Any) -> tuple[Array, Any]:
    """(x at the next point, state) from the model output `out` at x, timestep t [B]."""


@functools.partial(jax.jit, static_argnames=("solver", "model_fn", "return_path"))
def sample_loop(solver: Solver, model_fn: Any, x_T: Array, key: Array, ts: Array,
                step_inputs: Any, model_args: tuple = (), solver_args: tuple = (), *,
                return_path: bool = False) -> tuple[Array, Array | None]:
  """Runs the reverse process from x_T through the timesteps `ts`.

  Args:
    solver: the step rule (see the module docstring); static.
    model_fn: `model_fn(x, t, *model_args) -> output` with t [B] of ts's dtype; static.
    x_T: the initial state [B, ...] (cast to float32).
    key: PRNG key, split into one key per step.
    ts: [n] timesteps, one per network call.
    step_inputs: pytree of per-step arrays with leading dimension n (None leaves allowed).
    model_args, solver_args: traced arguments forwarded to every model call / step.
    return_path: also return the state after every step.

  Returns:
    (x after the last step [B, ...], path [n, B, ...] if `return_path` else None).
  """
  batch = x_T.shape[0]
  x = x_T.astype(jnp.float32)

  def body(carry, inputs):
    x, state = carry
    t, per_step, k = inputs
    tb = jnp.full((batch,), t, ts.dtype)
    out = model_fn(x, tb, *model_args).astype(x.dtype)
    x, state = solver.step(k, x, state, out, tb, per_step, *solver_args)
    return (x, state), (x if return_path else None)

  keys = jax.random.split(key, ts.shape[0])
  (x, _), path = jax.lax.scan(body, (x, solver.init(x)), (ts, step_inputs, keys))
  return x, path

"""Helpers shared by the model benchmarks: device name, JSON lines, timing, compiled memory.

The benchmark scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path.
"""

from __future__ import annotations

import json
import time

import jax

import uir_jax  # noqa: F401  - the package's XLA CPU options (uir_jax/xla_cpu.py), before any computation


def device_name() -> str:
  """"cpu", "gpu:NVIDIA H100 80GB HBM3", "tpu:TPU v5 lite", ..."""
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", "")
  return d.platform if kind in ("", d.platform) else f"{d.platform}:{kind}"


def emit(**kw) -> None:
  """One JSON line on stdout."""
  print(json.dumps(kw), flush=True)


def timeit(fn, repeats: int) -> float:
  """Seconds per call of an already compiled `fn`, after one warm-up call."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def memory(compiled) -> dict:
  """XLA memory_analysis of a compiled executable, in GiB (empty where the backend has none)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return dict(temp_gib=round(m.temp_size_in_bytes / 2**30, 3),
              argument_gib=round(m.argument_size_in_bytes / 2**30, 3),
              output_gib=round(m.output_size_in_bytes / 2**30, 3))


def time_adamw_step(loss_fn, params, key, repeats: int):
  """Compiles and times one AdamW training step on `loss_fn(params, key) -> scalar`.

  Returns (compile seconds, seconds per step, the compiled executable).
  """
  import optax

  tx = optax.adamw(2e-4, b1=0.9, b2=0.99)

  def train_step(p, opt, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  state = [params, tx.init(params)]
  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(state[0], state[1], key).compile()
  compile_s = time.perf_counter() - t0

  def run():
    state[0], state[1], loss = step(state[0], state[1], key)
    return loss

  return compile_s, timeit(run, repeats), step


def alternate(fns: dict, warmup: int, iters: int) -> dict:
  """Runs each callable in turn (so that load from other processes hits all alike), `warmup`
  untimed rounds then `iters` timed; returns {name: [seconds per call]}."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {k: [] for k in fns}
  for _ in range(iters):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return times

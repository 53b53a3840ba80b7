"""Our jitted CPU training step vs the PyTorch reference step, same weights and batch, one run.

One step = forward + L1 loss to a target + backward + Adam (lr 1e-4), float32, on both sides:

  * `nafnet`: megvii's NAFNet, the GoPro width-32 configuration (enc [1, 1, 1, 28], middle 1,
    dec [1, 1, 1, 1], LayerNorm2d), batch 8 x 64² (`NAFNet(inp)` vs target);
  * `unet`: IR-SDE's ConditionalUNet with the daclip-sde options (nf 64, ch_mult 1,2,4,8, context
    512, both DA-CLIP contexts), batch 4 x 64² (`unet(x_t, μ, t, text, image)` vs a noise target).

The PyTorch side is the test helpers' reference architecture (tests/torch_nafnet.py, megvii's
layout; tests/torch_unet.py, the reference ConditionalUNet) with random weights; ours holds the same
weights through the converters (`load_nafnet`, `load_unet`). The two steps are timed alternately
(torch, ours, torch, ours, ...) after warm-up so that load from other processes hits both alike;
we report medians and the spread (min, max) and the ratio torch_median / ours_median (> 1: ours is
faster).

  python benchmarks/train_vs_torch.py                       # both models, 2 warm-up + 7 timed
  python benchmarks/train_vs_torch.py --models nafnet --iters 3 --warmup 1
  python benchmarks/train_vs_torch.py --forward             # also forward-only timings
  python benchmarks/train_vs_torch.py --reference           # also ours with the original
                                                            # formulations (before/after)

Threads: XLA's CPU pool takes the CPUs the process may run on, so pin both sides with taskset;
`--threads` (torch) defaults to the same count. Single-threaded, on core 1:

  taskset -c 1 python benchmarks/train_vs_torch.py --threads 1

Prints JSON lines: name, device, shape, value, unit, threads (+ spreads, compile time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_util import alternate, device_name, emit
from flax import nnx

sys.modules.setdefault("triton", None)  # see tests/conftest.py: no triton probe on CPU
_TESTS = Path(__file__).resolve().parent.parent / "tests"
# The torch reference models live in tests/ (or tests/helpers/ after the reorganisation).
for _d in (_TESTS / "helpers", _TESTS):
  if (_d / "torch_nafnet.py").exists() and str(_d) not in sys.path:
    sys.path.insert(0, str(_d))

NAFNET_GOPRO32 = dict(width=32, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 28),
                      dec_blk_nums=(1, 1, 1, 1))
UNET_DACLIP_SDE = dict(nf=64, ch_mult=(1, 2, 4, 8), context_dim=512)
LR = 1e-4


def _torch_models(which: str):
  import torch
  import torch_nafnet
  import torch_unet

  torch.manual_seed(0)
  if which == "nafnet":
    tm = torch_nafnet.perturb_(torch_nafnet.TorchNAFNet(**NAFNET_GOPRO32), seed=0)
  else:
    tm = torch_unet.randomize_(torch_unet.ConditionalUNet(**UNET_DACLIP_SDE), seed=0)
  return tm.train()


def _ours(which: str, tm):
  if which == "nafnet":
    from uir_jax.convert.nafnet import load_nafnet
    return load_nafnet(tm.state_dict())
  from uir_jax.convert.unet import load_unet
  return load_unet(tm.state_dict())


def _batch(which: str, batch: int, size: int):
  rng = np.random.default_rng(0)
  img = lambda: rng.random((batch, size, size, 3), dtype=np.float32)
  if which == "nafnet":
    return dict(x=img()), img()
  ctx = UNET_DACLIP_SDE["context_dim"]
  inputs = dict(xt=img(), mu=img(), t=rng.integers(1, 100, batch).astype(np.int32),
                text=rng.standard_normal((batch, ctx)).astype(np.float32),
                image=rng.standard_normal((batch, ctx)).astype(np.float32))
  return inputs, rng.standard_normal((batch, size, size, 3)).astype(np.float32)


def _call(which: str, model, inp: dict, nchw: bool):
  """The model on the batch; images NCHW for torch."""
  if which == "nafnet":
    return model(inp["x"])
  return model(inp["xt"], inp["mu"], inp["t"], text_context=inp["text"],
               image_context=inp["image"])


def _torch_step_fn(which, tm, inp_np, target_np):
  import torch

  t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy() if a.ndim == 4 else a)
  inp = {k: t(v) if k != "t" else torch.from_numpy(v.astype(np.int64)) for k, v in inp_np.items()}
  target = t(target_np)
  opt = torch.optim.Adam(tm.parameters(), lr=LR)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = (_call(which, tm, inp, True) - target).abs().mean()
    loss.backward()
    opt.step()
    return float(loss)

  def forward():
    with torch.no_grad():
      return _call(which, tm, inp, True)

  return step, forward


def _jax_step_fn(which, model, inp_np, target_np, cpu: bool | None = None):
  """Compiled step and forward of our model; `cpu` forces the CPU or the original formulations
  (`uir_jax.models.layers.formulation_override`), None lets the platform decide."""
  from uir_jax.models import layers

  graphdef, params = nnx.split(model)
  params = jax.tree.map(jnp.copy, params)  # own buffers: the step donates them
  tx = optax.adam(LR)
  inp = {k: jnp.asarray(v) for k, v in inp_np.items()}
  target = jnp.asarray(target_np)

  def loss_fn(p):
    return jnp.mean(jnp.abs(_call(which, nnx.merge(graphdef, p), inp, False) - target))

  def train_step(p, opt):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  state = [params, tx.init(params)]
  t0 = time.perf_counter()
  with layers.formulation_override(cpu):
    step_c = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state).compile()
    fwd_c = jax.jit(lambda p: _call(which, nnx.merge(graphdef, p), inp, False)).lower(
        state[0]).compile()
  compile_s = time.perf_counter() - t0

  def step():
    state[0], state[1], loss = step_c(state[0], state[1])
    return float(loss)

  def forward():
    return jax.block_until_ready(fwd_c(state[0]))

  return step, forward, compile_s


def _schedulable_cpus() -> int:
  """XLA's CPU thread pool size: the CPUs this process may run on (`taskset -c 1`: 1)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def bench(which: str, args) -> None:
  import torch

  batch = args.batch or (8 if which == "nafnet" else 4)
  inp_np, target_np = _batch(which, batch, args.size)
  tm = _torch_models(which)
  model = _ours(which, tm)
  t_step, t_fwd = _torch_step_fn(which, tm, inp_np, target_np)
  j_step, j_fwd, compile_s = _jax_step_fn(which, model, inp_np, target_np)
  if args.reference:
    r_step, r_fwd, r_compile_s = _jax_step_fn(which, model, inp_np, target_np, cpu=False)
  base = dict(device=f"{device_name()} ({os.cpu_count()} cores)", shape=[batch, args.size,
              args.size, 3], dtype="float32", torch_threads=torch.get_num_threads(),
              jax_threads=_schedulable_cpus(), iters=args.iters)
  kinds = [("train_step", t_step, j_step, args.reference and r_step)] + (
      [("forward", t_fwd, j_fwd, args.reference and r_fwd)] if args.forward else [])
  for kind, tf, jf, rf in kinds:
    fns = {"torch": tf, "ours": jf} | ({"ours_original": rf} if rf else {})
    times = alternate(fns, args.warmup, args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
      emit(name=f"train_vs_torch/{which}/{kind}/{k}_s", value=round(med[k], 4), unit="s",
           min=round(min(v), 4), max=round(max(v), 4),
           **(dict(compile_s=round(compile_s, 1)) if k == "ours" else {}),
           **(dict(compile_s=round(r_compile_s, 1)) if k == "ours_original" else {}), **base)
    for k in [k for k in times if k != "torch"]:
      ratios = [a / b for a, b in zip(times["torch"], times[k], strict=True)]
      suffix = "" if k == "ours" else "_original"
      emit(name=f"train_vs_torch/{which}/{kind}/speedup{suffix}",
           value=round(med["torch"] / med[k], 3), unit=f"x (torch s / {k} s, > 1: {k} faster)",
           paired_min=round(min(ratios), 3), paired_max=round(max(ratios), 3), **base)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["nafnet", "unet"], choices=["nafnet", "unet"])
  p.add_argument("--batch", type=int, default=0, help="0: 8 for NAFNet, 4 for the U-Net")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=7)
  p.add_argument("--threads", type=int, default=_schedulable_cpus(), help="torch.set_num_threads")
  p.add_argument("--forward", action="store_true", help="also time the forward pass alone")
  p.add_argument("--reference", action="store_true",
                 help="also time our step with the original (non-CPU) formulations, alternated "
                      "with the others: the before/after of the CPU formulations in one run")
  args = p.parse_args(argv)
  import torch

  torch.set_num_threads(args.threads)
  for which in args.models:
    bench(which, args)


if __name__ == "__main__":
  main()

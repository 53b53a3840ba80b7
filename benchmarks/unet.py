"""ConditionalUNet speed and memory: forward, train step, 100-step restoration, large images.

Measures the released universal-ir architecture (nf 64, ch_mult 1,2,4,8, context 512, random
weights) on the default JAX device:

  * forward and train-step (IR-SDE maximum-likelihood loss, AdamW) images/s and the compiled
    temp memory (XLA memory_analysis) at --batch x --size^2, for each --dtypes entry;
  * time to restore one --size^2 image with --steps posterior steps, compile time reported apart;
  * with --large N (e.g. 1024): compile the NxN forward, report its temp memory for the chosen
    attention implementation and, unless --large-compile-only, run it once; with --tile T also
    the tiled denoiser (`uir_jax.diffusion.tiling.tiled_eps_fn`, T x T tiles, --tile-overlap)
    at NxN.

  python benchmarks/unet.py                                   # issue defaults: batch 16, 256^2
  python benchmarks/unet.py --batch 2 --size 128 --steps 10 --dtypes float32   # quick, on a CPU
  python benchmarks/unet.py --only restore --steps 100 10   # restore times at 100 and 10 calls
  python benchmarks/unet.py --only large --large 1024
  python benchmarks/unet.py --only large --large 2048 --tile 512 --large-compile-only

Prints JSON lines: name, device, value, unit (+ shape, dtype, extras).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from bench_util import device_name, emit, memory, time_adamw_step, timeit
from flax import nnx

from uir_jax import losses
from uir_jax.denoiser import make_eps_fn
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.diffusion.tiling import tiled_eps_fn
from uir_jax.models.unet import ConditionalUNet


def bench_forward_and_train(args, dtype: str):
  dev = device_name()
  model = _model(args, dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sde = IRSDE()
  b, s = args.batch, args.size
  k = jax.random.split(jax.random.key(0), 4)
  gt = jax.random.uniform(k[0], (b, s, s, 3))
  lq = jnp.clip(gt + 0.1 * jax.random.normal(k[1], gt.shape), 0, 1)
  text = jax.random.normal(k[2], (b, 512))
  image = jax.random.normal(k[3], (b, 512))
  base = dict(device=dev, shape=[b, s, s, 3], dtype=dtype, attention=args.attention)

  def forward(params, x, mu):
    m = nnx.merge(graphdef, params, rest)
    return m(x, mu, jnp.full((b,), 50), text_context=text, image_context=image)

  t0 = time.perf_counter()
  fwd = jax.jit(forward).lower(params, lq, lq).compile()
  compile_s = time.perf_counter() - t0
  sec = timeit(lambda: fwd(params, lq, lq), args.repeats)
  emit(name="unet/forward_images_per_s", value=round(b / sec, 3), unit="images/s",
        compile_s=round(compile_s, 1), **memory(fwd), **base)

  def loss_fn(p, key):
    t, xt, _ = sde.random_states(key, gt, lq)
    m = nnx.merge(graphdef, p, rest)
    eps = m(xt, lq, t, text_context=text, image_context=image).astype(jnp.float32)
    pred, target = sde.training_pair(eps, xt, gt, lq, t)
    return losses.matching_loss(pred, target, kind="l1")

  compile_s, sec, step = time_adamw_step(loss_fn, params, k[0], args.repeats)
  emit(name="unet/train_step_images_per_s", value=round(b / sec, 3), unit="images/s",
        compile_s=round(compile_s, 1), **memory(step), **base)


def _model(args, dtype: str) -> ConditionalUNet:
  """The released architecture unless --nf / --ch-mult shrink it (random weights)."""
  return ConditionalUNet(nf=args.nf, ch_mult=args.ch_mult, rngs=nnx.Rngs(0),
                         dtype=jnp.dtype(dtype), attention_impl=args.attention)


def bench_restore(args, dtype: str):
  model = _model(args, dtype)
  s = args.size
  lq = jax.random.uniform(jax.random.key(1), (1, s, s, 3))
  ctx = jax.random.normal(jax.random.key(2), (1, 512))
  eps_fn, eps_args = make_eps_fn(model, text_context=ctx, image_context=ctx)
  sde = IRSDE()
  for steps in args.steps:  # one compile per number of network calls (the scan's length)
    run = lambda seed, steps=steps: sde.sample(eps_fn, lq, jax.random.key(seed), "posterior",
                                               steps, eps_args=eps_args)
    t0 = time.perf_counter()
    jax.block_until_ready(run(0))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(run(1))
    sec = time.perf_counter() - t0
    emit(name="unet/restore_one_image", value=round(sec, 3), unit="s", steps=steps,
         compile_s=round(max(first - sec, 0.0), 1), device=device_name(), shape=[1, s, s, 3],
         dtype=dtype, attention=args.attention, nf=args.nf, ch_mult=list(args.ch_mult))


def bench_large(args):
  n = args.large
  dtype = jnp.dtype(args.dtypes[0])
  model = _model(args, dtype)
  graphdef, state = nnx.split(model)
  x = jax.random.uniform(jax.random.key(0), (1, n, n, 3))
  ctx = jax.random.normal(jax.random.key(1), (1, 512))

  def fwd(state, x, c):
    return nnx.merge(graphdef, state)(x, x, 50, text_context=c, image_context=c)

  t0 = time.perf_counter()
  compiled = jax.jit(fwd).lower(state, x, ctx).compile()
  compile_s = time.perf_counter() - t0
  base = dict(device=device_name(), shape=[1, n, n, 3], dtype=str(dtype), attention=args.attention)
  emit(name="unet/large_forward_compiled_memory", value=memory(compiled).get("temp_gib"),
        unit="GiB temp", compile_s=round(compile_s, 1), **memory(compiled), **base)
  runs = [("unet/large_forward", compiled, (state, x, ctx))]
  if args.tile:
    eps_fn, eps_args = make_eps_fn(model, text_context=ctx, image_context=ctx)
    tiled = tiled_eps_fn(eps_fn, args.tile, args.tile_overlap)
    t = jnp.full((1,), 50, jnp.int32)
    t0 = time.perf_counter()
    compiled_tiled = jax.jit(tiled).lower(x, x, t, *eps_args).compile()
    compile_s = time.perf_counter() - t0
    emit(name="unet/large_tiled_forward_compiled_memory",
          value=memory(compiled_tiled).get("temp_gib"), unit="GiB temp",
          compile_s=round(compile_s, 1), tile=args.tile, tile_overlap=args.tile_overlap,
          **memory(compiled_tiled), **base)
    runs.append(("unet/large_tiled_forward", compiled_tiled, (x, x, t, *eps_args)))
  for name, fn, fn_args in runs if not args.large_compile_only else []:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*fn_args))
    emit(name=f"{name}_time", value=round(time.perf_counter() - t0, 2), unit="s",
          finite=bool(jnp.isfinite(out).all()), **base)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, nargs="+", default=[100],
                 help="posterior steps (network calls) of the restore timing; several: one each")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--nf", type=int, default=64, help="U-Net base width (released: 64)")
  p.add_argument("--ch-mult", type=lambda v: tuple(int(m) for m in v.split(",")),
                 default=(1, 2, 4, 8), help="U-Net level multipliers (released: 1,2,4,8)")
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  p.add_argument("--attention", default="auto",
                 choices=["auto", "naive", "xla", "cudnn", "blockwise"])
  p.add_argument("--only", choices=["throughput", "restore", "large"], default=None)
  p.add_argument("--large", type=int, default=0, help="also compile (and run) an NxN forward")
  p.add_argument("--large-compile-only", action="store_true")
  p.add_argument("--tile", type=int, default=0, help="with --large: also the tiled denoiser")
  p.add_argument("--tile-overlap", type=int, default=64)
  args = p.parse_args(argv)
  for dtype in args.dtypes:
    if args.only in (None, "throughput"):
      bench_forward_and_train(args, dtype)
    if args.only in (None, "restore"):
      bench_restore(args, dtype)
  if args.large and args.only in (None, "large"):
    bench_large(args)


if __name__ == "__main__":
  main()

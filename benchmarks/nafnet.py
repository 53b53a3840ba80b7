"""NAFNet speed and memory: forward and train-step images/s, compiled temp memory.

Measures, with random weights on the default JAX device:

  * `conditional`: IR-SDE/Refusion's ConditionalNAFNet (width 64, enc 1,1,1,28) — the denoiser of
    the diffusion restorer — with DA-CLIP conditioning (context 512) unless --no-context;
    train step = IR-SDE maximum-likelihood loss + AdamW, as for the U-Net;
  * `plain`: NAFNet-SIDD-width64 (direct regression; --context adds the DA-CLIP variant);
    train step = L1 to a target + AdamW.

  python benchmarks/nafnet.py                                        # batch 16, 256^2, both dtypes
  python benchmarks/nafnet.py --batch 2 --size 64 --dtypes float32 --repeats 1   # quick, CPU

Prints JSON lines: name, device, value, unit (+ shape, dtype, params, compile_s, memory).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from bench_util import device_name, emit, memory, time_adamw_step, timeit
from flax import nnx

from uir_jax import losses
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.models.nafnet import ConditionalNAFNet, NAFNet, count_params


def _build(which: str, context_dim: int, dtype):
  make = (lambda: ConditionalNAFNet(context_dim=context_dim, rngs=nnx.Rngs(0), dtype=dtype)) \
      if which == "conditional" else \
      (lambda: NAFNet(context_dim=context_dim, rngs=nnx.Rngs(0), dtype=dtype))
  # Initialise under one jit: eager init compiles one small program per parameter shape.
  graphdef, _ = nnx.split(nnx.eval_shape(make))
  params = jax.jit(lambda: nnx.state(make()))()
  return graphdef, params


def bench(args, which: str, dtype_name: str):
  dtype = jnp.dtype(dtype_name)
  ctx_dim = args.context_dim if args.context else 0
  graphdef, params = _build(which, ctx_dim, dtype)
  b, s = args.batch, args.size
  k = jax.random.split(jax.random.key(0), 4)
  gt = jax.random.uniform(k[0], (b, s, s, 3))
  lq = jnp.clip(gt + 0.1 * jax.random.normal(k[1], gt.shape), 0, 1)
  ctx = dict(text_context=jax.random.normal(k[2], (b, ctx_dim)),
             image_context=jax.random.normal(k[3], (b, ctx_dim))) if ctx_dim else {}
  sde = IRSDE()

  def apply(p, x, mu, t):
    m = nnx.merge(graphdef, p)
    return m(x, mu, t, **ctx) if which == "conditional" else m(mu, **ctx)

  base = dict(device=device_name(), shape=[b, s, s, 3], dtype=dtype_name, context_dim=ctx_dim,
              params=count_params(nnx.merge(graphdef, params)))
  t0 = time.perf_counter()
  fwd = jax.jit(apply).lower(params, lq, lq, jnp.full((b,), 50)).compile()
  compile_s = time.perf_counter() - t0
  sec = timeit(lambda: fwd(params, lq, lq, jnp.full((b,), 50)), args.repeats)
  emit(name=f"nafnet_{which}/forward_images_per_s", value=round(b / sec, 3), unit="images/s",
        compile_s=round(compile_s, 1), **memory(fwd), **base)

  def loss_fn(p, key):
    if which == "conditional":
      t, xt, _ = sde.random_states(key, gt, lq)
      eps = apply(p, xt, lq, t).astype(jnp.float32)
      pred, target = sde.training_pair(eps, xt, gt, lq, t)
      return losses.matching_loss(pred, target, kind="l1")
    return jnp.mean(jnp.abs(apply(p, lq, lq, None) - gt))

  compile_s, sec, step = time_adamw_step(loss_fn, params, k[0], args.repeats)
  emit(name=f"nafnet_{which}/train_step_images_per_s", value=round(b / sec, 3),
        unit="images/s", compile_s=round(compile_s, 1), **memory(step), **base)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  p.add_argument("--models", nargs="+", default=["conditional", "plain"],
                 choices=["conditional", "plain"])
  p.add_argument("--context", action=argparse.BooleanOptionalAction, default=True,
                 help="DA-CLIP conditioning (degradation prompt + middle cross-attention)")
  p.add_argument("--context-dim", type=int, default=512)
  args = p.parse_args(argv)
  for dtype in args.dtypes:
    for which in args.models:
      bench(args, which, dtype)


if __name__ == "__main__":
  main()

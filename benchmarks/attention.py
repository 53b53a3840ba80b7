"""The attention dispatcher's fast paths checked against the plain one, and timed.

`uir_jax.models.layers.attention` picks cuDNN flash attention on a GPU in half precision ("auto");
this script measures how far that path is from the plain softmax(q k^T / sqrt(d)) v ("naive") on the
same inputs, at two levels:

  * op: random q, k, v at the U-Net's self-attention shapes (256² input: 32² = 1024 tokens at
    the bottom level; 64² = 4096 one level up), in --dtype; each implementation's max |difference|
    from the naive one in the same dtype and from the naive one in float32 (the rounding
    yardstick: a correct half-precision path is about as far from float32 as naive-in-bf16 is),
    and its time per call;
  * model: the whole ConditionalUNet forward (released sizes unless --nf / --ch-mult) with the
    same weights and inputs, attention_impl=IMPL against "naive", in --dtype.

An implementation the backend lacks (cuDNN on a CPU) is reported as skipped with the error, and the
others still run.

  python benchmarks/attention.py                       # on a GPU: cudnn and xla vs naive, bf16
  python benchmarks/attention.py --size 32 --nf 8 --ch-mult 1,2 --tokens 64 --repeats 2  # CPU
  python benchmarks/attention.py --dtype float32 --impls blockwise --torch --skip-model \
      --batch 1 --heads 8 --dim-head 40 --tokens 1024 4096        # CPU: SD-1.5's self-attention

Prints JSON lines: name, device, shape, value, unit (+ extras).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import device_name, emit, timeit
from flax import nnx

from uir_jax.models import layers
from uir_jax.models.unet import ConditionalUNet


def _max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def op_check(args, tokens: int, heads: int, dim_head: int):
  dtype = jnp.dtype(args.dtype)
  shape = (args.batch, tokens, heads, dim_head)
  q, k, v = (jax.random.normal(key, shape, jnp.float32)
             for key in jax.random.split(jax.random.key(0), 3))
  exact = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="naive"))(q, k, v)
  fns = {impl: jax.jit(lambda q, k, v, impl=impl: layers.attention(q, k, v, impl=impl))
         for impl in ["naive", *args.impls]}
  qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
  plain = None
  for impl, fn in fns.items():
    base = dict(device=device_name(), shape=list(shape), dtype=args.dtype, impl=impl)
    try:
      out = jax.block_until_ready(fn(qd, kd, vd))
    except Exception as e:  # noqa: BLE001 (the backend's own error names what is missing)
      emit(name="attention/op", skipped=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
           **base)
      continue
    plain = out if impl == "naive" else plain
    sec = timeit(lambda fn=fn: fn(qd, kd, vd), args.repeats)
    emit(name="attention/op", value=_max_abs(out, plain), unit="max abs diff vs naive (same dtype)",
         max_abs_diff_vs_float32=_max_abs(out, exact), ms_per_call=round(1e3 * sec, 3), **base)
  if args.torch:  # PyTorch's fused CPU/GPU attention on the same inputs, [B, H, L, D] layout
    import time

    import torch

    tq, tk, tv = (torch.from_numpy(np.array(x, np.float32)).permute(0, 2, 1, 3).to(
        getattr(torch, args.dtype)) for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
      out = sdpa(tq, tk, tv).permute(0, 2, 1, 3).float().numpy()
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        sdpa(tq, tk, tv)
        times.append(time.perf_counter() - t0)
    ms = round(1e3 * float(np.median(times)), 3)
    emit(name="attention/op", value=_max_abs(jnp.asarray(out), exact),
         unit="max abs diff vs naive (float32)", ms_per_call=ms,
         device=device_name(), shape=list(shape), dtype=args.dtype, impl="torch_sdpa",
         torch_threads=torch.get_num_threads())


def model_check(args):
  dtype = jnp.dtype(args.dtype)
  s, b = args.size, args.batch
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.uniform(keys[0], (b, s, s, 3))
  text = jax.random.normal(keys[1], (b, 512))
  image = jax.random.normal(keys[2], (b, 512))
  t = jnp.full((b,), 50, jnp.int32)

  def forward(impl):
    # Same seed, same float32 parameters: only the attention implementation differs.
    model = ConditionalUNet(nf=args.nf, ch_mult=args.ch_mult, rngs=nnx.Rngs(0), dtype=dtype,
                            attention_impl=impl)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(
        x, x, t, text_context=text, image_context=image))
    return jax.block_until_ready(fn(state, x))

  plain = forward("naive")
  scale = float(jnp.max(jnp.abs(plain.astype(jnp.float32))))
  for impl in args.impls:
    base = dict(device=device_name(), shape=[b, s, s, 3], dtype=args.dtype, impl=impl,
                nf=args.nf, ch_mult=list(args.ch_mult))
    try:
      out = forward(impl)
    except Exception as e:  # noqa: BLE001
      emit(name="attention/unet_forward", skipped=f"{type(e).__name__}: "
           f"{str(e).splitlines()[0][:300]}", **base)
      continue
    emit(name="attention/unet_forward", value=_max_abs(out, plain),
         unit="max abs diff vs naive (same dtype)", output_max_abs=scale,
         finite=bool(np.isfinite(np.asarray(out, np.float32)).all()), **base)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--impls", nargs="+", default=["cudnn", "xla"],
                 choices=[i for i in layers.ATTENTION_IMPLS if i != "naive"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096],
                 help="op check: sequence lengths (self-attention: keys = queries)")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--dim-head", type=int, default=64)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--size", type=int, default=256, help="model check: input side")
  p.add_argument("--nf", type=int, default=64)
  p.add_argument("--ch-mult", type=lambda v: tuple(int(m) for m in v.split(",")),
                 default=(1, 2, 4, 8))
  p.add_argument("--skip-model", action="store_true")
  p.add_argument("--torch", action="store_true",
                 help="op check: also torch's scaled_dot_product_attention (a test extra)")
  args = p.parse_args(argv)
  for tokens in args.tokens:
    op_check(args, tokens, args.heads, args.dim_head)
  if not args.skip_model:
    model_check(args)


if __name__ == "__main__":
  main()

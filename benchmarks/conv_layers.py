"""Every 3x3 convolution of the IR-SDE U-Net (daclip-sde options, batch 4 x 64²): value and both
gradients, ours vs PyTorch's, one layer at a time, alternated in one run.

Ours is the U-Net's own call (`layers.conv` -> lax's convolution on every platform for 3x3),
so what this measures is the XLA CPU backend's convolution kernels under this process's
XLA_FLAGS: with the package's option (`uir_jax/xla_cpu.py`: YNNPACK's convolutions off, XLA's
Eigen convolutions) or without it (`UIR_JAX_XLA_CPU_FLAGS=0`: YNNPACK's). Also per layer the
three parts alone (forward, input gradient, kernel gradient) on both sides with `--parts`.

  python benchmarks/conv_layers.py                          # with the package's option
  UIR_JAX_XLA_CPU_FLAGS=0 python benchmarks/conv_layers.py  # YNNPACK's convolutions
  python benchmarks/conv_layers.py --parts

JSON lines: one per layer shape (count in the U-Net, torch ms, ours ms, ratio) and a total
weighted by the counts.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import alternate, device_name, emit

# (count in the U-Net's forward, batch, height = width, Cin, Cout): 3x3, stride 1, padding 1.
UNET_3X3 = [(4, 4, 8, 256, 256), (1, 4, 8, 256, 512), (6, 4, 8, 512, 512), (2, 4, 8, 768, 512),
            (4, 4, 16, 128, 128), (2, 4, 16, 256, 256), (2, 4, 16, 384, 256),
            (1, 4, 16, 512, 256), (4, 4, 32, 64, 64), (2, 4, 32, 128, 128),
            (2, 4, 32, 192, 128), (1, 4, 32, 256, 128), (8, 4, 64, 64, 64), (4, 4, 64, 128, 64)]
PAD = ((1, 1), (1, 1))


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--iters", type=int, default=7)
  p.add_argument("--parts", action="store_true", help="also forward / input / kernel gradient")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  args = p.parse_args(argv)
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(args.threads)
  flags = os.environ.get("XLA_FLAGS", "")
  base = dict(device=f"{device_name()} ({os.cpu_count()} cores)", xla_flags=flags,
              torch_threads=args.threads, dtype="float32", iters=args.iters)
  totals = {"torch": 0.0, "ours": 0.0}
  for count, n, h, cin, cout in UNET_3X3:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h, cin), dtype=np.float32)
    k = rng.standard_normal((3, 3, cin, cout), dtype=np.float32) / (3 * cin ** 0.5)
    r = rng.standard_normal((n, h, h, cout), dtype=np.float32)
    xs, ks, rs = map(jnp.asarray, (x, k, r))
    grad = jax.jit(jax.value_and_grad(lambda x, k, r: jnp.sum(_conv(x, k) * r), argnums=(0, 1)))
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    tk = torch.tensor(k.transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tr = torch.tensor(r.transpose(0, 3, 1, 2).copy())

    def torch_step():
      tx.grad = tk.grad = None
      (F.conv2d(tx, tk, padding=1) * tr).sum().backward()

    fns = {"torch": torch_step, "ours": lambda: jax.block_until_ready(grad(xs, ks, rs))}
    if args.parts:
      fwd = jax.jit(_conv)
      kf = jnp.flip(ks, (0, 1)).swapaxes(2, 3)
      kgrad = jax.jit(jax.grad(lambda k, x, r: jnp.sum(_conv(x, k) * r)))
      td = tx.detach()
      fns |= {
          "torch_forward": lambda: F.conv2d(td, tk.detach(), padding=1),
          "ours_forward": lambda: jax.block_until_ready(fwd(xs, ks)),
          "torch_input_grad": lambda: torch.nn.grad.conv2d_input(td.shape, tk.detach(), tr,
                                                                 padding=1),
          "ours_input_grad": lambda: jax.block_until_ready(fwd(rs, kf)),
          "torch_kernel_grad": lambda: torch.nn.grad.conv2d_weight(td, tk.shape, tr, padding=1),
          "ours_kernel_grad": lambda: jax.block_until_ready(kgrad(ks, xs, rs)),
      }
    ms = {k: statistics.median(v) * 1e3 for k, v in alternate(fns, 1, args.iters).items()}
    totals["torch"] += count * ms["torch"]
    totals["ours"] += count * ms["ours"]
    emit(name="conv_layers/unet_3x3", shape=[n, h, h, cin], cout=cout, count=count,
         **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
         ratio=round(ms["torch"] / ms["ours"], 3), **base)
  emit(name="conv_layers/unet_3x3_total", unit="ms, weighted by the counts",
       torch_ms=round(totals["torch"], 1), ours_ms=round(totals["ours"], 1),
       ratio=round(totals["torch"] / totals["ours"], 3), **base)


if __name__ == "__main__":
  main()

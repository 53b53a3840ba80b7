"""IR-SDE sampler throughput with a stand-in denoiser of realistic cost.

The stand-in is a stack of 3x3 convolutions (64 channels) whose multiply-adds per image match the
DA-CLIP U-Net's (~118 GMAC at 256², scaled with the pixel count), so the figure approximates real
restoration time without loading weights; a second run with a free denoiser (ε̂ = 0) isolates the
sampler's own per-step overhead (the whole loop is one jitted `lax.scan`).

  python benchmarks/sampler.py                      # 256², batch 1, 100 posterior steps
  python benchmarks/sampler.py --size 128 --steps 20 --mode sde

Prints JSON lines: name, device, shape, value, unit (+ extras).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.sde import IRSDE

UNET_GMAC_256 = 118.0  # DA-CLIP paper Table 8 (IR-SDE + DA-CLIP U-Net, 256x256)


def stand_in_denoiser(num_convs: int, width: int = 64):
  """ε̂(x, μ, t) = a residual conv stack; weights passed as arguments, not baked constants."""

  def eps_fn(x, mu, t, weights):
    w_in, w_mid, w_out = weights
    h = jnp.concatenate([x - mu, mu], axis=-1)
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(h, w_in, (1, 1), "SAME", dimension_numbers=dn)
    h = h + (t.astype(h.dtype) / 100.0)[:, None, None, None]

    def body(h, w):
      y = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dn)
      return h + jax.nn.silu(y), None

    h, _ = jax.lax.scan(body, h, w_mid)
    return jax.lax.conv_general_dilated(h, w_out, (1, 1), "SAME", dimension_numbers=dn)

  def init(key, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    s = 0.02
    return (s * jax.random.normal(k1, (3, 3, 6, width), dtype),
            s * jax.random.normal(k2, (num_convs, 3, 3, width, width), dtype),
            s * jax.random.normal(k3, (3, 3, width, 3), dtype))

  return eps_fn, init


def zero_denoiser(x, mu, t):
  del mu, t
  return jnp.zeros_like(x)


def _time(fn, repeats):
  fn().block_until_ready()  # warm (compiled already)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn().block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=100, help="network evaluations (posterior: 1..T)")
  p.add_argument("--mode", default="posterior", choices=["posterior", "sde", "ode"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--convs", type=int, default=None,
                 help="3x3 64->64 convs in the stand-in (default: match the U-Net's MACs)")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)

  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  dev = device.platform if kind in ("", device.platform) else f"{device.platform}:{kind}"
  dtype = jnp.dtype(args.dtype)
  sde = IRSDE()
  shape = (args.batch, args.size, args.size, 3)
  mu = jax.random.uniform(jax.random.key(0), shape, jnp.float32)
  mac_per_conv = 9 * 64 * 64 * args.size * args.size
  target_mac = UNET_GMAC_256 * 1e9 * (args.size / 256) ** 2
  convs = args.convs or max(1, round(target_mac / mac_per_conv))
  eps_fn, init = stand_in_denoiser(convs)
  weights = init(jax.random.key(1), dtype)

  def run_stand_in():
    return sde.sample(eps_fn, mu.astype(dtype), jax.random.key(2), args.mode,
                      num_steps=args.steps if args.mode == "posterior" else None,
                      eps_args=(weights,))

  t0 = time.perf_counter()
  run_stand_in().block_until_ready()
  compile_s = time.perf_counter() - t0
  sec = _time(run_stand_in, args.repeats)
  steps = args.steps if args.mode == "posterior" else sde.T
  base = dict(device=dev, shape=list(shape), mode=args.mode, steps=steps, dtype=args.dtype,
              stand_in_gmac_per_image=round(convs * mac_per_conv / 1e9, 1))
  print(json.dumps(dict(name="sampler/first_call_incl_compile", value=round(compile_s, 3), unit="s",
                        **base)))
  print(json.dumps(dict(name="sampler/time_per_image", value=round(sec / args.batch, 4), unit="s",
                        **base)))
  print(json.dumps(dict(name="sampler/steps_per_s", value=round(steps / sec, 2), unit="steps/s",
                        **base)))

  def run_free():
    return sde.sample(zero_denoiser, mu, jax.random.key(2), args.mode,
                      num_steps=args.steps if args.mode == "posterior" else None)

  run_free().block_until_ready()
  free = _time(run_free, args.repeats)
  print(json.dumps(dict(name="sampler/overhead_per_step", value=round(free / steps * 1e6, 1),
                        unit="us/step", **{**base, "stand_in_gmac_per_image": 0.0})))


if __name__ == "__main__":
  main()

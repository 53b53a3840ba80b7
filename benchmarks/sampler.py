"""IR-SDE sampler throughput with a stand-in denoiser of realistic cost.

The stand-in is a stack of 3x3 convolutions (64 channels) whose multiply-adds per image match the
DA-CLIP U-Net's (~118 GMAC at 256², scaled with the pixel count), so the figure approximates real
restoration time without loading weights; a second run with a free denoiser (ε̂ = 0) isolates the
sampler's own per-step overhead (the whole loop is one jitted `lax.scan`).

  python benchmarks/sampler.py                      # 256², batch 1, 100 posterior steps
  python benchmarks/sampler.py --size 128 --steps 20 --mode sde
  python benchmarks/sampler.py --size 64 --steps 10 --mode mr2

`--analytic` measures accuracy instead of time, in a case with a closed-form denoiser: clean
pixels x0 = μ + δ_c + s_c·N(0, 1) independently (per channel c), so q(x_t | μ) is Gaussian and the
exact ε̂ = E[ε | x_t] is linear. For each mode and number of network calls it reports the KL
divergence of a Gaussian fit to the samples (per channel, averaged) from the exact data law, and
the PSNR of the difference from the 100-step posterior's samples on the same key (same x_T):

  python benchmarks/sampler.py --analytic          # 16 x 128² x 3 pixels, 5/10/20/50 calls

`--trained WORKDIR` compares the modes with a denoiser trained by `uir-jax train`, on held-out
crops of its config's data: PSNR to the ground truth, its paired gap to the 100-step posterior's
(same crops and keys; mean and standard error) and the PSNR of the difference from it:

  python benchmarks/sampler.py --trained workdir/quickstart --config configs/irsde_quickstart.py \
      --batch 32 --seeds 2

Prints JSON lines: name, device, shape, value, unit (+ extras).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.diffusion.irsde import IRSDE, MODES

UNET_GMAC_256 = 118.0  # DA-CLIP paper Table 8 (IR-SDE + DA-CLIP U-Net, 256x256)
DELTA = (0.3, -0.2, 0.0)  # analytic case: E[x0] − μ per channel
S0 = (0.1, 0.05, 0.2)  # analytic case: std of x0 per channel
FEW_STEP_MODES = ("posterior", "mr2", "mr3", "mr2-sde", "mr3-sde")


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


def emit(**kw) -> None:
  print(json.dumps(kw), flush=True)


def gaussian_eps_fn(sde: IRSDE):
  """The exact ε̂ = E[ε | x_t] = σ̄_t (x − μ − m_t δ) / (m_t² s² + σ̄_t²) of the analytic case."""
  m, sb = (jnp.asarray(sde.m, jnp.float32), jnp.asarray(sde.sigma_bar, jnp.float32))

  def eps_fn(x, mu, t, delta, s0):
    mt, sbt = m[t][:, None, None, None], sb[t][:, None, None, None]
    return sbt * (x - mu - mt * delta) / (mt**2 * s0**2 + sbt**2)

  return eps_fn


def gaussian_kl(mean, var, mean_ref, var_ref) -> np.ndarray:
  """KL(N(mean, var) || N(mean_ref, var_ref)), elementwise."""
  return 0.5 * (np.log(var_ref / var) + (var + (mean - mean_ref) ** 2) / var_ref - 1)


def analytic(args, dev):
  """Accuracy of every sampler against the exact data law in the Gaussian case."""
  sde = IRSDE()
  shape = (args.batch, args.size, args.size, 3)
  delta, s0 = np.asarray(DELTA), np.asarray(S0)
  eps_args = (jnp.asarray(delta, jnp.float32), jnp.asarray(s0, jnp.float32))
  eps_fn = gaussian_eps_fn(sde)
  mu = jax.random.uniform(jax.random.key(0), shape, jnp.float32, 0.2, 0.8)
  key = jax.random.key(1)

  def kl_of(x):  # the fit per channel (every pixel of a channel has the same law of x − μ)
    y = (np.asarray(x, np.float64) - np.asarray(mu, np.float64)).reshape(-1, 3)
    return float(np.mean(gaussian_kl(y.mean(0), y.var(0), delta, s0**2)))

  base = dict(device=dev, shape=list(shape))
  ref = np.asarray(sde.sample(eps_fn, mu, key, "posterior", eps_args=eps_args))

  # The exact probability-flow map of this case (what a perfect ODE solver returns from x_T):
  # y_0 = δ + s (y_T − m_T δ) / sqrt(m_T² s² + σ̄_T²), y = x − μ.
  x_T = sde.noise_state(jax.random.split(key)[0], mu)  # the x_T of every run on `key`
  m_T, sb_T = sde.m[-1], sde.sigma_bar[-1]
  flow = mu + delta + s0 * (x_T - mu - m_T * delta) / np.sqrt(m_T**2 * s0**2 + sb_T**2)
  psnr = lambda a, b: round(float(10 * np.log10(1.0 / np.mean((np.asarray(a) - b) ** 2))), 2)

  def report(mode, calls, x, **extra):
    x = np.asarray(x)
    emit(name="sampler/analytic_kl_to_data", value=float(f"{kl_of(x):.3e}"), unit="nats",
         mode=mode, calls=calls, **base, **extra)
    if not (mode == "posterior" and calls == sde.T and not extra):
      emit(name="sampler/analytic_psnr_vs_posterior100", value=psnr(x, ref), unit="dB",
           mode=mode, calls=calls, **base, **extra)
    if mode in ("ode", "mr2", "mr3"):  # deterministic given x_T: its error alone
      emit(name="sampler/analytic_psnr_vs_exact_flow", value=psnr(x, flow), unit="dB",
           mode=mode, calls=calls, **base, **extra)

  # Floors. (1) The estimator's: i.i.d. draws of the exact data law, same pixel count. (2) The
  # start's: x_T = μ + λz is not exactly q(x_T | μ) (mean m_T δ, variance m_T² s² + σ̄_T²); a
  # deterministic sampler maps x_T bijectively and KL is invariant under bijections, so even an
  # exact ODE solve ends this far from the data. (3) The posterior's own spread: the 100-step
  # posterior with the same x_T and other per-step noise.
  exact = mu + delta + s0 * jax.random.normal(jax.random.key(2), shape)
  emit(name="sampler/analytic_kl_to_data", value=float(f"{kl_of(exact):.3e}"), unit="nats",
       mode="exact draws (estimator floor)", calls=0, **base)
  start = gaussian_kl(0.0, sde.lam**2, m_T * delta, m_T**2 * s0**2 + sb_T**2)
  emit(name="sampler/analytic_kl_start", value=float(f"{np.mean(start):.3e}"), unit="nats",
       mode="x_T = mu + lam z vs q(x_T | mu)", calls=0, **base)
  other = sde.sample(eps_fn, mu, jax.random.key(3), "posterior", x_T=x_T, eps_args=eps_args)
  report("posterior, same x_T, other step noise", sde.T, other)

  for mode in ("posterior", "sde", "ode"):
    report(mode, sde.T, sde.sample(eps_fn, mu, key, mode, eps_args=eps_args))
  for mode in args.modes:
    for calls in args.calls:
      report(mode, calls, sde.sample(eps_fn, mu, key, mode, calls, eps_args=eps_args))
  if args.schedules:  # the other step spacing, for comparison
    for mode in args.modes:
      other_sched = "logsnr" if mode == "posterior" else "time"
      for calls in args.calls:
        x = sde.sample(eps_fn, mu, key, mode, calls, eps_args=eps_args, step_schedule=other_sched)
        report(mode, calls, x, step_schedule=other_sched)


def trained(args, dev):
  """Restorations by a trained denoiser (a `uir-jax train` workdir) with every few-step mode.

  Held-out crops of the config's eval stream, the config's clip_x0. For each of `--seeds` keys
  every mode starts from the same x_T; the paired gap PSNR(mode) − PSNR(100-step posterior) (to
  the ground truth, per crop and key, same x_T) is reported as a mean with its standard error,
  next to the same gap for the 100-step posterior run on another key (the reference's own
  run-to-run spread), and the PSNR of the difference from the 100-step posterior.
  """
  import importlib.util
  import os
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)  # configs/ and input_pipeline/ live at the repository root
  from input_pipeline import pipelines
  from uir_jax.checkpoint import Checkpointer, abstract_like
  from uir_jax.denoiser import denoiser_eps_fn
  from uir_jax.metrics.image import psnr
  from uir_jax.systems.daclip_uir import irsde
  from uir_jax.train import loop

  spec = importlib.util.spec_from_file_location("trained_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  stage = irsde.make_stage(config)
  graphdef, init = loop.init_state_fn(stage)
  ckpt = Checkpointer(args.trained, save_every=1, keep=1000)
  step = args.step if args.step is not None else ckpt.latest_step
  state = ckpt.restore(abstract_like(jax.eval_shape(init)), step=step)
  ckpt.close()
  batch = next(iter(pipelines.from_config(config.data, batch_size=args.batch, seed=config.seed + 1,
                                          train=False, process_index=0, process_count=1)))
  lq, gt = jnp.asarray(batch["lq"]), np.asarray(batch["gt"])
  sde = IRSDE(**config.sde)
  eps_fn, eps_args = denoiser_eps_fn(graphdef), ((state["ema"], state["rest"]), None, None)
  clip = bool(config.eval.clip_x0)
  base = dict(device=dev, shape=list(lq.shape), checkpoint_step=int(step), clip_x0=clip,
              seeds=args.seeds)
  keys = [jax.random.key(args.seed + i) for i in range(args.seeds)]

  def run(key, mode, calls, schedule=None):
    out = sde.sample(eps_fn, lq, key, mode, calls, eps_args=eps_args, clip_x0=clip,
                     step_schedule=schedule)
    return np.clip(np.asarray(out), 0.0, 1.0)

  def scores(outs):  # PSNR to the ground truth, [seeds, crops]
    return np.stack([np.asarray(psnr(o, gt)) for o in outs])

  refs = [run(k, "posterior", None) for k in keys]
  ref_psnr = scores(refs)

  def report(mode, calls, outs, **extra):
    p = scores(outs)
    gap = (p - ref_psnr).ravel()
    diff = np.mean([10 * np.log10(1.0 / np.mean((o - r) ** 2)) for o, r in zip(outs, refs,
                                                                                strict=True)])
    emit(name="sampler/trained_psnr_vs_gt", value=round(float(p.mean()), 3), unit="dB",
         mode=mode, calls=calls, **base, **extra)
    emit(name="sampler/trained_gap_to_posterior100", value=round(float(gap.mean()), 3),
         unit="dB", stderr=round(float(gap.std(ddof=1) / np.sqrt(gap.size)), 3), mode=mode,
         calls=calls, **base, **extra)
    emit(name="sampler/trained_psnr_vs_posterior100", value=round(float(diff), 2), unit="dB",
         mode=mode, calls=calls, **base, **extra)

  emit(name="sampler/trained_psnr_vs_gt", value=round(float(np.mean(psnr(np.asarray(lq), gt))), 3),
       unit="dB", mode="degraded input", calls=0, **base)
  emit(name="sampler/trained_psnr_vs_gt", value=round(float(ref_psnr.mean()), 3), unit="dB",
       mode="posterior", calls=sde.T, **base)
  # The reference's own spread: the 100-step posterior on other keys (other x_T and step noise).
  report("posterior, other key", sde.T,
         [run(jax.random.key(args.seed + 1000 + i), "posterior", None) for i in range(args.seeds)])
  for mode in args.modes:
    schedules = [None] + (["logsnr" if mode == "posterior" else "time"] if args.schedules else [])
    for schedule in schedules:
      extra = {} if schedule is None else dict(step_schedule=schedule)
      for calls in args.calls:
        report(mode, calls, [run(k, mode, calls, schedule) for k in keys], **extra)


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
  p.add_argument("--size", type=int, default=None, help="default 256 (--analytic: 128)")
  p.add_argument("--batch", type=int, default=None, help="default 1 (--analytic: 16)")
  p.add_argument("--steps", type=int, default=100,
                 help="network evaluations (posterior and mr modes: 1..T; sde/ode: always T)")
  p.add_argument("--mode", default="posterior", choices=list(MODES))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--convs", type=int, default=None,
                 help="3x3 64->64 convs in the stand-in (default: match the U-Net's MACs)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--analytic", action="store_true",
                 help="accuracy in the Gaussian case instead of time (--size 128 --batch 16)")
  p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20, 50],
                 help="--analytic: network calls for the few-step modes")
  p.add_argument("--modes", nargs="+", default=list(FEW_STEP_MODES), choices=FEW_STEP_MODES,
                 help="--analytic, --trained: the few-step modes to compare")
  p.add_argument("--schedules", action="store_true",
                 help="--analytic, --trained: also each few-step mode with its non-default step "
                      "spacing")
  p.add_argument("--trained", default=None, metavar="WORKDIR",
                 help="restorations by the trained denoiser in this `uir-jax train` workdir "
                      "(latest checkpoint, EMA weights) instead of timing; with --config")
  p.add_argument("--config", default="configs/irsde_quickstart.py",
                 help="--trained: the config file the workdir was trained with")
  p.add_argument("--seed", type=int, default=0, help="--trained: first sampling key")
  p.add_argument("--seeds", type=int, default=1, help="--trained: sampling keys per mode")
  p.add_argument("--step", type=int, default=None,
                 help="--trained: checkpoint step to load (default: the latest)")
  args = p.parse_args(argv)

  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  dev = device.platform if kind in ("", device.platform) else f"{device.platform}:{kind}"
  if args.analytic:
    args.size, args.batch = args.size or 128, args.batch or 16
    return analytic(args, dev)
  if args.trained:
    args.batch = args.batch or 8
    return trained(args, dev)
  args.size, args.batch = args.size or 256, args.batch or 1
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
                      num_steps=None if args.mode in ("sde", "ode") else args.steps,
                      eps_args=(weights,))

  t0 = time.perf_counter()
  run_stand_in().block_until_ready()
  compile_s = time.perf_counter() - t0
  sec = _time(run_stand_in, args.repeats)
  steps = sde.T if args.mode in ("sde", "ode") else args.steps
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
                      num_steps=None if args.mode in ("sde", "ode") else args.steps)

  run_free().block_until_ready()
  free = _time(run_free, args.repeats)
  print(json.dumps(dict(name="sampler/overhead_per_step", value=round(free / steps * 1e6, 1),
                        unit="us/step", **{**base, "stand_in_gmac_per_image": 0.0})))


if __name__ == "__main__":
  main()

"""Stable Diffusion: ours (JAX) side by side with diffusers (PyTorch) in one run, same random
weights, same inputs, float32 on the CPU (on an accelerator, ours only: see benchmarks/device.sh).

Parts (`--only`, comma-separated):
  unet      SD-1.5 UNet forward at a 64² latent (512² image), batch 1
  train     one training step (ε-MSE + AdamW) of a small SD-style UNet (channels 64-256, 2 layers
            per block, 8 heads, context 768) at a 32² latent, batch 2: images/s
  vae       SD VAE decode of a 64² latent to a 512² image, batch 1
  generate  20-step DDIM text-to-image at 512² with classifier-free guidance (UNet batch 2) and the
            VAE decode: ours one jitted scan, diffusers the scheduler loop (text states given)
  compile   the SD-1.5 UNet forward at 1024² (128² latent, batch 2) compiled on abstract
            parameters: XLA temp memory with the blockwise attention ("auto") and the plain one
`--quick` shrinks every size (UNet/VAE/generation at a 32² latent, 4 steps) to check the plumbing.

Timing: after a warm-up call on each side, the calls alternate (torch, ours, torch, ...) so load
from other processes hits both alike; medians are reported with `ratio` = torch / ours (> 1: ours
is faster). JSON lines (bench_util.emit): name, device, shape, ours_s, torch_s, ratio, ...

  python benchmarks/sd.py                     # all parts, full sizes (minutes on 2 cores)
  python benchmarks/sd.py --quick
  python benchmarks/sd.py --only unet,vae --repeats 5
  python benchmarks/sd.py --only compile --no-torch     # ours only (the GPU script)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_util import device_name, emit, memory
from flax import nnx

sys.modules.setdefault("triton", None)  # see tests/conftest.py: no triton probe on CPU

SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
    cross_attention_dim=768)
SMALL_UNET = dict(SD15_UNET, block_out_channels=(64, 128, 256, 256))
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
              sample_size=512)
CTX_LEN = 77


def _nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _split(model):
  """(graphdef, state): jitted functions take the state as an argument (never as constants)."""
  return nnx.split(model)


def alternate(ours, theirs, repeats: int) -> tuple[list[float], list[float]]:
  """Seconds per call of each (already warmed up), alternating torch and ours."""
  t_ours, t_theirs = [], []
  for _ in range(repeats):
    if theirs is not None:
      t0 = time.perf_counter()
      theirs()
      t_theirs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(ours())
    t_ours.append(time.perf_counter() - t0)
  return t_ours, t_theirs


def report(name: str, shape: str, t_ours: list[float], t_theirs: list[float], **extra) -> None:
  med_o = statistics.median(t_ours)
  rec = dict(name=name, device=device_name(), shape=shape, ours_s=round(med_o, 4),
             ours_range=[round(min(t_ours), 4), round(max(t_ours), 4)])
  if t_theirs:
    med_t = statistics.median(t_theirs)
    rec.update(torch_s=round(med_t, 4), torch_range=[round(min(t_theirs), 4),
                                                      round(max(t_theirs), 4)],
               ratio=round(med_t / med_o, 3))
  emit(**rec, **extra)


def _torch_unet(config: dict):
  import torch
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  return UNet2DConditionModel(**config).eval()


def _ours_unet(ref, config: dict, args):
  from uir_jax.convert.sd import unet_from_state_dict
  from uir_jax.models.sd import UNet2DConditionModel

  kw = dict(attention_impl=args.attention, dtype=jnp.dtype(args.dtype))
  if ref is None:  # ours only: random weights of the same config
    return UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kw)
  return unet_from_state_dict(ref.state_dict(), dict(ref.config), **kw)


def bench_unet(args, rng) -> None:
  n, b = (32, 1) if args.quick else (64, 1)
  ref = None if args.no_torch else _torch_unet(SD15_UNET)
  ours = _ours_unet(ref, SD15_UNET, args)
  x = rng.standard_normal((b, n, n, 4)).astype(np.float32)
  ctx = rng.standard_normal((b, CTX_LEN, 768)).astype(np.float32)
  t = np.full((b,), 500.0, np.float32)
  graphdef, state = _split(ours)
  del ours
  t0 = time.perf_counter()
  fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  run_ours = lambda: fwd(state, x, t, ctx)
  run_theirs = None
  threads = None
  if ref is not None:
    import torch

    threads = torch.get_num_threads()
    xt, tt, ct = _nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)

    def run_theirs():
      with torch.no_grad():
        return ref(xt, tt, ct).sample

    run_theirs()
  jax.block_until_ready(run_ours())
  t_o, t_t = alternate(run_ours, run_theirs, args.repeats)
  report("sd15_unet_forward", f"{b}x{n}x{n}x4 latent", t_o, t_t, compile_s=round(compile_s, 1),
         attention=args.attention, dtype=args.dtype, torch_threads=threads)


def bench_train(args, rng) -> None:
  import optax

  n, b = (16, 2) if args.quick else (32, 2)
  ref = None if args.no_torch else _torch_unet(SMALL_UNET)
  ours = _ours_unet(ref, SMALL_UNET, args)
  x = rng.standard_normal((b, n, n, 4)).astype(np.float32)
  noise = rng.standard_normal((b, n, n, 4)).astype(np.float32)
  ctx = rng.standard_normal((b, CTX_LEN, 768)).astype(np.float32)
  t = np.array([999.0, 10.0][:b], np.float32)
  graphdef, params = _split(ours)
  del ours
  tx = optax.adamw(1e-5)

  def step(p, opt):
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((nnx.merge(graphdef, p)(x, t, ctx) - noise) ** 2))(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  st = [params, tx.init(params)]
  t0 = time.perf_counter()
  step_c = jax.jit(step, donate_argnums=(0, 1)).lower(*st).compile()
  compile_s = time.perf_counter() - t0

  def run_ours():
    st[0], st[1], loss = step_c(st[0], st[1])
    return loss

  run_theirs = None
  if ref is not None:
    import torch

    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)
    xt, nt, tt, ct = _nchw(x), _nchw(noise), torch.from_numpy(t), torch.from_numpy(ctx)

    def run_theirs():
      opt.zero_grad(set_to_none=True)
      loss = torch.mean((ref(xt, tt, ct).sample - nt) ** 2)
      loss.backward()
      opt.step()
      return loss

    run_theirs()
  jax.block_until_ready(run_ours())
  t_o, t_t = alternate(run_ours, run_theirs, args.repeats)
  report("sd_small_unet_train_step", f"{b}x{n}x{n}x4 latent, channels 64-256", t_o, t_t,
         compile_s=round(compile_s, 1), ours_images_per_s=round(b / statistics.median(t_o), 3),
         **({"torch_images_per_s": round(b / statistics.median(t_t), 3)} if t_t else {}))


def _vaes(args):
  from uir_jax.convert.sd import vae_from_state_dict
  from uir_jax.models.sd import AutoencoderKL

  kw = dict(attention_impl=args.attention, dtype=jnp.dtype(args.dtype))
  if args.no_torch:
    return None, AutoencoderKL(SD_VAE, rngs=nnx.Rngs(0), **kw)
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  torch.manual_seed(0)
  ref = TorchVAE(**SD_VAE).eval()
  return ref, vae_from_state_dict(ref.state_dict(), dict(ref.config), **kw)


def bench_vae(args, rng) -> None:
  n = 32 if args.quick else 64
  ref, ours = _vaes(args)
  z = rng.standard_normal((1, n, n, 4)).astype(np.float32)
  graphdef, state = _split(ours)
  t0 = time.perf_counter()
  dec = jax.jit(lambda s, a: nnx.merge(graphdef, s).decode(a)).lower(state, z).compile()
  compile_s = time.perf_counter() - t0
  run_ours = lambda: dec(state, z)
  run_theirs = None
  if ref is not None:
    import torch

    zt = _nchw(z)

    def run_theirs():
      with torch.no_grad():
        return ref.decode(zt).sample

    run_theirs()
  jax.block_until_ready(run_ours())
  t_o, t_t = alternate(run_ours, run_theirs, args.repeats)
  report("sd_vae_decode", f"1x{n}x{n}x4 -> {8 * n}² image", t_o, t_t,
         compile_s=round(compile_s, 1), dtype=args.dtype, **memory(dec))


def _ddim_tables(steps: int):
  """diffusers DDIMScheduler with SD's config: scaled_linear betas 0.00085..0.012, 1000 steps,
  "leading" spacing, steps_offset 1, set_alpha_to_one False."""
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  abar = np.cumprod(1 - betas)
  ts = (np.arange(steps) * (1000 // steps))[::-1] + 1
  prev = ts - 1000 // steps
  a_t = abar[ts]
  a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], abar[0])
  return ts.astype(np.float32), a_t.astype(np.float32), a_prev.astype(np.float32)


def bench_generate(args, rng) -> None:
  n, steps = (32, 4) if args.quick else (64, args.steps)
  guidance = 7.5
  ref_unet = None if args.no_torch else _torch_unet(SD15_UNET)
  ours_unet = _ours_unet(ref_unet, SD15_UNET, args)
  ref_vae, ours_vae = _vaes(args)
  lat = rng.standard_normal((1, n, n, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, CTX_LEN, 768)).astype(np.float32)  # [uncond, cond]
  ts, a_t, a_prev = (jnp.asarray(a) for a in _ddim_tables(steps))
  ug, us = _split(ours_unet)
  vg, vs = _split(ours_vae)
  del ours_unet, ours_vae

  def generate(us, vs, lat, ctx):
    unet, vae = nnx.merge(ug, us), nnx.merge(vg, vs)

    def body(x, k):
      eps = unet(jnp.concatenate([x, x]), jnp.full((2,), ts[k]), ctx)
      eps = eps[:1] + guidance * (eps[1:] - eps[:1])
      x0 = (x - jnp.sqrt(1 - a_t[k]) * eps) / jnp.sqrt(a_t[k])
      return jnp.sqrt(a_prev[k]) * x0 + jnp.sqrt(1 - a_prev[k]) * eps, None

    x, _ = jax.lax.scan(body, lat, jnp.arange(steps))
    return (vae.decode(x / vae.scaling_factor) + 1) / 2

  t0 = time.perf_counter()
  gen = jax.jit(generate).lower(us, vs, lat, ctx).compile()
  compile_s = time.perf_counter() - t0
  run_ours = lambda: gen(us, vs, lat, ctx)
  run_theirs = None
  if ref_unet is not None:
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    lt, ct = _nchw(lat), torch.from_numpy(ctx)

    def run_theirs():
      with torch.no_grad():
        sched.set_timesteps(steps)
        x = lt.clone()
        for tk in sched.timesteps:
          eps = ref_unet(torch.cat([x, x]), tk, ct).sample
          eps = eps[:1] + guidance * (eps[1:] - eps[:1])
          x = sched.step(eps, tk, x).prev_sample
        return (ref_vae.decode(x / ref_vae.config.scaling_factor).sample + 1) / 2

    want = run_theirs()  # warm-up; also checks the two loops agree
    got = np.asarray(run_ours())
    diff = float(np.abs(got - np.transpose(want.numpy(), (0, 2, 3, 1))).max())
    emit(name="sd_generate_agreement", shape=f"{8 * n}²", steps=steps, max_abs_diff=diff)
  else:
    jax.block_until_ready(run_ours())
  t_o, t_t = alternate(run_ours, run_theirs, max(1, args.repeats // 2))
  report("sd15_generate_ddim", f"{8 * n}² image, {steps} steps, CFG (UNet batch 2)", t_o, t_t,
         compile_s=round(compile_s, 1), steps=steps, dtype=args.dtype)


def bench_compile(args, rng) -> None:
  from uir_jax.models.sd import UNet2DConditionModel

  del rng
  n, b = (64, 2) if args.quick else (128, 2)
  spec = jax.ShapeDtypeStruct
  for impl in ("auto", "naive"):
    abstract = nnx.eval_shape(lambda impl=impl: UNet2DConditionModel(
        SD15_UNET, rngs=nnx.Rngs(0), attention_impl=impl, dtype=jnp.dtype(args.dtype)))
    graphdef, state = nnx.split(abstract)
    t0 = time.perf_counter()
    c = jax.jit(lambda s, *a, graphdef=graphdef: nnx.merge(graphdef, s)(*a)).lower(
        state, spec((b, n, n, 4), jnp.float32), spec((b,), jnp.float32),
        spec((b, CTX_LEN, 768), jnp.float32)).compile()
    emit(name="sd15_unet_forward_compiled_memory", device=device_name(),
         shape=f"{b}x{n}x{n}x4 latent ({8 * n}² image)", attention=impl, dtype=args.dtype,
         compile_s=round(time.perf_counter() - t0, 1), **memory(c))
    del c
    gc.collect()


PARTS = {"unet": bench_unet, "train": bench_train, "vae": bench_vae, "generate": bench_generate,
         "compile": bench_compile}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated of {list(PARTS)}")
  p.add_argument("--quick", action="store_true", help="small sizes (plumbing check)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per side (alternating)")
  p.add_argument("--attention", default="auto", help="our attention implementation")
  p.add_argument("--dtype", default="float32",
                 help="our compute dtype (bfloat16 on accelerators; the torch side stays float32)")
  p.add_argument("--steps", type=int, default=20, help="generation steps (not with --quick)")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch.set_num_threads (0: torch's default). On a loaded machine torch's "
                      "OpenMP threads wait on each other: compare at 1 thread on both sides "
                      "(`taskset -c 0 python benchmarks/sd.py --torch-threads 1`; XLA's pool "
                      "follows the CPU affinity)")
  p.add_argument("--no-torch", action="store_true", help="ours only (no diffusers side)")
  args = p.parse_args()
  if not args.no_torch:
    import torch

    torch.set_grad_enabled(True)
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
  rng = np.random.default_rng(0)
  for part in args.only.split(","):
    if part not in PARTS:
      raise SystemExit(f"benchmarks/sd.py: unknown part {part!r}; expected one of {list(PARTS)}")
    PARTS[part](args, rng)
    gc.collect()


if __name__ == "__main__":
  main()

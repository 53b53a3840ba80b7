"""Train-step throughput of the real trainers: images/s, compiled memory, FLOPs and MFU.

Runs the spine's own step (`uir_jax.train.loop.make_train_step` through `parallel.make_step`) of
  * the IR-SDE stage with the released U-Net (nf 64, ch_mult 1-2-4-8, 512-d contexts) conditioned
    on a frozen DA-CLIP ViT-B/32 (random weights: the speed is the same) at batch 16, 256² crops
    plus the 224² CLIP view, and
  * the NAFNet + DA-CLIP stage (width 32, 12 middle blocks) at the same batch,
for each dtype and each parallel layout: data-parallel (mesh (-1, 1)) and FSDP (mesh (1, -1)),
on all devices of this host. FLOPs are XLA's cost analysis of the compiled step; MFU is achieved
FLOP/s over the device's peak dense FLOP/s for that dtype (named in the output; null where unknown,
e.g. CPUs). The input pipeline is not part of this measurement (a synthetic batch already on the
devices); its data-wait share in real runs is printed by the trainer (`data N%`).

  python benchmarks/train.py                                     # the issue's settings
  python benchmarks/train.py --batch 2 --size 64 --models nafnet --dtypes float32 --steps 2   # CPU
  python benchmarks/train.py --variant tiny --daclip tiny --batch 2 --size 32 --steps 1  # seconds
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from bench_util import device_name, emit, memory

from configs import irsde_daclip_universal, nafnet_daclip
from uir_jax import parallel
from uir_jax.models.clip import get_config
from uir_jax.systems.daclip_uir import irsde, nafnet
from uir_jax.train import loop

# Peak dense FLOP/s per device by (device kind substring, dtype): vendors' data sheets.
PEAKS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 67e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12, ("TPU v6", "bfloat16"): 918e12,
}


def peak_flops(dtype: str) -> tuple[float | None, str | None]:
  kind = getattr(jax.devices()[0], "device_kind", "")
  for (name, dt), value in PEAKS.items():
    if name in kind and dt == dtype:
      return value, f"{name} {dt} dense"
  return None, None


def _config(model: str, args, dtype: str):
  module = irsde_daclip_universal if model == "unet" else nafnet_daclip
  c = module.get_config(args.variant)
  with c.unlocked():
    c.batch_size, c.dtype, c.data.patch_size = args.batch, dtype, args.size
    c.daclip.checkpoint = f"random:{args.daclip}"
    c.model.context_dim = get_config(args.daclip).embed_dim
    c.data.clip_size = get_config(args.daclip).image_size
  return c


def bench(model: str, dtype: str, layout: str, args) -> None:
  config = _config(model, args, dtype)
  stage = (irsde if model == "unet" else nafnet).make_stage(config)
  mesh = parallel.make_mesh((-1, 1) if layout == "data" else (1, -1))
  graphdef, init = loop.init_state_fn(stage)
  state, shardings = parallel.create_sharded_state(init, mesh, min_size=config.fsdp_min_size)
  aux_sh = parallel.shardings_for(stage.aux, mesh, config.fsdp_min_size)
  aux = parallel.place(stage.aux, aux_sh)
  step = parallel.make_step(loop.make_train_step(graphdef, stage, config.ema_decay), "jit", mesh,
                            shardings, aux_sh)
  r = np.random.default_rng(0)
  b, s, cs = args.batch, args.size, config.data.clip_size
  host = {"lq": r.uniform(0, 1, (b, s, s, 3)).astype(np.float32),
          "gt": r.uniform(0, 1, (b, s, s, 3)).astype(np.float32),
          "index": np.arange(b, dtype=np.int32),
          "clip_lq": r.normal(0, 1, (b, cs, cs, 3)).astype(np.float32)}
  batch = parallel.host_to_global({k: host[k] for k in stage.batch_keys}, mesh)
  key = loop.step_key(0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, aux, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, m = compiled(state, batch, aux, key)  # warm-up
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch, aux, key)
  jax.block_until_ready(m)
  sec = (time.perf_counter() - t0) / args.steps
  peak, peak_name = peak_flops(dtype)
  # cost_analysis counts the per-device program's FLOPs under SPMD: times the devices.
  total_flops = flops * (mesh.size if flops else 0)
  mfu = (total_flops / sec) / (peak * mesh.size) if peak and flops else None
  emit(name=f"train_step/{model}+daclip", device=device_name(), devices=mesh.size,
       variant=args.variant or "released", daclip=args.daclip, layout=layout,
       shape=[b, s, s, 3], dtype=dtype, value=round(b / sec, 2),
       unit="images/s", step_ms=round(1e3 * sec, 2), compile_s=round(compile_s, 1),
       tflops_per_step=round(total_flops / 1e12, 4), mfu=None if mfu is None else round(mfu, 4),
       peak=peak_name, loss=float(np.asarray(m["loss"])), **memory(compiled))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="unet,nafnet")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--layouts", default="data,fsdp")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--daclip", default="ViT-B-32", help="CLIP config of the random frozen DA-CLIP")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--variant", default=None,
                 help="config variant (tiny: the CPU test models; default: the released sizes)")
  args = p.parse_args()
  for model in args.models.split(","):
    for dtype in args.dtypes.split(","):
      for layout in args.layouts.split(","):
        bench(model, dtype, layout, args)


if __name__ == "__main__":
  main()

"""Where a jitted training step's time goes on the XLA CPU backend, op by op.

Profiles `jax.value_and_grad` of the L1 loss of a model (the same models and batches as
`benchmarks/train_vs_torch.py`, plus the DA-CLIP controller's contrastive step), with XLA's
per-thunk trace events (`--xla_cpu_enable_xprof_traceme`), and joins each thunk (fusion, dot,
convolution, copy) to the optimised HLO (`--xla_dump_to`) for its shape and the JAX op it came from.
Prints a table: milliseconds per step, share, forward/backward, thunk, HLO op, result shape, JAX op.

  python benchmarks/profile_grad.py nafnet                 # GoPro width-32 NAFNet, 8 x 64²
  python benchmarks/profile_grad.py unet                   # daclip-sde ConditionalUNet, 4 x 64²
  python benchmarks/profile_grad.py daclip                 # DA-CLIP controller step, ViT-B-32
  python benchmarks/profile_grad.py nafnet --enc 1 1 1 4   # fewer middle blocks: faster compile
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix="uir_profile_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_enable_xprof_traceme=true"
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_module_re=.*step.*").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def _nafnet(args):
  from uir_jax.models.nafnet import NAFNet
  m = NAFNet(width=32, middle_blk_num=1, enc_blk_nums=tuple(args.enc), dec_blk_nums=(1, 1, 1, 1),
             rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.random((8, 64, 64, 3), dtype=np.float32)) for _ in range(2))
  return m, lambda mod: jnp.mean(jnp.abs(mod(x) - y)), nnx.Param


def _unet(args):
  from uir_jax.models.unet import ConditionalUNet
  m = ConditionalUNet(nf=64, ch_mult=(1, 2, 4, 8), context_dim=512, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  xt, mu, y = (jnp.asarray(rng.random((4, 64, 64, 3), dtype=np.float32)) for _ in range(3))
  tc, ic = (jnp.asarray(rng.standard_normal((4, 512)).astype(np.float32)) for _ in range(2))
  t = jnp.asarray([3, 30, 60, 90])
  return m, (lambda mod: jnp.mean(jnp.abs(mod(xt, mu, t, text_context=tc, image_context=ic) - y))
              ), nnx.Param


def _daclip(args):
  """The controller step of benchmarks/daclip.py: frozen CLIP, gradients of the controller and
  logit_scale only, `daclip_loss` on caption and degradation texts."""
  from uir_jax.losses import daclip_loss
  from uir_jax.models.clip import get_config
  from uir_jax.models.daclip import TRAINABLE, DaCLIP
  cfg = get_config(args.clip)
  m = DaCLIP(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b = args.daclip_batch
  img = jnp.asarray(rng.standard_normal((b, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  ids = np.zeros((b, cfg.context_length), np.int32)
  ids[:, 0], ids[:, 1:9], ids[:, 9] = 49406, rng.integers(1, 49000, (b, 8)), 49407
  cap, deg = jnp.asarray(ids), jnp.asarray(np.roll(ids, 1, axis=0))

  def loss(mod):
    out = mod(img, cap, deg)
    return daclip_loss(out["image_features"], out["text_features"], out["image_degra_features"],
                       out["text_degra_features"], mod.logit_scale[...])[0]
  return m, loss, TRAINABLE


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("model", choices=["nafnet", "unet", "daclip"])
  p.add_argument("--enc", type=int, nargs=4, default=[1, 1, 1, 28])
  p.add_argument("--daclip-batch", type=int, default=8)
  p.add_argument("--clip", default="ViT-B-32", help="DA-CLIP's CLIP: ViT-B-32 | ViT-L-14 | tiny")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--adam", action="store_true",
                 help="profile the whole training step: value_and_grad + optax.adam update")
  args = p.parse_args(argv)
  model, loss, trainable = {"nafnet": _nafnet, "unet": _unet, "daclip": _daclip}[args.model](args)
  graphdef, params, rest = nnx.split(model, trainable, ...)

  if args.adam:
    import optax
    tx = optax.adam(1e-4)

    def train_step(p, opt, rest):
      value, grads = jax.value_and_grad(lambda q: loss(nnx.merge(graphdef, q, rest)))(p)
      updates, opt = tx.update(grads, opt, p)
      return optax.apply_updates(p, updates), opt, value

    state = [params, tx.init(params)]
    step_c = jax.jit(train_step, donate_argnums=(0, 1))

    def run():
      state[0], state[1], value = step_c(state[0], state[1], rest)
      jax.block_until_ready(value)
  else:
    def train_step(p, rest):
      return jax.value_and_grad(lambda q: loss(nnx.merge(graphdef, q, rest)))(p)

    step_c = jax.jit(train_step)

    def run():
      jax.block_until_ready(step_c(params, rest))
  run()
  trace_dir = os.path.join(DUMP, "trace")
  wall = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.runs):
      t0 = time.perf_counter()
      run()
      wall.append(time.perf_counter() - t0)
  ev = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True))[-1]))
  ev = ev["traceEvents"] if isinstance(ev, dict) else ev
  hlo_file = sorted(glob.glob(f"{DUMP}/*train_step*after_optimizations.txt"))[0]
  info = {}
  for line in open(hlo_file):
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^)]*\)|\S+?)(?:\{[^}]*\})? (\w[\w\-]*)\(", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      info[m.group(1)] = (m.group(3), m.group(2), op.group(1) if op else "")
  tot = collections.Counter()
  for e in ev:
    if e.get("ph") == "X" and e["name"] in info:
      tot[e["name"]] += e["dur"] / 1e3 / args.runs
  total = sum(tot.values())
  what = "value_and_grad + adam" if args.adam else "value_and_grad, no optimizer"
  print(f"# {args.model}: {total:.1f} ms of thunks per step ({what}); wall "
        f"{1e3 * min(wall):.1f} ms per step (min of {args.runs}, under the profiler)")
  groups, kinds = collections.Counter(), collections.Counter()
  for name, ms in tot.items():
    kind, shape, op = info[name]
    where = "optimizer" if "transpose(" not in op and "jvp(" not in op else (
        "backward" if "transpose(" in op else "forward")
    groups[where] += ms
    kinds[(where, re.sub(r"[.\d]+$", "", name))] += ms
  print("# " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in groups.items()))
  print("# by thunk kind: " + ", ".join(f"{w}/{k} {v:.1f}" for (w, k), v in kinds.most_common(
      args.top)))
  print("| ms/step | % | pass | thunk | HLO | shape | JAX op |\n|---|---|---|---|---|---|---|")
  for name, ms in tot.most_common(args.top):
    kind, shape, op = info[name]
    where = "opt" if "transpose(" not in op and "jvp(" not in op else (
        "bwd" if "transpose(" in op else "fwd")
    print(f"| {ms:.2f} | {100 * ms / total:.1f} | {where} | {name} | {kind} | {shape} | "
          f"{op[-70:]} |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()

"""DA-CLIP throughput: jitted `encode_image(control=True)` and one controller training step.

The training step is the reference recipe (spec §1.7-1.8): frozen CLIP, AdamW (β 0.9/0.98, eps
1e-6, wd 0.05 on matrices only) on the controller + DaCLIP.logit_scale only,
`uir_jax.losses.daclip_loss` on the caption and degradation texts, logit_scale clamped to
[0, ln 100] after the update. Random weights (speed does not depend on their values); the step
donates the trainable state and the optimizer state.

  python benchmarks/daclip.py                                  # ViT-B-32, batch 64, float32
  python benchmarks/daclip.py --batch 8 --dtype bfloat16 --model ViT-L-14

Prints JSON lines: name, device, shape, value, unit (+ extras).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uir_jax.losses import clamp_logit_scale, daclip_loss
from uir_jax.models.clip import get_config
from uir_jax.models.daclip import TRAINABLE, DaCLIP


def _time(fn, steps: int, warmup: int) -> float:
  """Seconds per call after `warmup` calls (the first one compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="ViT-B-32", help="ViT-B-32 | ViT-L-14 | tiny")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--skip_train", action="store_true")
  args = p.parse_args()
  if args.batch <= 0 or args.steps <= 0:
    raise ValueError("--batch and --steps must be positive")

  cfg = get_config(args.model)
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0].platform
  model = DaCLIP(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, 3)),
                       jnp.float32)
  ids = np.zeros((args.batch, cfg.context_length), np.int32)
  ids[:, 0], ids[:, 1:9] = 49406, rng.integers(1, 49000, (args.batch, 8))
  ids[:, 9] = 49407
  captions = jnp.asarray(ids)
  degradations = jnp.asarray(np.roll(ids, 1, axis=0))
  shape = [args.batch, cfg.image_size, cfg.image_size, 3]
  extra = {"model": args.model, "dtype": args.dtype, "batch": args.batch}

  # --- Inference: content + degradation embeddings. ---
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, images):
    return nnx.merge(graphdef, state).encode_image(images, control=True)

  sec = _time(lambda: encode(state, images), args.steps, args.warmup)
  print(json.dumps({"name": "daclip_encode_image", "device": device, "shape": shape,
                    "value": round(args.batch / sec, 2), "unit": "images/s",
                    "ms_per_batch": round(1e3 * sec, 2), **extra}))
  if args.skip_train:
    return

  # --- Training step: only the controller and DaCLIP.logit_scale receive updates. ---
  graphdef, trainable, frozen = nnx.split(model, TRAINABLE, ...)
  # No decay for ndim < 2 (biases, LayerNorms, class embedding, logit_scale), as main.py does.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.adamw(3e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, mask=decay_mask)
  opt_state = tx.init(trainable)

  def loss_fn(trainable, frozen, images, captions, degradations):
    m = nnx.merge(graphdef, trainable, frozen)
    out = m(images, captions, degradations)
    loss, _ = daclip_loss(out["image_features"], out["text_features"],
                          out["image_degra_features"], out["text_degra_features"],
                          m.logit_scale[...])
    return loss

  @jax.jit(donate_argnums=(0, 1))
  def train_step(trainable, opt_state, frozen, images, captions, degradations):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images, captions, degradations)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    trainable["logit_scale"] = nnx.Param(clamp_logit_scale(trainable["logit_scale"][...]))
    return trainable, opt_state, loss

  carry = {"trainable": trainable, "opt_state": opt_state}

  def step():
    carry["trainable"], carry["opt_state"], loss = train_step(
        carry["trainable"], carry["opt_state"], frozen, images, captions, degradations)
    return loss

  sec = _time(step, args.steps, args.warmup)
  n_train = sum(x.size for x in jax.tree.leaves(carry["trainable"]))
  print(json.dumps({"name": "daclip_train_step", "device": device, "shape": shape,
                    "value": round(args.batch / sec, 2), "unit": "images/s",
                    "ms_per_step": round(1e3 * sec, 2), "trainable_params": int(n_train),
                    "loss": "daclip_loss", **extra}))


if __name__ == "__main__":
  main()

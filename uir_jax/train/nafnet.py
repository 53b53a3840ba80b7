"""Direct NAFNet regression stage, optionally conditioned on a frozen DA-CLIP: the "NAFNet +
DA-CLIP" row of the DA-CLIP paper's tables (one forward pass per image, no diffusion).

Per example: (content, degradation) = DA-CLIP(CLIP view of the LQ) without gradients,
restored = NAFNet(LQ, text_context=degradation, image_context=content), and the loss is L1
(per-example mean, then the batch mean) or NAFNet's PSNR loss
(10/ln 10 · mean over the batch of ln(MSE_example + 1e-8), i.e. minus the mean PSNR), or
"psnr+l1": the PSNR loss plus `l1_weight` · L1, the weight optionally falling linearly to 0 over
the first `l1_decay_steps` steps. Why the mixture: the PSNR loss weighs each example by 1/MSE, so
a badly degraded one (a dark photo at 11 dB) gets ~1/80 of the gradient of a mild one (30 dB) and
is barely learnt in a short run, while L1 weighs every pixel alike and neglects the precision the
mild ones need; per pixel the PSNR term's gradient is ~8.7/RMS-error times L1's, so a weight of
~50 lets L1 lead on the bad examples only.

    uir-jax train --config configs/nafnet_daclip.py --workdir runs/nafnet_daclip
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from uir_jax.train import common, loop

LOSSES = ("l1", "psnr", "psnr+l1")


def regression_loss(pred: jax.Array, target: jax.Array, kind: str,
                    l1_weight: float = 0.0) -> jax.Array:
  """Scalar loss of [B, H, W, C] predictions: "l1" or NAFNet's "psnr" (see the module doc)."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.mean(jnp.abs(diff).reshape(diff.shape[0], -1), axis=1))
  if kind in ("psnr", "psnr+l1"):
    mse = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
    loss = 10.0 / math.log(10.0) * jnp.mean(jnp.log(mse + 1e-8))
    if kind == "psnr+l1":
      loss = loss + l1_weight * jnp.mean(jnp.abs(diff))
    return loss
  raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def l1_weight_at(config: ml_collections.ConfigDict, index: jax.Array) -> jax.Array | float:
  """The "psnr+l1" L1 weight of the batch whose global example indices are `index`: `l1_weight`,
  falling linearly to 0 over the first `l1_decay_steps` steps when that is > 0 (the batch of
  step s, 1-based, holds examples [(s - 1) B, s B), so its step is known inside the jitted loss)."""
  weight = float(config.get("l1_weight", 0.0))
  decay = int(config.get("l1_decay_steps", 0))
  if not decay:
    return weight
  step = jnp.min(index) // config.batch_size  # 0-based
  return weight * jnp.clip(1.0 - step / decay, 0.0, 1.0)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  conditioned = common.check_daclip_config(config)
  if config.model.name != "nafnet":
    raise ValueError(f"the nafnet trainer trains a direct NAFNet: model.name 'nafnet', got "
                     f"{config.model.name!r}")
  if config.loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES} for the nafnet trainer, got {config.loss!r}")
  frozen = common.load_frozen_daclip(config.daclip, config.seed) if conditioned else None
  daclip_def = frozen[0] if frozen else None
  use_degra, use_image = bool(config.model.use_degra_context), bool(config.model.use_image_context)
  tx, schedule = loop.make_optimizer(config.optimizer, config.total_steps)

  def forward(model, aux, batch):
    text_context = image_context = None
    if aux is not None:
      text_context, image_context = common.daclip_contexts(
          daclip_def, aux, batch["clip_lq"], use_degra=use_degra, use_image=use_image)
    return model(batch["lq"], text_context=text_context, image_context=image_context)

  def loss_fn(model, batch, key, aux):
    del key  # deterministic given the batch
    return regression_loss(forward(model, aux, batch), batch["gt"], config.loss,
                           l1_weight_at(config, batch["index"])), {}

  predict = jax.jit(lambda graphdef, params, rest, aux, batch: forward(
      nnx.merge(graphdef, params, rest), aux, batch), static_argnums=0)

  def evaluate(graphdef, params, rest, aux, batch):
    return common.evaluate_restoration(batch, predict(graphdef, params, rest, aux, batch))

  keys = ("lq", "gt", "index") + (("clip_lq",) if conditioned else ())
  return loop.Stage(
      name="nafnet", build_model=lambda: common.build_model(config, nnx.Rngs(config.seed)),
      loss_fn=loss_fn, batch_keys=keys, optimizer=tx, schedule=schedule,
      aux=frozen[1] if frozen else None, evaluate=evaluate, eval_keys=keys + ("mask",),
      load_params=load_params)


def load_params(path: str) -> Any:
  """`init_from`: a direct NAFNet's parameters from a PyTorch `.pth` or its `.safetensors`."""
  from uir_jax.convert.nafnet import load_nafnet

  return common.params_of(load_nafnet(path, conditional=False))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

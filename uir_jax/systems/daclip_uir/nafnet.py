"""Direct NAFNet regression stage, optionally conditioned on a frozen DA-CLIP: the "NAFNet +
DA-CLIP" row of the DA-CLIP paper's tables (one forward pass per image, no diffusion).

Per example: (content, degradation) = DA-CLIP(CLIP view of the LQ) without gradients,
restored = NAFNet(LQ, text_context=degradation, image_context=content), and the loss is L1
(per-example mean, then the batch mean) or NAFNet's PSNR loss
(10/ln 10 · mean over the batch of ln(MSE_example + 1e-8), i.e. minus the mean PSNR).

    uir-jax train --config configs/nafnet_daclip.py --workdir runs/nafnet_daclip
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from uir_jax.systems.daclip_uir import conditioning
from uir_jax.train import common, loop

LOSSES = ("l1", "psnr")


def regression_loss(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
  """Scalar loss of [B, H, W, C] predictions: "l1" or NAFNet's "psnr" (see the module doc)."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.mean(jnp.abs(diff).reshape(diff.shape[0], -1), axis=1))
  if kind == "psnr":
    mse = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
    return 10.0 / math.log(10.0) * jnp.mean(jnp.log(mse + 1e-8))
  raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  conditioned = conditioning.check_daclip_config(config)
  if config.model.name != "nafnet":
    raise ValueError(f"the nafnet trainer trains a direct NAFNet: model.name 'nafnet', got "
                     f"{config.model.name!r}")
  if config.loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES} for the nafnet trainer, got {config.loss!r}")
  frozen = (conditioning.load_frozen_daclip(config.daclip, config.seed,
                                            trust=config.get("trust_checkpoint", False))
            if conditioned else None)
  daclip_def = frozen[0] if frozen else None
  use_degra, use_image = bool(config.model.use_degra_context), bool(config.model.use_image_context)
  tx, schedule = loop.make_optimizer(config.optimizer, config.total_steps)
  windows = bool(config.daclip.windows)

  def forward(model, aux, batch):
    text_context = image_context = None
    if aux is not None:
      text_context, image_context = conditioning.daclip_contexts(
          daclip_def, aux, batch["clip_lq"], use_degra=use_degra, use_image=use_image,
          lq=batch["lq"], windows=windows)
    return model(batch["lq"], text_context=text_context, image_context=image_context)

  def loss_fn(model, batch, key, aux):
    del key  # deterministic given the batch
    return regression_loss(forward(model, aux, batch), batch["gt"], config.loss), {}

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


def load_params(path: str, *, trust: bool = False) -> Any:
  """`init_from`: a direct NAFNet's parameters from a PyTorch `.pth` or its `.safetensors`."""
  from uir_jax.convert.nafnet import load_nafnet

  return common.params_of(load_nafnet(path, conditional=False, trust=trust))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

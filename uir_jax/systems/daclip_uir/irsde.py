"""IR-SDE restoration stage: a conditional denoiser trained with the maximum-likelihood target,
optionally conditioned on a frozen DA-CLIP (the reference's `config/*/train.py`, spec §5.4, §8.1).

Per example: t ~ U{1..T}, x_t ~ q(x_t | GT, μ = LQ), (content, degradation) = DA-CLIP(CLIP view
of the LQ) without gradients, ε̂ = model(x_t, μ, t, text_context=degradation,
image_context=content), and the loss is L1( x_t − [θ_t(μ − x_t) + σ_t² ε̂/σ̄_t] dt , x*_{t−1} ),
averaged per example then over the batch. Evaluation: posterior (or SDE / ODE) sampling of a
held-out batch with the EMA weights, PSNR / SSIM against GT, and an LQ | restored | GT grid.

    uir-jax train --config configs/irsde_daclip_universal.py --workdir runs/universal
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from uir_jax import losses
from uir_jax.denoiser import denoiser_eps_fn
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.systems.daclip_uir import conditioning
from uir_jax.train import common, loop


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  conditioned = conditioning.check_daclip_config(config)
  if config.model.name not in ("unet", "cnafnet"):
    raise ValueError(f"the irsde trainer trains an IR-SDE denoiser: model.name 'unet' or "
                     f"'cnafnet', got {config.model.name!r}")
  sde = IRSDE(**config.sde)
  frozen = (conditioning.load_frozen_daclip(config.daclip, config.seed,
                                            trust=config.get("trust_checkpoint", False))
            if conditioned else None)
  daclip_def = frozen[0] if frozen else None
  use_degra, use_image = bool(config.model.use_degra_context), bool(config.model.use_image_context)
  tx, schedule = loop.make_optimizer(config.optimizer, config.total_steps)
  windows = bool(config.daclip.windows)

  def contexts(aux, batch):
    if aux is None:
      return None, None
    return conditioning.daclip_contexts(daclip_def, aux, batch["clip_lq"], use_degra=use_degra,
                                        use_image=use_image, lq=batch["lq"], windows=windows)

  def loss_fn(model, batch, key, aux):
    gt, lq = batch["gt"], batch["lq"]

    def states(k, x0, mu):
      t, xt, _ = sde.random_states(k, x0[None], mu[None])
      return t[0], xt[0]

    t, xt = jax.vmap(states)(common.example_keys(key, batch["index"]), gt, lq)
    text_context, image_context = contexts(aux, batch)
    eps = model(xt, lq, t, text_context=text_context, image_context=image_context)
    pred, target = sde.training_pair(eps.astype(xt.dtype), xt, gt, lq, t)
    return losses.matching_loss(pred, target, kind=config.loss), {}

  def evaluate(graphdef, params, rest, aux, batch):
    text_context, image_context = contexts(aux, batch)
    restored = restore(graphdef, params, rest, batch["lq"], text_context, image_context)
    return common.evaluate_restoration(batch, restored)

  def restore(graphdef, params, rest, lq, text_context, image_context):
    return sde.sample(denoiser_eps_fn(graphdef), lq, jax.random.key(config.seed + 2),
                      config.eval.mode, config.eval.num_steps,
                      eps_args=((params, rest), text_context, image_context),
                      clip_x0=config.eval.clip_x0)

  keys = ("lq", "gt", "index") + (("clip_lq",) if conditioned else ())
  return loop.Stage(
      name="irsde", build_model=lambda: common.build_model(config, nnx.Rngs(config.seed)),
      loss_fn=loss_fn, batch_keys=keys, optimizer=tx, schedule=schedule,
      aux=frozen[1] if frozen else None, evaluate=evaluate, eval_keys=keys + ("mask",),
      load_params=load_params)


def load_params(path: str, *, trust: bool = False) -> Any:
  """`init_from`: a denoiser's parameters from a PyTorch `.pth` or its `.safetensors`."""
  from uir_jax.convert.denoiser import load_denoiser

  return common.params_of(load_denoiser(path, trust=trust))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

"""IR-SDE restoration trainer: a conditional denoiser trained with the maximum-likelihood target.

Per step (spec §5.4): t ~ U{1..T}, x_t ~ q(x_t | GT, μ = LQ), ε̂ = model(x_t, μ, t, contexts),
loss = L1( x_t − [θ_t(μ − x_t) + σ_t² ε̂/σ̄_t] dt ,  x*_{t−1} ).

The loop follows big_vision's shape: build mesh -> data -> model/optimizer state created sharded ->
jitted step with the state donated -> periodic logging / eval. The model is split once
(`nnx.split`); the step is a pure function of (params, rest, opt_state, batch), jitted over a
('data',) mesh: the batch is sharded along 'data', parameters are replicated.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from uir_jax import losses
from uir_jax.checkpoint import Checkpointer, abstract_like
from uir_jax.metrics.image import psnr, ssim
from uir_jax.sampling import denoiser_eps_fn
from uir_jax.sde import IRSDE


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The denoiser named by `config.model.name` ("unet" | "nafnet") with `config.model` options."""
  kwargs = dict(config.model)
  name = kwargs.pop("name")
  dtype = jnp.dtype(config.dtype)
  if "ch_mult" in kwargs:
    kwargs["ch_mult"] = tuple(kwargs["ch_mult"])
  if name == "unet":
    from uir_jax.models.unet import ConditionalUNet

    return ConditionalUNet(**kwargs, rngs=rngs, dtype=dtype)
  if name == "nafnet":
    from uir_jax.models.nafnet import ConditionalNAFNet

    return ConditionalNAFNet(**kwargs, rngs=rngs, dtype=dtype)
  raise ValueError(f"unknown model name {name!r}; expected 'unet' or 'nafnet'")


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with cosine annealing to `end_lr` (the reference's TrueCosineAnnealingLR), no warmup."""
  o = config.optimizer
  schedule = optax.cosine_decay_schedule(o.lr, decay_steps=config.total_steps,
                                         alpha=o.end_lr / o.lr)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule


def make_train_step(graphdef, tx, schedule, sde: IRSDE, loss_kind: str, ema_decay: float):
  """Pure (state, batch, key) -> (state, metrics); jitted by the caller with shardings."""

  def loss_fn(params, rest, batch, key):
    model = nnx.merge(graphdef, params, rest)
    gt, lq = batch["gt"], batch["lq"]
    t, xt, _ = sde.random_states(key, gt, lq)
    eps = model(xt, lq, t, text_context=batch.get("text_context"),
                image_context=batch.get("image_context")).astype(jnp.float32)
    pred, target = sde.training_pair(eps, xt, gt, lq, t)
    return losses.matching_loss(pred, target, kind=loss_kind)

  def step(state, batch, key):
    key = jax.random.fold_in(key, state["step"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], state["rest"], batch, key)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # EMA warm-up (as TF's ExponentialMovingAverage with num_updates): early on the average
    # follows the weights closely instead of staying anchored at the random init.
    step_f = state["step"].astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state["step"])}
    return dict(state, params=params, opt=opt, ema=ema, step=state["step"] + 1), metrics

  return step


def restore_images(graphdef, params, rest, sde: IRSDE, lq, key, mode: str, num_steps: int | None,
                   text_context=None, image_context=None, clip_x0: bool = False):
  """Posterior/SDE/ODE restoration of `lq` with the given (e.g. EMA) parameters."""
  return sde.sample(denoiser_eps_fn(graphdef), lq, key, mode, num_steps,
                    eps_args=((params, rest), text_context, image_context), clip_x0=clip_x0)


def _image_grid(lq, restored, gt) -> np.ndarray:
  """Rows of [LQ | restored | GT], uint8 [rows*H, 3*W, 3]."""
  rows = [np.concatenate([a, b, c], axis=1) for a, b, c in zip(lq, restored, gt, strict=True)]
  return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255 + 0.5).astype(np.uint8)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing summaries, PNG grids and `config.json` under `workdir`.

  Returns the final evaluation metrics (PSNR of LQ and of restored images against GT).
  """
  # Imported here: clu's writers and the tf.data pipeline need TensorFlow; the rest of the library
  # does not.
  from clu import metric_writers, periodic_actions

  from input_pipeline import pipelines

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  # ---- Mesh -------------------------------------------------------------------------------------
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {devices} devices")
  # Auto axes: XLA's sharding propagation places the activations (the models reshape freely,
  # which explicit-sharding mode would make every layer annotate).
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  # ---- Input pipeline ---------------------------------------------------------------------------
  local_batch = config.batch_size // jax.process_count()
  eval_batch = next(iter(pipelines.from_config(config.data, batch_size=config.eval_batch,
                                               seed=config.seed + 1, train=False)))

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(batch[k]))
            for k in ("lq", "gt")}

  # ---- Model, optimizer, state (created directly with the target sharding) --------------------
  sde = IRSDE(**config.sde)
  tx, schedule = make_optimizer(config)
  model = build_model(config, nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("model: %s with %.2fM parameters", config.model.name, num_params / 1e6)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init_state(params, rest):
    return {"params": params, "rest": rest, "opt": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params), "step": jnp.zeros((), jnp.int32)}

  state = init_state(params, rest)
  del model, params, rest

  # ---- Resume: the workdir's own latest checkpoint wins ------------------------------------------
  ckpt = Checkpointer(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                      total_steps=config.total_steps)
  if ckpt.latest_step is not None:
    state = ckpt.restore(abstract_like(state))
    logging.info("resumed from %s at step %d", ckpt.directory, int(state["step"]))
  first_step = int(state["step"]) + 1
  step_fn = jax.jit(make_train_step(graphdef, tx, schedule, sde, config.loss, config.ema_decay),
                    in_shardings=(replicated, data_sharding, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=(0,))
  key = jax.random.key(config.seed)

  # ---- Logging ----------------------------------------------------------------------------------
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str))})
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)

  def evaluate(step: int) -> dict[str, float]:
    lq, gt = jnp.asarray(eval_batch["lq"]), jnp.asarray(eval_batch["gt"])
    restored = restore_images(graphdef, state["ema"], state["rest"], sde, lq,
                              jax.random.key(config.seed + 2), config.eval_mode,
                              config.eval_sampling_steps,
                              clip_x0=config.get("eval_clip_x0", False))
    restored = np.asarray(jnp.clip(restored, 0, 1))
    out = {"eval/psnr_lq": float(np.mean(psnr(lq, gt))),
           "eval/psnr_restored": float(np.mean(psnr(restored, gt)))}
    if min(gt.shape[1:3]) >= 11:  # SSIM's 11 x 11 window
      out["eval/ssim_lq"] = float(np.mean(ssim(lq, gt)))
      out["eval/ssim_restored"] = float(np.mean(ssim(restored, gt)))
    writer.write_scalars(step, out)
    grid = _image_grid(np.asarray(lq), restored, np.asarray(gt))
    writer.write_images(step, {"eval/lq_restored_gt": grid[None]})
    _save_png(os.path.join(workdir, f"eval_{step:07d}.png"), grid)
    logging.info("step %d: PSNR LQ %.2f dB -> restored %.2f dB (%s, %s steps)", step,
                 out["eval/psnr_lq"], out["eval/psnr_restored"], config.eval_mode,
                 config.eval_sampling_steps)
    return out

  # ---- Train loop -------------------------------------------------------------------------------
  # The stream is a pure function of (seed, step): a resumed run sees exactly the batches it would
  # have seen without the interruption.
  train_iter = iter(pipelines.from_config(config.data, batch_size=local_batch, seed=config.seed,
                                          train=True, start_step=first_step - 1,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()))
  metrics_eval: dict[str, float] = {}
  t_start = time.time()
  with metric_writers.ensure_flushes(writer):
    for step in range(first_step, config.total_steps + 1):
      with progress.timed("data"):
        batch = to_global(next(train_iter))
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch, key)
      progress(step)
      if step % config.log_every == 0 or step == config.total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(scalars["loss"]):
          raise FloatingPointError(f"non-finite loss {scalars['loss']} at step {step}; stopping")
        writer.write_scalars(step, scalars)
        logging.info("step %d/%d: loss %.5f (%.1fs)", step, config.total_steps, scalars["loss"],
                     time.time() - t_start)
      if step % config.eval_every == 0 or step == config.total_steps:
        with progress.timed("eval"):
          metrics_eval = evaluate(step)
      with progress.timed("checkpoint"):
        ckpt.maybe_save(step, state)
      if ckpt.reached_preemption(step):
        logging.warning("preemption notice at step %d: checkpoint saved, exiting", step)
        break
  ckpt.close()
  return metrics_eval


def _save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image

  Image.fromarray(image).save(path)

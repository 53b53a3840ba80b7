"""Trainer stage "tdr": TextualDegRemoval's guided restoration network on the spine.

Per example: restored = net(LQ crop, guidance crop) (`networks.build_guided`: backbone
`config.model.arch`, the other `config.model` fields its options); the loss is the paper's
Eq. 5, L1 = mean |restored − GT| (per-example mean, then the batch mean). The batches come from
the input pipeline with a guidance source (`config.data.guidance_root`) or
`config.data.synthetic_guidance`; LQ, GT and guidance are the same crop
(`input_pipeline.guidance`).

Optimizer (paper suppl. "Implementation details"; the released `RefGuidedImageCleanModel`):
AdamW in two groups, each with its own cosine schedule from its initial rate to
`optimizer.end_lr` at the last step: the guidance module (every parameter under a module whose
name starts with "masa": the matching encoder `masa_enc` and the fusion blocks `masa_blk_*`, the
code's rule) at `optimizer.guidance_lr`, the backbone at `optimizer.lr`. Gradient clipping (if
`optimizer.grad_clip`) is one global norm over both groups. The logged `learning_rate` is the
backbone's. Evaluation: PSNR / SSIM of the EMA weights on the held-out split's centre crops.

    uir-jax train --config configs/tdr_nafnet_gopro.py --workdir runs/tdr_gopro
    uir-jax train --config configs/tdr_nafnet_gopro.py:tiny --workdir /tmp/tdr0   # CPU, seconds
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from uir_jax.systems.textual_deg_removal.networks import ARCHS, build_guided
from uir_jax.train import common, loop

# Parameters under a module whose name starts with this are the guidance module's.
GUIDANCE_PREFIX = "masa"
KEYS = ("lq", "gt", "guidance", "index")


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """`config.model` = {arch, **the network's options} in `config.dtype`."""
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}
  arch = options.pop("arch")
  return build_guided(arch, rngs=rngs, dtype=jnp.dtype(config.dtype), **options)


def is_guidance_path(path: tuple) -> bool:
  """Whether a parameter's tree path lies under a guidance-module ("masa...") module."""
  return any(str(getattr(k, "key", "")).startswith(GUIDANCE_PREFIX) for k in path)


def param_groups(params: Any) -> Any:
  """The tree of "guidance" / "backbone" labels of `params` (for `optax.multi_transform`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "guidance" if is_guidance_path(path) else "backbone", params)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Two AdamW groups (backbone `o.lr`, guidance module `o.guidance_lr`), each with the spine's
  warmup + cosine schedule to `o.end_lr`; one global-norm clip before them. Returns the
  transformation and the backbone's schedule."""
  schedules = {"backbone": loop.make_schedule(o, total_steps)}
  g = ml_collections.ConfigDict(o.to_dict())
  g.lr = o.guidance_lr
  schedules["guidance"] = loop.make_schedule(g, total_steps)
  adamw = lambda s: optax.adamw(s, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  tx = optax.multi_transform({k: adamw(s) for k, s in schedules.items()}, param_groups)
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedules["backbone"]


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Eq. 5: mean absolute error per example, then the batch mean."""
  diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(jnp.mean(diff.reshape(diff.shape[0], -1), axis=1))


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.loss != "l1":
    raise ValueError(f"the tdr trainer's loss is L1 (paper Eq. 5): loss 'l1', got {config.loss!r}")
  if config.model.get("arch") not in ARCHS:
    raise ValueError(f"the tdr trainer needs config.model.arch, one of {ARCHS}; got "
                     f"{config.model.get('arch')!r}")
  d = config.data
  if not (d.get("guidance_root") or d.get("synthetic_guidance")):
    raise ValueError("the tdr trainer needs guidance: set config.data.guidance_root (a folder of "
                     "guidance images) or config.data.synthetic_guidance (a side, for tests)")


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  check_config(config)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps)

  def forward(model, batch):
    return model(batch["lq"], batch["guidance"])

  def loss_fn(model, batch, key, aux):
    del key, aux  # deterministic given the batch
    return l1_loss(forward(model, batch), batch["gt"]), {}

  predict = jax.jit(lambda graphdef, params, rest, batch: forward(
      nnx.merge(graphdef, params, rest), batch), static_argnums=0)

  def evaluate(graphdef, params, rest, aux, batch):
    del aux
    return common.evaluate_restoration(batch, predict(graphdef, params, rest, batch))

  return loop.Stage(
      name="tdr", build_model=lambda: build_model(config, nnx.Rngs(config.seed)),
      loss_fn=loss_fn, batch_keys=KEYS, optimizer=tx, schedule=schedule, evaluate=evaluate,
      eval_keys=KEYS + ("mask",), load_params=load_params)


def load_params(path: str, *, trust: bool = False) -> Any:
  """`init_from`: a guided network's parameters from an official fusion checkpoint
  (`NAFNetRefFusion`, `RestormerRefFusion`, the PromptIR variant; `.pth` / `.ckpt`) or its
  `.safetensors` (`convert.load_guided`)."""
  from uir_jax.systems.textual_deg_removal.convert import load_guided

  return common.params_of(load_guided(path, trust=trust))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

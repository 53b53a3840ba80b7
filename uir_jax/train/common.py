"""Pieces every training stage shares: per-example keys, the frozen-model helper, building the
configured network, and evaluation grids and scores. No system lives here (DA-CLIP conditioning is
`uir_jax.systems.daclip_uir.conditioning`)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from uir_jax.metrics.image import psnr, ssim


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example from its global index: randomness that does not depend on how the batch
  is split over devices, hosts or strategies."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


# ---- Models ------------------------------------------------------------------------------------

def frozen(state: Any) -> Any:
  """`state` with gradients stopped: a frozen model's weights inside a differentiated function."""
  return jax.lax.stop_gradient(state)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The network `config.model` names, with its options, in `config.dtype`
  (`uir_jax.models.registry`)."""
  from uir_jax.models import registry

  return registry.build_from_config(config.model, config.dtype, rngs)


def params_of(model: nnx.Module) -> Any:
  return nnx.state(model, nnx.Param)


# ---- Evaluation ---------------------------------------------------------------------------------

def image_grid(lq: np.ndarray, restored: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Rows of [LQ | restored | GT], uint8 [rows*H, 3*W, 3]."""
  rows = [np.concatenate([a, b, c], axis=1) for a, b, c in zip(lq, restored, gt, strict=True)]
  return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255 + 0.5).astype(np.uint8)


def restoration_scores(lq: np.ndarray, restored: np.ndarray, gt: np.ndarray,
                       mask: np.ndarray | None = None) -> dict[str, float]:
  """Mean PSNR (and SSIM where the crops fit its 11x11 window) of LQ and restored vs GT."""
  keep = np.ones(len(gt), bool) if mask is None else np.asarray(mask, bool)
  lq, restored, gt = lq[keep], np.clip(restored[keep], 0, 1), gt[keep]
  out = {"eval/psnr_lq": float(np.mean(psnr(lq, gt))),
         "eval/psnr_restored": float(np.mean(psnr(restored, gt)))}
  if min(gt.shape[1:3]) >= 11:
    out["eval/ssim_lq"] = float(np.mean(ssim(lq, gt)))
    out["eval/ssim_restored"] = float(np.mean(ssim(restored, gt)))
  return out


def evaluate_restoration(batch: dict, restored) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """A stage's evaluation output for restorations of `batch` (arrays on the devices): the scores
  of `restoration_scores` over the real rows and an LQ | restored | GT grid."""
  from uir_jax.train.loop import to_host

  lq, gt, restored = to_host(batch["lq"]), to_host(batch["gt"]), to_host(restored)
  mask = to_host(batch["mask"]) if "mask" in batch else None
  return (restoration_scores(lq, restored, gt, mask),
          {"eval/lq_restored_gt": image_grid(lq, restored, gt)})


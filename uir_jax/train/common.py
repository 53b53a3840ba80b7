"""Pieces the restoration stages share: the frozen DA-CLIP, per-example keys, the denoiser
factory, parameter loading for `init_from`, and evaluation grids."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uir_jax.metrics.image import psnr, ssim

RANDOM_PREFIX = "random:"


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example from its global index: randomness that does not depend on how the batch
  is split over devices, hosts or strategies."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


# ---- Frozen DA-CLIP --------------------------------------------------------------------------

def load_frozen_daclip(cfg: ml_collections.ConfigDict, seed: int, *, trust: bool = False
                       ) -> tuple[Any, Any] | None:
  """(graphdef, state) of the DA-CLIP named by `cfg.checkpoint`, or None if it is empty.

  `cfg.checkpoint`: a released `.pt`, its `uir-jax convert` `.safetensors`, the workdir of one
  of our DA-CLIP training runs, or
  "random:<CLIP config>" (e.g. "random:tiny": random weights from `seed`, for tests and
  benchmarks; embeddings of a random DA-CLIP carry no information about the image).
  `trust=True` (the config's `trust_checkpoint`) reads a PyTorch file with plain pickle, which
  runs code from it. A file that cannot be loaded raises `CheckpointError` naming the field.
  """
  path = cfg.checkpoint
  if not path:
    return None
  if path.startswith(RANDOM_PREFIX):
    from uir_jax.models.clip import get_config
    from uir_jax.models.daclip import DaCLIP

    model = DaCLIP(get_config(path.removeprefix(RANDOM_PREFIX)), rngs=nnx.Rngs(seed + 17))
  else:
    import os

    from uir_jax.convert.clip import load_daclip

    if not os.path.exists(path):
      raise FileNotFoundError(f"daclip.checkpoint: no such file or training run {path!r}")
    from uir_jax.convert.common import checkpoint_errors

    with checkpoint_errors(path, "daclip.checkpoint"):
      model = load_daclip(path, trust=trust)
  graphdef, state = nnx.split(model)
  return graphdef, state


def clip_view(images: jax.Array, size: int) -> jax.Array:
  """The pipeline's 224² CLIP view at a CLIP's input size (unchanged at 224; the tiny test and
  quickstart CLIPs see it resized with antialiasing)."""
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, images.shape[:1] + (size, size, 3), "bilinear", antialias=True)


def window_views(lq: jax.Array, size: int) -> jax.Array:
  """LQ [B, H, W, 3] in [0, 1] -> [B, n, size, size, 3]: full-resolution size² windows tiling it
  (per axis ceil((H - size) / size) + 1 evenly spaced offsets from 0 to H - size: 2 x 2 on a 48²
  patch, 3 x 3 on 96² for size 32), 8-bit rounded and OpenAI-normalised like the pipeline's
  `clip_view="crop"` (whose centre window is one of them only when n is odd)."""
  from uir_jax.preprocess import OPENAI_MEAN, OPENAI_STD

  h, w = lq.shape[1:3]
  if min(h, w) < size:
    raise ValueError(f"daclip.windows needs images of at least the CLIP's {size} pixels, got "
                     f"{h}x{w}")
  def offsets(n):
    count = -(-(n - size) // size) + 1
    return [round(i * (n - size) / max(count - 1, 1)) for i in range(count)]
  x = jnp.round(jnp.clip(lq.astype(jnp.float32), 0.0, 1.0) * 255.0) / 255.0
  x = (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)
  views = [x[:, top:top + size, left:left + size] for top in offsets(h) for left in offsets(w)]
  return jnp.stack(views, axis=1)


def daclip_embed(model: Any, clip_images: jax.Array, lq: jax.Array | None = None,
                 windows: bool = False) -> tuple[jax.Array, jax.Array]:
  """(content, degradation) embeddings of a DA-CLIP: of the pipeline's CLIP view, or with
  `windows` the means over `window_views(lq)` (`daclip.windows`: the controller of a small CLIP
  that reads full-resolution windows sees the whole LQ, not only its centre)."""
  if not windows:
    return model.encode_image(clip_view(clip_images, model.config.image_size), control=True)
  size = model.config.image_size
  views = window_views(lq, size)
  b, n = views.shape[:2]
  content, degradation = model.encode_image(views.reshape(b * n, size, size, 3), control=True)
  return (content.reshape(b, n, -1).mean(axis=1), degradation.reshape(b, n, -1).mean(axis=1))


def daclip_contexts(graphdef: Any, state: Any, clip_images: jax.Array, *, use_degra: bool,
                    use_image: bool, lq: jax.Array | None = None,
                    windows: bool = False) -> tuple[jax.Array | None, jax.Array | None]:
  """(text_context, image_context) = (degradation, content) embeddings, without gradients.

  `clip_images` is the pipeline's CLIP view of the LQ ([B, 224, 224, 3], OpenAI-normalised); a
  DA-CLIP of another input size (the tiny test models) sees it resized with antialiasing. With
  `windows`, the embeddings are averaged over full-resolution windows of `lq` instead
  (`daclip_embed`).
  """
  model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  content, degradation = daclip_embed(model, clip_images, lq, windows)
  content = jax.lax.stop_gradient(content.astype(jnp.float32))
  degradation = jax.lax.stop_gradient(degradation.astype(jnp.float32))
  return (degradation if use_degra else None), (content if use_image else None)


def check_daclip_config(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is DA-CLIP conditioned; fails fast on inconsistent settings."""
  m = config.model
  conditioned = bool(m.use_image_context or m.use_degra_context)
  if conditioned and not config.daclip.checkpoint:
    raise ValueError("model.use_image_context / use_degra_context need daclip.checkpoint (a "
                     "DA-CLIP file, or 'random:tiny' for a smoke run)")
  if conditioned and not config.data.clip_lq:
    raise ValueError("a DA-CLIP-conditioned model needs data.clip_lq=True (the CLIP view of the "
                     "LQ that DA-CLIP reads)")
  if conditioned and not m.context_dim:
    raise ValueError("a DA-CLIP-conditioned model needs model.context_dim (the DA-CLIP "
                     "embedding width: 512 for ViT-B/32, 768 for ViT-L/14)")
  return conditioned


# ---- Models ------------------------------------------------------------------------------------

def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The network named by `config.model.name` with the `config.model` options:
  "unet" (IR-SDE ConditionalUNet), "cnafnet" (IR-SDE ConditionalNAFNet), "nafnet" (direct
  NAFNet regression)."""
  kwargs = dict(config.model)
  name = kwargs.pop("name")
  dtype = jnp.dtype(config.dtype)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if name == "unet":
    from uir_jax.models.unet import ConditionalUNet

    return ConditionalUNet(**kwargs, rngs=rngs, dtype=dtype)
  if name == "cnafnet":
    from uir_jax.models.nafnet import ConditionalNAFNet

    return ConditionalNAFNet(**kwargs, rngs=rngs, dtype=dtype)
  if name == "nafnet":
    from uir_jax.models.nafnet import NAFNet

    return NAFNet(**kwargs, rngs=rngs, dtype=dtype)
  raise ValueError(f"unknown model name {name!r}; expected 'unet', 'cnafnet' or 'nafnet'")


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


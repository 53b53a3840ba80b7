"""Losses: DA-CLIP contrastive (spec §1.7), robust embedding L1 (wild paper §3.3), IR-SDE matching.

Multi-device contract for the contrastive losses: under `jax.jit` on globally sharded arrays, call
them without `axis_name` (XLA partitions the global computation). Inside `shard_map` / `pmap`, pass
the mapped axis name: each device all-gathers the other devices' features, computes the InfoNCE rows
of its own samples against the global batch, and the result is `pmean`-ed, so the value and the
gradients (w.r.t. features and logit_scale) equal the global computation's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOGIT_SCALE_MAX = math.log(100.0)


def _gather(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Global [N, E] features and this device's row offset; identity without an axis name."""
  if axis_name is None:
    return x, jnp.zeros((), jnp.int32)
  # Differentiable gather (its transpose is a reduce-scatter): the other devices' loss rows then
  # send their gradient back to our samples, which is what makes the gradients equal the global
  # ones. Stopping it (open_clip's gather_with_grad=False) is only exact when every device
  # computes the full N x N loss, which costs D times more.
  full = jax.lax.all_gather(x, axis_name, tiled=True)
  offset = jax.lax.axis_index(axis_name) * x.shape[0]
  return full, offset


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
              axis_name: str | None = None, groups: jax.Array | None = None) -> jax.Array:
  """Symmetric CLIP InfoNCE: (CE(s I T^T, targets) + CE(s T I^T, targets)) / 2, s = exp(scale).

  Args:
    image_features, text_features: [B, E], already L2-normalised (B local under `axis_name`).
    logit_scale: scalar temperature in log space (the model's `logit_scale` parameter).
    axis_name: mapped axis inside shard_map/pmap; None for a single program over the full batch.
    groups: optional int [B]: samples with equal group ids are each other's positives (targets
      spread uniformly over the row's positives) instead of negatives. With ten degradation words
      in a batch of hundreds, the reference's one-hot targets make most same-text pairs false
      negatives. None (or all-distinct ids) gives the standard one-hot InfoNCE.

  Returns:
    Scalar float32 loss, the mean over the global batch.
  """
  if image_features.ndim != 2 or image_features.shape != text_features.shape:
    raise ValueError(f"clip_loss needs two [B, E] feature arrays of equal shape, got "
                     f"{image_features.shape} and {text_features.shape}")
  img = image_features.astype(jnp.float32)
  txt = text_features.astype(jnp.float32)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  all_img, offset = _gather(img, axis_name)
  all_txt, _ = _gather(txt, axis_name)
  labels = offset + jnp.arange(img.shape[0])
  logits_per_image = scale * img @ all_txt.T  # [B, N]
  logits_per_text = scale * txt @ all_img.T  # [B, N]
  if groups is None:
    targets = jax.nn.one_hot(labels, all_img.shape[0], dtype=jnp.float32)
  else:
    if groups.shape != img.shape[:1]:
      raise ValueError(f"groups must be [B]={img.shape[:1]}, got {groups.shape}")
    all_groups, _ = _gather(groups, axis_name)
    same = (groups[:, None] == all_groups[None, :]).astype(jnp.float32)
    targets = same / jnp.sum(same, axis=-1, keepdims=True)

  def ce(logits):
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))

  loss = (ce(logits_per_image) + ce(logits_per_text)) / 2
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)  # equal local batches: mean of means = global mean
  return loss


def daclip_loss(image_features: jax.Array, text_features: jax.Array,
                image_degra_features: jax.Array, text_degra_features: jax.Array,
                logit_scale: jax.Array, *, axis_name: str | None = None,
                degradation_groups: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DA-CLIP loss = caption contrastive + degradation contrastive, weight 1 each (spec §1.7).

  Both terms share the temperature. Duplicate degradation texts in a batch stay as negatives, as in
  the reference, unless `degradation_groups` (int [B], equal for equal texts) makes them each
  other's positives in the degradation term (see `clip_loss`).

  Returns:
    (total, {"contrastive": ..., "degradation": ...}), scalars.
  """
  contrastive = clip_loss(image_features, text_features, logit_scale, axis_name=axis_name)
  degradation = clip_loss(image_degra_features, text_degra_features, logit_scale,
                          axis_name=axis_name, groups=degradation_groups)
  return contrastive + degradation, {"contrastive": contrastive, "degradation": degradation}


def embedding_l1_loss(lq_content: jax.Array, hq_content: jax.Array, *, normalize: bool = True,
                      axis_name: str | None = None) -> jax.Array:
  """Robust DA-CLIP term: L1 between the LQ content embedding and the frozen CLIP's HQ embedding.

  The wild paper (§3.3) adds "an l1 loss to minimize the embedding distance between LQ and HQ
  images, where the HQ image embedding is extracted from the frozen CLIP image encoder", without
  saying whether embeddings are normalised or how the L1 is reduced (its training code is not
  released, spec §2). Our reading: the DA-CLIP training forward produces L2-normalised features
  (the contrastive terms use them), so the L1 compares normalised embeddings by default, reduced
  as a mean over all elements (PyTorch `F.l1_loss` default). The HQ side is a fixed target
  (stop-gradient), since that encoder is frozen.

  Args:
    lq_content: [B, E] DA-CLIP content embedding of the degraded images.
    hq_content: [B, E] frozen-CLIP embedding of the clean images.
    normalize: L2-normalise both before the L1 (False compares raw embeddings).
    axis_name: mapped axis inside shard_map/pmap (the mean is then global).

  Returns:
    Scalar float32 loss.
  """
  if lq_content.shape != hq_content.shape:
    raise ValueError(f"embedding_l1_loss shapes differ: {lq_content.shape} vs {hq_content.shape}")
  lq = lq_content.astype(jnp.float32)
  hq = jax.lax.stop_gradient(hq_content.astype(jnp.float32))
  if normalize:
    lq = lq / jnp.linalg.norm(lq, axis=-1, keepdims=True)
    hq = hq / jnp.linalg.norm(hq, axis=-1, keepdims=True)
  loss = jnp.mean(jnp.abs(lq - hq))
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
  """Clamps the log temperature to [0, ln 100]; apply after every optimizer step (spec §1.7)."""
  return jnp.clip(logit_scale, 0.0, LOGIT_SCALE_MAX)


def matching_loss(pred: jax.Array, target: jax.Array, kind: str = "l1") -> jax.Array:
  """IR-SDE matching loss (spec §5.4): per-sample mean over H, W, C, then the batch mean.

  Args:
    pred, target: [B, ...] arrays of equal shape (NHWC images).
    kind: "l1" (absolute error, the released configs) or "l2" (squared error).

  Returns:
    Scalar float32 loss.
  """
  if kind not in ("l1", "l2"):
    raise ValueError(f"matching_loss kind must be 'l1' or 'l2', got {kind!r}")
  if pred.shape != target.shape:
    raise ValueError(f"matching_loss shapes differ: {pred.shape} vs {target.shape}")
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  per_sample = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return jnp.mean(per_sample)

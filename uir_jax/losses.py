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


def _first_occurrence(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For ids [N]: `same` [N, N] (equal ids) and `first` [N] (no earlier equal id), static shapes."""
  same = ids[:, None] == ids[None, :]
  n = ids.shape[0]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
  return same, ~jnp.any(same & earlier, axis=1)


def contrastive_directions(image_features: jax.Array, text_features: jax.Array,
                           logit_scale: jax.Array, *, axis_name: str | None = None,
                           text_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The two InfoNCE directions (image->text, text->image), each averaged over its rows.

  Without `text_ids`: the reference's one-hot InfoNCE over the N pairs (column i is row i's
  positive), duplicates of a text included: a text present n_c times enters each image's softmax
  n_c times, so with identical texts (identical features) each image's term is the cross-entropy
  over the distinct texts of logits shifted by log n_c, plus log n_g of its own text g; it cannot
  fall below log n_g.

  With `text_ids` (int [B], equal for equal texts, hence equal text features): the loss over the
  batch's distinct texts. image->text: each image's softmax over the distinct texts (each once:
  the first occurrence's column), the target its own text; the mean over the N images.
  text->image: one row per distinct text, softmax over the N images, all images of that text
  positive: -log(sum of their probabilities); the mean over the G distinct texts. Both reach 0 on
  a separable batch. Static shapes (masks over first occurrences), so it jits at any batch.

  Args:
    image_features, text_features: [B, E], L2-normalised (B local under `axis_name`).
    logit_scale: scalar log temperature.
    axis_name: mapped axis inside shard_map/pmap; None for a single program over the full batch.
    text_ids: optional int [B] text identities (see above).

  Returns:
    (image_to_text, text_to_image): scalar float32, global means, equal on every device.
  """
  if image_features.ndim != 2 or image_features.shape != text_features.shape:
    raise ValueError(f"clip_loss needs two [B, E] feature arrays of equal shape, got "
                     f"{image_features.shape} and {text_features.shape}")
  img = image_features.astype(jnp.float32)
  txt = text_features.astype(jnp.float32)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  all_img, offset = _gather(img, axis_name)
  all_txt, _ = _gather(txt, axis_name)
  rows = offset + jnp.arange(img.shape[0])
  logits_per_image = scale * img @ all_txt.T  # [B, N]
  logits_per_text = scale * txt @ all_img.T  # [B, N]
  if text_ids is None:
    def ce(logits):  # one-hot target: this row's own column
      picked = jnp.take_along_axis(logits, rows[:, None], axis=1)[:, 0]
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

    i2t, t2i = ce(logits_per_image), ce(logits_per_text)
  else:
    if text_ids.shape != img.shape[:1]:
      raise ValueError(f"text_ids must be [B]={img.shape[:1]}, got {text_ids.shape}")
    all_ids, _ = _gather(text_ids, axis_name)
    same_all, first_all = _first_occurrence(all_ids)  # global: the same on every device
    same = same_all[rows]  # [B, N] this device's rows
    # image -> text: columns restricted to first occurrences; the target is the row's own text's
    # first column (equal texts have equal features, so any of its columns has this logit).
    target = jnp.argmax(same & first_all[None, :], axis=1)
    picked = jnp.take_along_axis(logits_per_image, target[:, None], axis=1)[:, 0]
    i2t = jnp.mean(jax.nn.logsumexp(logits_per_image, axis=-1, where=first_all[None, :])
                   - picked)
    # text -> image: every row is computed, only first occurrences count (a duplicate's row is
    # the same row again); normalised by the global number of distinct texts G.
    row_loss = (jax.nn.logsumexp(logits_per_text, axis=-1)
                - jax.nn.logsumexp(logits_per_text, axis=-1, where=same))
    distinct = jnp.sum(first_all).astype(jnp.float32)
    devices = all_img.shape[0] // img.shape[0]
    # The pmean below averages the devices' values: scale the local sum so that it yields
    # sum over all devices / G.
    t2i = jnp.sum(jnp.where(first_all[rows], row_loss, 0.0)) * devices / distinct
  if axis_name is not None:  # equal local batches: mean of means = global mean
    i2t, t2i = jax.lax.pmean((i2t, t2i), axis_name)
  return i2t, t2i


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array, *,
              axis_name: str | None = None, text_ids: jax.Array | None = None) -> jax.Array:
  """Symmetric CLIP InfoNCE: (CE(s I T^T) + CE(s T I^T)) / 2, s = exp(scale).

  Args:
    image_features, text_features: [B, E], already L2-normalised (B local under `axis_name`).
    logit_scale: scalar temperature in log space (the model's `logit_scale` parameter).
    axis_name: mapped axis inside shard_map/pmap; None for a single program over the full batch.
    text_ids: optional int [B], equal for equal texts: the loss over the batch's distinct texts
      instead of the reference's one-hot InfoNCE with duplicates (`contrastive_directions`).

  Returns:
    Scalar float32 loss, the mean over the global batch.
  """
  i2t, t2i = contrastive_directions(image_features, text_features, logit_scale,
                                    axis_name=axis_name, text_ids=text_ids)
  return (i2t + t2i) / 2


def daclip_loss(image_features: jax.Array, text_features: jax.Array,
                image_degra_features: jax.Array, text_degra_features: jax.Array,
                logit_scale: jax.Array, *, axis_name: str | None = None,
                degradation_ids: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DA-CLIP loss = caption contrastive + degradation contrastive, weight 1 each (spec §1.7).

  Both terms share the temperature. Duplicate degradation texts in a batch stay in the softmax
  once per image, as in the reference (a floor of log n_c per term, n_c the text's count), unless
  `degradation_ids` (int [B], equal for equal texts) makes the degradation term count each
  distinct text once (`contrastive_directions`).

  Returns:
    (total, {"contrastive": ..., "degradation": ...}), scalars.
  """
  contrastive = clip_loss(image_features, text_features, logit_scale, axis_name=axis_name)
  degradation = clip_loss(image_degra_features, text_degra_features, logit_scale,
                          axis_name=axis_name, text_ids=degradation_ids)
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

"""DA-CLIP controller stage, standard (DA-CLIP paper) and robust (wild-IR paper §3.3).

Model: a frozen CLIP (`clip.checkpoint`: open_clip / OpenAI / Hugging Face weights read by
`load_clip`, or "random:<config>" for tests) with a controller built by `DaCLIP.from_clip`; only
the controller (`visual_control`) and DA-CLIP's `logit_scale` are trained, the rest of the state
stays bit-identical. AdamW β (0.9, 0.98), eps 1e-6, weight decay 0.05 on matrices only (norms,
biases, embeddings of rank < 2 and `logit_scale` excluded, as open_clip), linear warmup then
cosine; `logit_scale` clamped to [0, ln 100] after every update; compute dtype from `dtype`.

Per batch (`clip_lq` is the pipeline's 224² CLIP view of each LQ image):
  (content, degradation) = DA-CLIP(clip_lq);  captions and degradation texts through the frozen
  text tower; loss = InfoNCE(content, caption) + InfoNCE(degradation, degradation text), with the
  shared temperature (spec §1.7). Under the jit strategy the loss is computed on the global batch
  (XLA partitions it), so the negatives are the whole batch's and the gradients are exactly those
  of one device (tested on 8 devices).
  `contrastive.distinct_texts` (ours, off by default: the reference's loss): the degradation term
  over the batch's distinct texts (`losses.contrastive_directions`). With ten words in a batch of
  hundreds the reference's softmax holds each word n_c times, so each image's term cannot fall
  below log n_c; counting each text once removes that floor. (Spreading the one-hot targets over
  same-text columns instead, an earlier option, changes nothing: those columns are identical.)
Robust mode (`contrastive.robust`), the wild paper's recipe as we read it: clean photos degraded
  on the fly by the wild chain (the paper's Fig. 2 pipeline), the degradation text of each image
  made of the words that chain actually applied (paper: "combinations of degradation types"), and
  an L1 term pulling the LQ content embedding toward the frozen CLIP's embedding of the clean image
  (paper: "an ℓ1 loss to minimize the embedding distance between LQ and HQ images"). The paper
  does not say whether the embeddings are normalised, how the L1 is reduced or weighted: we
  compare L2-normalised embeddings, average over elements (`losses.embedding_l1_loss`) and weight
  it by `contrastive.robust_weight` (1.0). The text format of the word combinations is ours.

Evaluation: zero-shot degradation accuracy of held-out images over `eval.words` (the ten words,
or the wild vocabulary), its confusion matrix as an image, and content recall@1 of each LQ image
against the batch's clean captions.

    uir-jax train --config configs/daclip_vitb32.py --workdir runs/daclip
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uir_jax import losses
from uir_jax.models.clip import l2_normalize
from uir_jax.models.daclip import TRAINABLE, DaCLIP
from uir_jax.systems.daclip_uir import conditioning
from uir_jax.train import loop


def text_group(text: str) -> int:
  """A stable int id of a text (equal texts, equal ids), for `contrastive.distinct_texts`."""
  return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def _texts(values) -> list[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values)]


def _decay_mask(params):
  """Weight decay on matrices only (open_clip: none for ndim < 2, norms, biases, logit_scale)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _clamp_logit_scale(params):
  def clamp(path, p):  # DaCLIP's own top-level logit_scale (path "['logit_scale'].value")
    return losses.clamp_logit_scale(p) if getattr(path[0], "key", None) == "logit_scale" else p

  return jax.tree_util.tree_map_with_path(clamp, params)


def confusion_image(confusion: np.ndarray, cell: int = 12) -> np.ndarray:
  """Row-normalised confusion matrix [K, K] (rows: true, columns: predicted) as a uint8 RGB
  heat map, `cell` pixels per entry: white = 1, black = 0, the diagonal outlined in green."""
  k = confusion.shape[0]
  rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  img = np.repeat(np.repeat((rows * 255).astype(np.uint8), cell, 0), cell, 1)
  img = np.repeat(img[..., None], 3, axis=-1)
  for i in range(k):
    y = x = i * cell
    img[y, x:x + cell] = img[y + cell - 1, x:x + cell] = (0, 200, 0)
    img[y:y + cell, x] = img[y:y + cell, x + cell - 1] = (0, 200, 0)
  return img


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  from uir_jax.models.clip import CLIP, get_config
  from uir_jax.tokenizer import tokenize

  c, lc = config.clip, config.contrastive
  if not c.checkpoint:
    raise ValueError("clip.checkpoint: name the pretrained CLIP to start from (open_clip / "
                     "OpenAI / Hugging Face weights), or 'random:tiny' for a smoke run")
  if not config.data.clip_lq:
    raise ValueError("the daclip trainer reads the CLIP view of the LQ: set data.clip_lq=True")
  if lc.robust and not config.data.clip_gt:
    raise ValueError("contrastive.robust needs the CLIP view of the clean image: set "
                     "data.clip_gt=True")
  arch = get_config(c.arch)
  dtype = jnp.dtype(config.dtype)
  words = tuple(config.eval.words)
  word_ids = jnp.asarray(tokenize(list(words)), jnp.int32)

  def build_model():
    return DaCLIP(arch, rngs=nnx.Rngs(config.seed), dtype=dtype)

  def initial_state():
    if c.checkpoint.startswith(conditioning.RANDOM_PREFIX):
      clip = CLIP(get_config(c.checkpoint.removeprefix(conditioning.RANDOM_PREFIX)),
                  rngs=nnx.Rngs(config.seed + 17))
    else:
      from uir_jax.convert.clip import load_clip
      from uir_jax.convert.common import checkpoint_errors

      if not os.path.isfile(c.checkpoint):
        raise FileNotFoundError(f"clip.checkpoint: no such file {c.checkpoint!r}")
      with checkpoint_errors(c.checkpoint, "clip.checkpoint"):
        clip = load_clip(c.checkpoint, trust=config.get("trust_checkpoint", False))
    if clip.config != arch:
      raise ValueError(f"clip.arch is {c.arch!r} but {c.checkpoint} holds {clip.config}")
    model = DaCLIP.from_clip(clip, reference_init_quirk=not c.exact_noop_start, dtype=dtype)
    _, params, rest = nnx.split(model, TRAINABLE, ...)
    return params, rest

  tx, schedule = loop.make_optimizer(config.optimizer, config.total_steps,
                                     decay_mask=_decay_mask)

  def loss_fn(model, batch, key, aux):
    del key, aux
    images = conditioning.clip_view(batch["clip_lq"], arch.image_size)
    content, degra = model.encode_image(images, control=True)
    text = l2_normalize(model.encode_text(batch["caption_ids"]).astype(jnp.float32))
    dtext = l2_normalize(model.encode_text(batch["degradation_ids"]).astype(jnp.float32))
    ids = batch["degradation_group"] if lc.distinct_texts else None
    total, parts = losses.daclip_loss(l2_normalize(content), text, l2_normalize(degra), dtext,
                                      model.logit_scale[...], degradation_ids=ids)
    if lc.robust:
      clean = model.encode_image(conditioning.clip_view(batch["clip_gt"], arch.image_size),
                                 control=False)
      parts["robust_l1"] = losses.embedding_l1_loss(content, clean)
      total = total + lc.robust_weight * parts["robust_l1"]
    parts["logit_scale"] = model.logit_scale[...]
    return total, parts

  def prepare(batch):
    """Host side: captions and degradation texts -> token ids; text ids for positives/eval."""
    out = dict(batch)
    captions, degradations = _texts(batch["caption"]), _texts(batch["degradation"])
    out["caption_ids"] = tokenize(captions).astype(np.int32)
    out["degradation_ids"] = tokenize(degradations).astype(np.int32)
    out["degradation_group"] = np.asarray([text_group(t) for t in degradations], np.int32)
    out["caption_group"] = np.asarray([text_group(t) for t in captions], np.int32)
    lookup = {w: i for i, w in enumerate(words)}
    out["word_index"] = np.asarray([lookup.get(t, -1) for t in degradations], np.int32)
    return out

  @jax.jit(static_argnums=0)
  def _embed(graphdef, params, rest, clip_lq, caption_ids):
    model = nnx.merge(graphdef, params, rest)
    content, degra = model.encode_image(conditioning.clip_view(clip_lq, arch.image_size),
                                        control=True)
    text = l2_normalize(model.encode_text(word_ids))
    captions = l2_normalize(model.encode_text(caption_ids))
    return (l2_normalize(degra) @ text.T).argmax(-1), (l2_normalize(content) @ captions.T)

  def evaluate(graphdef, params, rest, aux, batch):
    del aux
    pred, sims = _embed(graphdef, params, rest, batch["clip_lq"], batch["caption_ids"])
    pred, sims = loop.to_host(pred), loop.to_host(sims)
    target, groups = loop.to_host(batch["word_index"]), loop.to_host(batch["caption_group"])
    keep = loop.to_host(batch["mask"]).astype(bool) if "mask" in batch else np.ones_like(target,
                                                                                         bool)
    known = keep & (target >= 0)
    confusion = np.zeros((len(words), len(words)), np.int64)
    np.add.at(confusion, (target[known], pred[known]), 1)
    scores = {"eval/degradation_accuracy": float(np.mean(pred[known] == target[known]))
              if known.any() else float("nan"),
              "eval/chance": 1.0 / len(words)}
    # Recall@1: an LQ image's nearest caption (among the batch's) is its own clean caption.
    best = sims.argmax(-1)
    scores["eval/content_recall@1"] = float(np.mean(groups[best][keep] == groups[keep]))
    return scores, {"eval/degradation_confusion": confusion_image(confusion)}

  keys = ("clip_lq", "caption_ids", "degradation_ids", "degradation_group", "index") + (
      ("clip_gt",) if lc.robust else ())
  eval_keys = ("clip_lq", "caption_ids", "word_index", "caption_group", "mask")
  return loop.Stage(
      name="daclip", build_model=build_model, loss_fn=loss_fn, batch_keys=keys, optimizer=tx,
      schedule=schedule, trainable=TRAINABLE, evaluate=evaluate, eval_keys=eval_keys,
      load_params=load_params, post_update=_clamp_logit_scale, initial_state=initial_state,
      prepare=prepare, strategies=("jit",))


def load_params(path: str, *, trust: bool = False) -> Any:
  """`init_from`: the controller and logit_scale of a DA-CLIP file (released `.pt`, ours)."""
  from uir_jax.convert.clip import load_daclip

  return nnx.state(load_daclip(path, trust=trust), TRAINABLE)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

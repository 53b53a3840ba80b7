"""DA-CLIP conditioning, written once: which view of the LQ the DA-CLIP reads, its (content,
degradation) embeddings, which embedding feeds which input of the restorer, and the zero-shot
degradation readout.

Training reads the pipeline's CLIP view of each patch (`batch["clip_lq"]`, or full-resolution
windows with `daclip.windows`); restoring a photo computes the same view of the whole photo
(`uir_jax.preprocess.photo_views`). Both end in `embed_views`.

    cond = Conditioning(daclip, ClipView.of_config(config), use_degra=True, use_image=True)
    emb = cond.embed(images)          # {content, degradation, probabilities}
    text_context, image_context = cond.contexts(emb)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uir_jax.preprocess import photo_views, resize_view, window_views

RANDOM_PREFIX = "random:"
# Which DA-CLIP embedding feeds which restorer input (the models' use_* flags select).
CONTEXTS = (("degradation", "text_context", "use_degra_context"),
            ("content", "image_context", "use_image_context"))

clip_view = resize_view  # the pipeline's view at a CLIP's input size (trainers' name for it)

__all__ = ["CONTEXTS", "RANDOM_PREFIX", "ClipView", "Conditioning", "check_daclip_config",
           "clip_view", "context_names", "daclip_contexts", "daclip_embed", "embed_views",
           "load_frozen_daclip", "window_views"]


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




def context_names(restorer_net: Any) -> list[str]:
  """The DA-CLIP embeddings ("degradation", "content") a network takes, by its use_* flags."""
  return [name for name, _, flag in CONTEXTS if getattr(restorer_net, flag, False)]


def run_words(config: Any) -> tuple[str, ...]:
  """The degradation words of a run's zero-shot readout: its synthetic task names, else the
  universal model's ten (`zero_shot.DEGRADATION_WORDS`)."""
  from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS

  tasks = config["data"].get("tasks") or ()
  return tuple(str(task[0]) for task in tasks) or DEGRADATION_WORDS


# ---- Photos: the view a run read, embeddings and the zero-shot readout ----------------------


@dataclasses.dataclass(frozen=True)
class ClipView:
  """Which view of a photo the DA-CLIP reads (`uir_jax.preprocess.photo_views`).

  view: "resize" (the reference's CLIP transform; the released models'), "crop" (the
  full-resolution centre) or "windows" (full-resolution windows, embeddings averaged).
  size: the pipeline's `data.clip_size` (views of another size are resized to the CLIP's).
  """

  view: str = "resize"
  size: int = 224

  @classmethod
  def of_config(cls, config: Any) -> ClipView:
    """The view a training run's DA-CLIP read (`daclip.windows`, `data.clip_view/clip_size`)."""
    data = config["data"]
    if config["daclip"].get("windows"):
      return cls("windows", int(data.get("clip_size", 224)))
    return cls(str(data.get("clip_view", "resize")), int(data.get("clip_size", 224)))


def embed_views(model: Any, views: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(content, degradation) float32 [B, D] of a DA-CLIP over views [B, n, S, S, 3] (the mean
  over the n views; one view for "resize" and "crop")."""
  b, n, s = views.shape[:3]
  content, degradation = model.encode_image(views.reshape(b * n, s, s, 3), control=True)
  return (content.astype(jnp.float32).reshape(b, n, -1).mean(axis=1),
          degradation.astype(jnp.float32).reshape(b, n, -1).mean(axis=1))


def zero_shot_probabilities(degradation: jax.Array, text_features: jax.Array) -> jax.Array:
  """softmax(100 * norm(degradation) . text^T) over L2-normalised word features [N, D]
  (`zero_shot.classify_degradation`'s formula)."""
  from uir_jax.models.clip import l2_normalize

  return jax.nn.softmax(100.0 * l2_normalize(degradation) @ text_features.T, axis=-1)


@functools.cache
def _embed_fn(graphdef: Any, view: ClipView, model_size: int):
  @jax.jit
  def embed(state, images, text_features):
    model = nnx.merge(graphdef, state)
    content, degradation = embed_views(model, photo_views(images, view.view, view.size,
                                                          model_size))
    return {"content": content, "degradation": degradation,
            "probabilities": zero_shot_probabilities(degradation, text_features)}

  return embed


class Conditioning:
  """A frozen DA-CLIP as a restorer reads it: `embed(images)` once per photo, `contexts(emb)` the
  restorer's (text_context, image_context).

  Args:
    daclip: the `DaCLIP`.
    view: the view of the photo it reads (default: the reference's resize to its input size).
    use_degra, use_image: which embeddings the restorer takes (its use_*_context flags).
    words: the zero-shot degradation words.
  """

  def __init__(self, daclip: Any, view: ClipView | None = None, *, use_degra: bool = True,
               use_image: bool = True, words: Sequence[str] | None = None):
    from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS

    self.daclip = daclip
    self.view = view or ClipView("resize", int(daclip.config.image_size))
    self.use_degra, self.use_image = use_degra, use_image
    self.words = list(DEGRADATION_WORDS if words is None else words)
    self.graphdef, self.state = nnx.split(daclip)
    self._text = None

  def text_features(self) -> np.ndarray:
    """L2-normalised text features of the words, float32 [N, D] (computed once)."""
    if self._text is None:
      from uir_jax.models.clip import l2_normalize
      from uir_jax.tokenizer import tokenize

      ids = jnp.asarray(tokenize(self.words), jnp.int32)
      self._text = np.asarray(l2_normalize(self.daclip.encode_text(ids)), np.float32)
    return self._text

  def embed(self, images: Any) -> dict[str, jax.Array]:
    """Photos [B, H, W, 3] in [0, 1] -> {content, degradation: float32 [B, D] (unnormalised),
    probabilities: [B, len(words)]}."""
    fn = _embed_fn(self.graphdef, self.view, int(self.daclip.config.image_size))
    return fn(self.state, jnp.asarray(images, jnp.float32), jnp.asarray(self.text_features()))

  def contexts(self, emb: dict[str, Any]) -> tuple[jax.Array | None, jax.Array | None]:
    return ((emb["degradation"] if self.use_degra else None),
            (emb["content"] if self.use_image else None))

"""Zero-shot degradation classification with DA-CLIP (spec §1.9, README "DA-CLIP Usage").

    probs = classify_degradation(daclip, clip_preprocess(images))   # [B, 10]
    DEGRADATION_WORDS[int(probs[0].argmax())]                        # e.g. "noisy"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.models.clip import l2_normalize

# The ten degradation types of the universal model, in the reference order (spec §3.2).
DEGRADATION_WORDS = (
    "motion-blurry", "hazy", "jpeg-compressed", "low-light", "noisy", "raindrop", "rainy",
    "shadowed", "snowy", "uncompleted",
)


@jax.jit
def _probs(graphdef, state, images: jax.Array, ids: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, state)
  _, degra = model.encode_image(images, control=True)
  text = l2_normalize(model.encode_text(ids))
  return jax.nn.softmax(100.0 * l2_normalize(degra) @ text.T, axis=-1)


def classify_degradation(model, images: jax.Array,
                         words: Sequence[str] | np.ndarray | jax.Array = DEGRADATION_WORDS, *,
                         tokenize_fn: Callable[[Sequence[str]], np.ndarray] | None = None
                         ) -> jax.Array:
  """Probabilities over `words` for each image: softmax(100 * norm(degra) . norm(text)^T).

  Args:
    model: a `DaCLIP`.
    images: [B, H, W, 3] already CLIP-preprocessed (`uir_jax.preprocess.clip_preprocess`).
    words: the class strings, or precomputed token ids int [N, 77] (no tokenizer needed then).
    tokenize_fn: strings -> int ids [N, 77]; default `uir_jax.tokenizer.tokenize`.

  Returns:
    float32 [B, N], rows sum to 1.
  """
  if isinstance(words, str):
    raise ValueError("words must be a sequence of strings (or token ids), not one string")
  if isinstance(words, (np.ndarray, jax.Array)):
    ids = words
  else:
    words = list(words)
    if not words:
      raise ValueError("words is empty")
    if tokenize_fn is None:
      from uir_jax.tokenizer import tokenize as tokenize_fn
    ids = tokenize_fn(words)
  ids = jnp.asarray(ids, jnp.int32)
  if ids.ndim != 2:
    raise ValueError(f"token ids must be [N, context_length], got {ids.shape}")
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
  graphdef, state = nnx.split(model)
  return _probs(graphdef, state, jnp.asarray(images), ids)

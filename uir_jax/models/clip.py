"""open_clip-compatible CLIP (ViT image tower + causal text transformer) in Flax NNX (spec §1.1-3).

Sub-modules are named after the PyTorch ones (`visual.conv1`,
`visual.transformer.resblocks[i].attn`, `token_embedding`, `ln_final`, ...) so the checkpoint key
map in `uir_jax/convert/clip.py` is a near-identity. Differences of layout: images are NHWC, token
sequences are batch-first (NLD, not LND), and the packed attention `in_proj` is split into separate
`q_proj/k_proj/v_proj` Dense layers.

Params are float32; `dtype` is the compute dtype (float32 or bfloat16). LayerNorms always compute
in float32 (as open_clip's `LayerNormFp32` does for reduced precision) and cast back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of one CLIP model (open_clip `CLIPVisionCfg` + `CLIPTextCfg` fields we use)."""

  embed_dim: int
  # Vision tower.
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  # Text tower.
  text_width: int
  text_layers: int
  text_heads: int
  context_length: int = 77
  vocab_size: int = 49408
  mlp_ratio: float = 4.0
  # "gelu" (exact erf; LAION / DA-CLIP models) or "quick_gelu" (OpenAI weights, HF CLIP default).
  act: str = "gelu"
  ln_eps: float = 1e-5

  def __post_init__(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"CLIPConfig.act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    for name, width, heads in (("vision", self.vision_width, self.vision_heads),
                               ("text", self.text_width, self.text_heads)):
      if heads <= 0 or width % heads:
        raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


def _quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() default: exact erf
    "quick_gelu": _quick_gelu,
}

# For tests and CPU smoke runs; the full vocabulary so real tokenizer ids stay valid.
# Head width 64 like the real models, so `convert.clip.infer_config` recovers it from shapes.
_TINY = CLIPConfig(embed_dim=64, image_size=32, patch_size=8, vision_width=128, vision_layers=2,
                   vision_heads=2, text_width=128, text_layers=2, text_heads=2)

_CONFIGS = {
    # model_configs/daclip_ViT-B-32.json == open_clip ViT-B-32 (spec §1.1).
    "ViT-B-32": CLIPConfig(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                           vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                           text_heads=8),
    "ViT-L-14": CLIPConfig(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                           vision_layers=24, vision_heads=16, text_width=768, text_layers=12,
                           text_heads=12),
    "tiny": _TINY,
    # The quickstart's: 4-px patches, so a randomly initialised trunk can learn to see noise,
    # JPEG blocks and softness (a type readout probe: 0.63 vs 0.57 with 8-px patches).
    "tiny-p4": dataclasses.replace(_TINY, patch_size=4),
}


def get_config(name: str) -> CLIPConfig:
  """"ViT-B-32" | "ViT-L-14" | "tiny" | "tiny-p4" (a "daclip_" prefix, as in the reference, is
  allowed)."""
  key = name.removeprefix("daclip_")
  if key not in _CONFIGS:
    raise ValueError(f"unknown CLIP config {name!r}; known: {sorted(_CONFIGS)}")
  return _CONFIGS[key]


class LayerNorm(nnx.Module):
  """nn.LayerNorm over the last axis, computed in float32 and cast back to the input dtype."""

  def __init__(self, dim: int, eps: float = 1e-5, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _dense(din: int, dout: int, dtype, rngs: nnx.Rngs, *, use_bias: bool = True,
           zero: bool = False) -> nnx.Linear:
  init = nnx.initializers.zeros if zero else nnx.initializers.normal(din ** -0.5)
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """nn.MultiheadAttention (batch-first) with the packed in_proj split into q/k/v projections."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.heads = heads
    self.q_proj = _dense(width, width, dtype, rngs)
    self.k_proj = _dense(width, width, dtype, rngs)
    self.v_proj = _dense(width, width, dtype, rngs)
    self.out_proj = _dense(width, width, dtype, rngs)

  def __call__(self, x: Array, *, causal: bool = False) -> Array:
    """x [B, L, W] -> [B, L, W]; scale head_dim^-0.5 as in torch MHA."""
    b, n, w = x.shape
    split = lambda t: t.reshape(b, n, self.heads, w // self.heads)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    out = jax.nn.dot_product_attention(q, k, v, scale=(w // self.heads) ** -0.5,
                                       is_causal=causal)
    return self.out_proj(out.reshape(b, n, w))


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.c_fc = _dense(width, hidden, dtype, rngs)
    self.c_proj = _dense(hidden, width, dtype, rngs)
    self.act = act

  def __call__(self, x: Array) -> Array:
    return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (LayerScale off)."""

  def __init__(self, width: int, heads: int, config: CLIPConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.ln_1 = LayerNorm(width, config.ln_eps, rngs=rngs)
    self.attn = Attention(width, heads, rngs=rngs, dtype=dtype)
    self.ln_2 = LayerNorm(width, config.ln_eps, rngs=rngs)
    self.mlp = MLP(width, int(width * config.mlp_ratio), config.act, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, *, causal: bool = False) -> Array:
    x = x + self.attn(self.ln_1(x), causal=causal)
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """A stack of residual blocks (`resblocks`), with the hooks DA-CLIP needs."""

  def __init__(self, width: int, layers: int, heads: int, config: CLIPConfig, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.resblocks = nnx.List([
        ResidualAttentionBlock(width, heads, config, rngs=rngs, dtype=dtype)
        for _ in range(layers)
    ])

  def __call__(self, x: Array, *, causal: bool = False, control: Sequence[Array] | None = None,
               output_hiddens: bool = False, num_blocks: int | None = None
               ) -> Array | tuple[Array, list[Array]]:
    """Runs the blocks on x [B, L, W].

    Args:
      control: optional per-block additive residuals, `control[k]` [B, L, W] is added after block k
        (in THIS order: DaCLIP passes its controller outputs already reversed, spec §1.4).
      output_hiddens: also return the stream after every block.
      num_blocks: run only the first `num_blocks` blocks (SD 2.x's penultimate-layer text states
        never need the last block); None runs them all.

    Returns:
      x, or (x, [x after block k for every block run]) when output_hiddens.
    """
    if control is not None and len(control) != len(self.resblocks):
      raise ValueError(f"control has {len(control)} residuals for {len(self.resblocks)} blocks")
    n = len(self.resblocks) if num_blocks is None else num_blocks
    if not 0 <= n <= len(self.resblocks):
      raise ValueError(f"num_blocks={num_blocks} outside [0, {len(self.resblocks)}]")
    hiddens = []
    for k, block in enumerate(list(self.resblocks)[:n]):
      x = block(x, causal=causal)
      if control is not None:
        x = x + control[k].astype(x.dtype)
      if output_hiddens:
        hiddens.append(x)
    return (x, hiddens) if output_hiddens else x


class VisionOutput(NamedTuple):
  """`VisionTransformer.hidden_states`' result (a pytree; all float32)."""

  hidden_states: tuple[Array, ...]  # L + 1 entries of [B, 1 + G*G, W_v]
  last_hidden_state: Array  # [B, 1 + G*G, W_v], before ln_post
  pooled: Array  # [B, W_v]: ln_post(CLS)
  image_embeds: Array  # [B, E]: pooled @ proj


class VisionTransformer(nnx.Module):
  """open_clip `VisionTransformer`: patch conv, CLS + pos. emb., ln_pre, blocks, ln_post, proj."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    w, p = config.vision_width, config.patch_size
    self.config = config
    self.dtype = dtype
    self.conv1 = nnx.Conv(3, w, kernel_size=(p, p), strides=(p, p), padding="VALID",
                          use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    scale = w ** -0.5
    key = rngs.params()
    k1, k2, k3 = jax.random.split(key, 3)
    self.class_embedding = nnx.Param(scale * jax.random.normal(k1, (w,), jnp.float32))
    self.positional_embedding = nnx.Param(
        scale * jax.random.normal(k2, (config.grid_size ** 2 + 1, w), jnp.float32))
    self.ln_pre = LayerNorm(w, config.ln_eps, rngs=rngs)
    self.transformer = Transformer(w, config.vision_layers, config.vision_heads, config,
                                   rngs=rngs, dtype=dtype)
    self.ln_post = LayerNorm(w, config.ln_eps, rngs=rngs)
    self.proj = nnx.Param(scale * jax.random.normal(k3, (w, config.embed_dim), jnp.float32))

  def tokens(self, images: Array) -> Array:
    """images [B, H, W, 3] (CLIP-normalised) -> ln_pre'd token sequence [B, 1 + G*G, W_v]."""
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"expected images [B, {size}, {size}, 3], got {images.shape}")
    x = self.conv1(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])  # row-major (h, w) patch order, as torch's flatten
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
    return self.ln_pre(x)

  def pool(self, x: Array) -> Array:
    """Token sequence [B, L, W_v] -> CLS -> ln_post -> proj: [B, E]."""
    return self.ln_post(x[:, 0]) @ self.proj[...].astype(x.dtype)

  def hidden_states(self, images: Array, *, num_blocks: int | None = None) -> VisionOutput:
    """images [B, H, W, 3] (CLIP-normalised) -> every layer's token states and the embeddings.

    HF `CLIPVisionModel(..., output_hidden_states=True)` semantics (float32 outputs):
    `hidden_states[0]` is the `ln_pre`'d embedding sequence, `hidden_states[k]` the stream after
    block k (open_clip's `forward_intermediates` without normalisation); `last_hidden_state` the
    last of them, before `ln_post` (TextualDegRemoval's image feature, spec §1.2); `pooled`
    `ln_post` of its CLS token (HF `pooler_output`); `image_embeds` that through `proj` (open_clip
    `encode_image`). `num_blocks` stops after that many blocks (the pooled outputs then come
    from the last block run).
    """
    x0 = self.tokens(images)
    x, hiddens = self.transformer(x0, output_hiddens=True, num_blocks=num_blocks)
    pooled = self.ln_post(x[:, 0])
    embeds = pooled @ self.proj[...].astype(x.dtype)
    f32 = lambda t: t.astype(jnp.float32)
    return VisionOutput(hidden_states=tuple(f32(t) for t in [x0, *hiddens]),
                        last_hidden_state=f32(x), pooled=f32(pooled), image_embeds=f32(embeds))

  def __call__(self, images: Array, *, control: Sequence[Array] | None = None,
               output_hiddens: bool = False) -> Array | tuple[Array, list[Array]]:
    """images [B, H, W, 3] -> pooled [B, E] (and the transformer's per-block list if asked)."""
    out = self.transformer(self.tokens(images), control=control, output_hiddens=output_hiddens)
    if output_hiddens:
      x, hiddens = out
      return self.pool(x), hiddens
    return self.pool(out)


class CLIP(nnx.Module):
  """open_clip `CLIP`: `visual` tower, text tower at the top level, `logit_scale` (log space)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.visual = VisionTransformer(config, rngs=rngs, dtype=dtype)
    w = config.text_width
    self.token_embedding = nnx.Embed(config.vocab_size, w, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    k1, k2 = jax.random.split(rngs.params())
    self.positional_embedding = nnx.Param(
        0.01 * jax.random.normal(k1, (config.context_length, w), jnp.float32))
    self.transformer = Transformer(w, config.text_layers, config.text_heads, config, rngs=rngs,
                                   dtype=dtype)
    self.ln_final = LayerNorm(w, config.ln_eps, rngs=rngs)
    self.text_projection = nnx.Param(
        w ** -0.5 * jax.random.normal(k2, (w, config.embed_dim), jnp.float32))
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def encode_image(self, images: Array, normalize: bool = False) -> Array:
    """images [B, H, W, 3] CLIP-normalised -> [B, E] (float32)."""
    out = self.visual(images).astype(jnp.float32)
    return l2_normalize(out) if normalize else out

  def encode_text(self, ids: Array, normalize: bool = False) -> Array:
    """ids int [B, L<=context_length] -> [B, E] (float32), pooled at argmax(ids) (the EOT token)."""
    if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
      raise ValueError(
          f"expected token ids [B, <={self.config.context_length}], got {ids.shape}")
    ids = ids.astype(jnp.int32)
    x = self.token_embedding(ids).astype(self.dtype)
    x = x + self.positional_embedding[: ids.shape[1]].astype(self.dtype)
    x = self.ln_final(self.transformer(x, causal=True))
    eot = jnp.argmax(ids, axis=-1)  # EOT (49407) is the largest id in the vocabulary
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    out = (pooled @ self.text_projection[...].astype(x.dtype)).astype(jnp.float32)
    return l2_normalize(out) if normalize else out


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """F.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


# ----------------------------------------------------------------------------------------------
# Text-only tower (Stable Diffusion's text encoders).
# ----------------------------------------------------------------------------------------------


def text_layer_index(layer: str | int, num_blocks: int) -> int:
  """"last" | "penultimate" | an index into HF's `hidden_states` (0 = the embeddings, k = after
  block k; negative from the end: -1 = "last", -2 = "penultimate") -> the number of blocks to run
  in a tower of `num_blocks` blocks."""
  n = num_blocks
  named = {"last": n, "penultimate": n - 1}
  if isinstance(layer, str):
    if layer not in named:
      raise ValueError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")
    k = named[layer]
  else:
    k = int(layer) + (n + 1 if int(layer) < 0 else 0)
  if not 0 <= k <= n:
    raise ValueError(f"layer {layer!r} is outside a {n}-block text tower's hidden states "
                     f"(indices {-(n + 1)}..{n})")
  return k


class CLIPTextTower(nnx.Module):
  """The CLIP text transformer alone, as SD uses it: token states, not a pooled embedding.

  The same modules as `CLIP`'s text half (`token_embedding`, `positional_embedding`,
  `transformer.resblocks[i]`, `ln_final`; open_clip names), so both the HF `CLIPTextModel`
  layout (SD 1.x's ViT-L/14; SD 2.x's OpenCLIP ViT-H/14 stored by diffusers as 23 layers) and
  open_clip's convert into it (`uir_jax.convert.sd.load_text_encoder`).

  `config` only needs the text fields; `text_config` builds one from the HF fields.
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config, self.dtype = config, dtype
    w = config.text_width
    self.token_embedding = nnx.Embed(config.vocab_size, w, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.positional_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (config.context_length, w), jnp.float32))
    self.transformer = Transformer(w, config.text_layers, config.text_heads, config, rngs=rngs,
                                   dtype=dtype)
    self.ln_final = LayerNorm(w, config.ln_eps, rngs=rngs)

  def layer_index(self, layer: str | int) -> int:
    """`text_layer_index` for this tower's number of blocks."""
    return text_layer_index(layer, len(self.transformer.resblocks))

  def __call__(self, ids: Array, *, layer: str | int = "last", output_hidden_states: bool = False,
               token_embeddings: tuple[Array, Array] | None = None
               ) -> Array | tuple[Array, list[Array]]:
    """ids int [B, L <= context_length] -> `ln_final` of the chosen layer's token states
    [B, L, W] (float32). `layer="last"`: HF `CLIPTextModel(...).last_hidden_state`, SD 1.x's text
    conditioning and SD 2.x's as diffusers stores it (23 blocks); `"penultimate"`: Stability's
    `FrozenOpenCLIPEmbedder(layer="penultimate")` on a 24-block open_clip tower (the same
    states); an int indexes HF's `hidden_states` (`-(clip_skip + 1)` is diffusers' clip skip).
    Only the blocks up to the chosen layer run.

    With `output_hidden_states`, also HF's `hidden_states` (every block runs): the embeddings,
    then the stream after every block (without `ln_final`).
    `token_embeddings=(positions int [B, K], vectors [B, K, W])` replaces the token embeddings at
    those positions before the position embeddings are added (TextualDegRemoval's pseudo-words).
    """
    stop = self.layer_index(layer)
    if ids.ndim != 2 or ids.shape[1] > self.config.context_length:
      raise ValueError(f"expected token ids [B, <={self.config.context_length}], got {ids.shape}")
    ids = ids.astype(jnp.int32)
    x = self.token_embedding(ids).astype(self.dtype)
    if token_embeddings is not None:
      pos, vec = token_embeddings
      b, k = pos.shape
      if vec.shape != (b, k, x.shape[-1]) or b != ids.shape[0]:
        raise ValueError(f"token_embeddings: positions [B, K] and vectors [B, K, "
                         f"{x.shape[-1]}] with B={ids.shape[0]}, got {pos.shape}, {vec.shape}")
      x = x.at[jnp.arange(b)[:, None], pos].set(vec.astype(x.dtype))
    x = x + self.positional_embedding[: ids.shape[1]].astype(self.dtype)
    _, hiddens = self.transformer(x, causal=True, output_hiddens=True,
                                  num_blocks=None if output_hidden_states else stop)
    hiddens = [x, *hiddens]
    out = self.ln_final(hiddens[stop]).astype(jnp.float32)
    if output_hidden_states:
      return out, [t.astype(jnp.float32) for t in hiddens]
    return out


def text_config(width: int, layers: int, heads: int, mlp_dim: int, *, vocab_size: int = 49408,
                context_length: int = 77, act: str = "quick_gelu",
                ln_eps: float = 1e-5) -> CLIPConfig:
  """A `CLIPConfig` for a `CLIPTextTower` (the vision fields are unused placeholders)."""
  if int(width * (mlp_dim / width)) != mlp_dim:  # the blocks size their MLP by the ratio
    raise ValueError(f"MLP width {mlp_dim} is not representable as {width} x a float ratio")
  return CLIPConfig(embed_dim=width, image_size=1, patch_size=1, vision_width=heads,
                    vision_layers=0, vision_heads=heads, text_width=width, text_layers=layers,
                    text_heads=heads, context_length=context_length, vocab_size=vocab_size,
                    mlp_ratio=mlp_dim / width, act=act, ln_eps=ln_eps)


def vision_config(width: int, layers: int, heads: int, mlp_dim: int, *, patch_size: int,
                  image_size: int, embed_dim: int, act: str = "gelu",
                  ln_eps: float = 1e-5) -> CLIPConfig:
  """A `CLIPConfig` for a `VisionTransformer` alone (the text fields are unused placeholders).

  Heads are not readable off the weights: open_clip's ViT-H/14 has 16 heads of 80 channels."""
  if int(width * (mlp_dim / width)) != mlp_dim:
    raise ValueError(f"MLP width {mlp_dim} is not representable as {width} x a float ratio")
  return CLIPConfig(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size,
                    vision_width=width, vision_layers=layers, vision_heads=heads,
                    text_width=heads, text_layers=0, text_heads=heads, mlp_ratio=mlp_dim / width,
                    act=act, ln_eps=ln_eps)

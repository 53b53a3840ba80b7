"""DA-CLIP: a frozen CLIP steered by a trainable controller (spec §1.4-1.6).

`DaCLIP` holds `clip` (frozen CLIP), `visual_control` (a copy of the vision tower whose transformer
is a `ControlTransformer`: the copied blocks plus one zero-initialised Linear(W_v, W_v) with bias
per block) and its own `logit_scale`. The reference's `visual` attribute is only an alias of
`clip.visual` and is not duplicated here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uir_jax.models.clip import (
  CLIP,
  CLIPConfig,
  Transformer,
  VisionTransformer,
  _dense,
  l2_normalize,
)

Array = jax.Array


class ControlTransformer(nnx.Module):
  """Controller blocks (`transformer`) + `zero_modules`; returns (x, [zero_modules[i](x_i)])."""

  def __init__(self, transformer: Transformer, width: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.transformer = transformer
    # nn.Linear(W, W, 1): the positional 1 is `bias=True`, so each zero module has a bias.
    self.zero_modules = nnx.List([
        _dense(width, width, dtype, rngs, zero=True) for _ in range(len(transformer.resblocks))
    ])

  def __call__(self, x: Array, *, causal: bool = False, control=None,
               output_hiddens: bool = False) -> tuple[Array, list[Array]]:
    """x [B, L, W] -> (x after all blocks, [h_i [B, L, W] for each block i]).

    The controller's own stream is NOT modified by h_i (the reference's add is commented out), and
    the hiddens are always returned (the frozen tower needs them).
    """
    del output_hiddens
    if control is not None:
      raise ValueError("the controller transformer takes no control residuals")
    hiddens = []
    for block, zero in zip(self.transformer.resblocks, self.zero_modules, strict=True):
      x = block(x, causal=causal)
      hiddens.append(zero(x))  # on every token, CLS included
    return x, hiddens


def _is_trainable(path: tuple, value) -> bool:
  return isinstance(value, nnx.Param) and (path[0] == "visual_control" or path == ("logit_scale",))


# nnx filter for the parameters DA-CLIP training updates (spec §1.6 `lock_clip`): all of
# `visual_control` and DaCLIP's own `logit_scale`; everything under `clip` (including
# `clip.logit_scale`) is frozen. Use as `nnx.Optimizer(model, tx, wrt=TRAINABLE)` or
# `nnx.split(model, TRAINABLE, ...)`.
TRAINABLE = _is_trainable


class DaCLIP(nnx.Module):
  """Degradation-aware CLIP.

  Call `encode_image(images, control=True)` -> (content [B, E], degradation [B, E]).
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.clip = CLIP(config, rngs=rngs, dtype=dtype)
    self.visual_control = VisionTransformer(config, rngs=rngs, dtype=dtype)
    self.visual_control.transformer = ControlTransformer(
        self.visual_control.transformer, config.vision_width, rngs=rngs, dtype=dtype)
    self.logit_scale = nnx.Param(jnp.asarray(self.clip.logit_scale[...]))

  def encode_image(self, images: Array, control: bool = True,
                   normalize: bool = False) -> tuple[Array, Array] | Array:
    """images [B, H, W, 3] CLIP-normalised.

    Returns:
      control=True: (content, degradation), each [B, E] float32 (content first, spec §1.5);
      control=False: the plain frozen-CLIP image feature [B, E].
    """
    if not control:
      return self.clip.encode_image(images, normalize=normalize)
    degra, hiddens = self.visual_control(images, output_hiddens=True)
    # The reference adds `control.pop()` after each frozen block: frozen block k receives the
    # controller output of block L-1-k. Released weights were trained with this order (§1.4).
    content = self.clip.visual(images, control=hiddens[::-1])
    content, degra = content.astype(jnp.float32), degra.astype(jnp.float32)
    if normalize:
      content, degra = l2_normalize(content), l2_normalize(degra)
    return content, degra

  def encode_text(self, ids: Array, normalize: bool = False) -> Array:
    """ids int [B, 77] -> [B, E], the frozen CLIP text encoder."""
    return self.clip.encode_text(ids, normalize=normalize)

  def __call__(self, images: Array, caption_ids: Array, degradation_ids: Array) -> dict:
    """The reference `forward` (caption and degradation ids given apart): normalised features."""
    content, degra = self.encode_image(images, control=True, normalize=True)
    return {
        "image_features": content,
        "image_degra_features": degra,
        "text_features": self.encode_text(caption_ids, normalize=True),
        "text_degra_features": self.encode_text(degradation_ids, normalize=True),
        "logit_scale": jnp.exp(self.logit_scale[...]),
    }

  @classmethod
  def from_clip(cls, clip: CLIP, *, reference_init_quirk: bool = True, dtype=jnp.float32,
                rngs: nnx.Rngs | None = None) -> DaCLIP:
    """A DA-CLIP ready for training from a pretrained CLIP (spec §1.6 `initial_controller`).

    The CLIP is copied into `clip`; `visual_control` gets the same vision weights and zero
    modules; `logit_scale` is copied.

    reference_init_quirk=True (default, faithful) reproduces what the reference code actually does:
    its positional zip of parameter lists pairs the pretrained `ln_post` with the first zero module
    and `Tensor.copy_` broadcasts, so `zero_modules[0]` gets weight rows = ln_post.weight and bias =
    ln_post.bias, while the controller's own `ln_post` keeps its default init (weight 1, bias 0).
    Since zero_modules[0] feeds the LAST frozen block, the model is not an exact no-op at step 0.
    False gives the evidently intended init: all zero modules exactly zero and the controller's
    `ln_post` copied from CLIP, so content features equal plain CLIP features at step 0.
    """
    model = cls(clip.config, rngs=rngs or nnx.Rngs(0), dtype=dtype)
    clip_state = nnx.state(clip, nnx.Param)
    nnx.update(model.clip, clip_state)
    vis = nnx.to_pure_dict(nnx.state(clip.visual, nnx.Param))
    ctrl = nnx.to_pure_dict(nnx.state(model.visual_control, nnx.Param))
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "proj"):
      ctrl[name] = vis[name]
    ctrl["transformer"]["transformer"] = vis["transformer"]
    zeros = ctrl["transformer"]["zero_modules"]
    for z in zeros.values():
      z["kernel"] = jnp.zeros_like(z["kernel"])
      z["bias"] = jnp.zeros_like(z["bias"])
    if reference_init_quirk:
      g, b = vis["ln_post"]["scale"], vis["ln_post"]["bias"]
      # torch weight [out, in] with every row = g is the Flax kernel [in, out] with K[i, o] = g[i].
      zeros[0]["kernel"] = jnp.broadcast_to(g[:, None], zeros[0]["kernel"].shape)
      zeros[0]["bias"] = b
      ctrl["ln_post"] = {"scale": jnp.ones_like(g), "bias": jnp.zeros_like(b)}
    else:
      ctrl["ln_post"] = vis["ln_post"]
    ctrl_state = nnx.state(model.visual_control, nnx.Param)
    nnx.replace_by_pure_dict(ctrl_state, ctrl)
    nnx.update(model.visual_control, ctrl_state)
    model.logit_scale[...] = jnp.asarray(clip.logit_scale[...])
    return model


def trainable_state(model: DaCLIP) -> nnx.State:
  """The sub-state DA-CLIP training updates (controller + DaCLIP.logit_scale)."""
  return nnx.state(model, TRAINABLE)

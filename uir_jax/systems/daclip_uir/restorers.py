"""The system's restorers, behind one interface: `embed(images)` -> {content, degradation,
probabilities} (DA-CLIP's reading of the photo; empty without a DA-CLIP) and
`__call__(images, key, embeddings=None)` -> restored images [B, H, W, 3] in [0, 1].

    restorer = DiffusionRestorer.from_checkpoints("daclip_ViT-B-32.pt", "universal-ir.pth")
    restorer = load_run("workdir/quickstart")       # any training run of ours: its EMA weights
    emb = restorer.embed(lq)                         # DA-CLIP once per photo ...
    out = restorer(lq, jax.random.key(0), embeddings=emb)   # ... reused by the restorer

  DiffusionRestorer   DA-CLIP + a conditional denoiser + the IR-SDE sampler (`Restorer`)
  RegressionRestorer  DA-CLIP + a direct NAFNet (one forward pass; the quickstart's restorer)

Design: modules are split once (`nnx.split`) and the pure functions are jitted over
(graphdef, state); the sampler's denoiser is one cached function object per graphdef
(`denoiser.denoiser_eps_fn`), so repeated calls with the same image shape never recompile, and the
weights travel as arguments instead of being baked into the program as constants.

Large images: `diffusion.tiling.tiled_eps_fn` evaluates the denoiser on overlapping tiles at
every sampler step and blends them; the sampler, its noise and the DA-CLIP conditioning stay global.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uir_jax.convert.denoiser import load_denoiser
from uir_jax.denoiser import denoiser_eps_fn, make_eps_fn
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.diffusion.tiling import check_tiling, tile_starts, tiled_eps_fn
from uir_jax.photos import read_rgb, to_uint8
from uir_jax.systems.daclip_uir.conditioning import ClipView, Conditioning

__all__ = ["DiffusionRestorer", "RegressionRestorer", "Restorer", "denoiser_eps_fn",
           "load_denoiser", "load_run", "make_eps_fn", "read_rgb", "tile_starts", "tiled_eps_fn",
           "to_uint8"]

Array = jax.Array


def _check_images(images: Any) -> Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images.shape}")
  return images


class _DaCLIPRestorer:
  """What both restorers share: the optional DA-CLIP conditioning of `net`."""

  net: nnx.Module
  cond: Conditioning | None

  def _init_conditioning(self, net: nnx.Module, daclip: nnx.Module | None,
                         view: ClipView | None, words) -> None:
    self.daclip = daclip
    self.cond = None
    if daclip is not None:
      self.cond = Conditioning(daclip, view, words=words,
                               use_degra=bool(getattr(net, "use_degra_context", True)),
                               use_image=bool(getattr(net, "use_image_context", True)))

  @property
  def words(self) -> list[str]:
    """The zero-shot degradation words of `embed`'s probabilities (empty without a DA-CLIP)."""
    return [] if self.cond is None else list(self.cond.words)

  def embed(self, images: Any) -> dict[str, Array]:
    """DA-CLIP of photos [B, H, W, 3] in [0, 1]: {content, degradation, probabilities}; {}
    without a DA-CLIP."""
    return {} if self.cond is None else self.cond.embed(_check_images(images))

  def conditioning(self, images: Any, embeddings: dict | None = None
                   ) -> tuple[Array | None, Array | None]:
    """(text_context, image_context) = (degradation, content) embeddings the network uses."""
    if self.cond is None:
      return None, None
    return self.cond.contexts(self.embed(images) if embeddings is None else embeddings)


class DiffusionRestorer(_DaCLIPRestorer):
  """LQ images -> restored images with DA-CLIP guidance and IR-SDE sampling.

  Args:
    unet: the conditional denoiser (`ConditionalUNet` or `ConditionalNAFNet`).
    daclip: DA-CLIP model giving the conditioning embeddings; None for unconditional models.
    sde: the IR-SDE (default: the released models' max_sigma 50, T 100, cosine, eps 0.005).
    mode: "posterior" (default, like the reference app), "sde" or "ode" (or the few-step mr*).
    num_steps: network evaluations (< T only for "posterior"; fewer steps = faster).
    tile: if set, the denoiser runs on tiles of at most tile x tile pixels (`tiled_eps_fn`):
      bounded memory for any image size; images that fit in one tile are unaffected.
    tile_overlap: pixels shared by neighbouring tiles (blended with linear ramps).
    tile_batch: tiles per denoiser call (more = faster on an accelerator, more memory).
    pad_multiple: if > 1, images are reflect-padded on the right/bottom to a multiple of this
      before sampling and cropped back after (the U-Net itself pads to a multiple of 8 this way),
      so photos of many sizes share a few compiled samplers instead of one compilation each;
      pixels near the right/bottom border then differ slightly from an exact-size run.
    clip_x0: the sampler's x0 clipping (a training run's `eval.clip_x0`).
    view, words: the DA-CLIP's view of the photo and its zero-shot words (`Conditioning`).
  """

  def __init__(self, unet: nnx.Module, daclip: nnx.Module | None = None, sde: IRSDE | None = None,
               mode: str = "posterior", num_steps: int | None = None, *,
               tile: int | None = None, tile_overlap: int = 32, tile_batch: int = 1,
               pad_multiple: int = 1, clip_x0: bool = False, view: ClipView | None = None,
               words=None):
    self.unet = self.net = unet
    self._init_conditioning(unet, daclip, view, words)
    self.sde = sde or IRSDE()
    self.mode = mode
    self.num_steps = num_steps
    self.clip_x0 = clip_x0
    self.sde.timesteps(num_steps)  # validates num_steps early
    self.tile, self.tile_overlap, self.tile_batch = tile, tile_overlap, tile_batch
    if pad_multiple < 1:
      raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    self.pad_multiple = pad_multiple
    if tile is not None:
      check_tiling(tile, tile_overlap, tile_batch)  # early, before any sampling

  @classmethod
  def from_checkpoints(cls, daclip_path: str | None, unet_path: str, *, trust: bool = False,
                       **kwargs) -> DiffusionRestorer:
    """Builds a restorer from PyTorch files: DA-CLIP `.pt` and the denoiser `.pth` (an IR-SDE
    ConditionalUNet such as `universal-ir.pth`, or a ConditionalNAFNet, told apart by its keys).
    `trust=True` reads them with plain pickle, which runs code from the files."""
    from uir_jax.convert.common import checkpoint_errors

    daclip = None
    if daclip_path is not None:
      from uir_jax.convert.clip import load_daclip

      with checkpoint_errors(daclip_path):  # a refusal names the file that was refused
        daclip = load_daclip(daclip_path, trust=trust)
    with checkpoint_errors(unet_path):
      unet = load_denoiser(unet_path, trust=trust)
    return cls(unet, daclip, **kwargs)

  def __call__(self, images: Array | np.ndarray, key: Array,
               embeddings: dict[str, Any] | None = None) -> Array:
    """Restores a batch [B, H, W, 3] (float in [0, 1]); returns floats clipped to [0, 1].
    `embeddings`: `embed(images)` already computed (else computed here)."""
    images = _check_images(images)
    text_context, image_context = self.conditioning(images, embeddings)  # of the photo as given
    eps_fn, eps_args = make_eps_fn(self.unet, text_context=text_context,
                                   image_context=image_context)
    if self.tile is not None:
      eps_fn = tiled_eps_fn(eps_fn, self.tile, self.tile_overlap, self.tile_batch)
    h, w = images.shape[1:3]
    m = self.pad_multiple
    ph, pw = -h % m, -w % m
    if ph or pw:  # numpy-style reflection, repeated if a pad exceeds the image
      images = jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    out = self.sde.sample(eps_fn, images, key, self.mode, self.num_steps, eps_args=eps_args,
                          clip_x0=self.clip_x0)
    return jnp.clip(out[:, :h, :w], 0.0, 1.0)


Restorer = DiffusionRestorer  # the name of the README and of earlier releases


@functools.cache
def _regression_fn(graphdef: Any):
  @jax.jit
  def restore(state, images, text_context, image_context):
    net = nnx.merge(graphdef, state)
    return jnp.clip(net(images, text_context=text_context, image_context=image_context), 0, 1)

  return restore


class RegressionRestorer(_DaCLIPRestorer):
  """LQ images -> restored images with a direct regression network (NAFNet), optionally DA-CLIP
  conditioned (the DA-CLIP paper's "NAFNet + DA-CLIP", the quickstart's restorer). One forward
  pass; `key` is unused (the interface is the diffusion restorer's).

  Args:
    net: a `NAFNet` (`use_degra_context` / `use_image_context` say which embeddings it takes).
    daclip: its frozen DA-CLIP, None for unconditioned networks.
    view, words: the DA-CLIP's view of the photo and its zero-shot words (`Conditioning`).
  """

  def __init__(self, net: nnx.Module, daclip: nnx.Module | None = None, *,
               view: ClipView | None = None, words=None):
    self.net = net
    self._init_conditioning(net, daclip, view, words)
    self._graphdef, self._state = nnx.split(net)

  def __call__(self, images: Array | np.ndarray, key: Array | None = None,
               embeddings: dict[str, Any] | None = None) -> Array:
    del key  # deterministic
    images = _check_images(images)
    text_context, image_context = self.conditioning(images, embeddings)
    return _regression_fn(self._graphdef)(self._state, images, text_context, image_context)


# ---- Training runs -----------------------------------------------------------------------------

RESTORER_TRAINERS = ("irsde", "nafnet")


def _trainer(workdir: str) -> str | None:
  import json

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("trainer")


def restorer_dir(workdir: str) -> str:
  """The run in `workdir` that holds a restorer: itself, or a quickstart's `2_restorer` stage
  (the quickstart's top workdir holds its stages' runs, each with its config)."""
  from uir_jax.systems.daclip_uir.quickstart import STAGE_DIRS

  stage = os.path.join(workdir, STAGE_DIRS[1])
  if _trainer(workdir) in (None, "quickstart") and _trainer(stage) is not None:
    return stage
  return workdir


def run_trainer(workdir: str) -> str | None:
  """The trainer of the run that holds `workdir`'s restorer (None: not a training run)."""
  return _trainer(restorer_dir(workdir))


def load_run(workdir: str, step: int | None = None, *, trust: bool = False, **kwargs
             ) -> DiffusionRestorer | RegressionRestorer:
  """The restorer a training run of ours trained: its config's network with the EMA weights of
  checkpoint `step` (default: the latest), its frozen DA-CLIP and the CLIP view it read; an
  IR-SDE run samples with its evaluation sampler (`eval.mode`, `eval.num_steps`,
  `eval.clip_x0`; `kwargs` as `DiffusionRestorer`'s override them). A quickstart's top workdir
  gives its stage-2 restorer. Raises ValueError naming the run when it holds no restorer.
  `trust=True` reads a PyTorch DA-CLIP file with plain pickle, which runs code from it."""
  import ml_collections

  from uir_jax.checkpoint import model_from_run, read_training_run
  from uir_jax.systems.daclip_uir.conditioning import load_frozen_daclip, run_words
  from uir_jax.train.common import build_model

  run = restorer_dir(workdir)
  config, state = read_training_run(run, step)
  trainer = config.get("trainer")
  if trainer not in RESTORER_TRAINERS:
    raise ValueError(f"{run}: a {trainer!r} run holds no restorer (trainers "
                     f"{', '.join(RESTORER_TRAINERS)} and quickstart do)")
  cfg = ml_collections.ConfigDict(config)
  net = model_from_run(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), state)
  daclip = None
  if cfg.daclip.checkpoint and (net.use_degra_context or net.use_image_context):
    daclip = nnx.merge(*load_frozen_daclip(cfg.daclip, int(cfg.seed), trust=trust))
  view, words = ClipView.of_config(config), run_words(config)
  if trainer == "nafnet":
    if kwargs:
      raise ValueError(f"{run}: a direct regression run has no sampler settings "
                       f"({', '.join(kwargs)})")
    return RegressionRestorer(net, daclip, view=view, words=words)
  options = dict(mode=cfg.eval.mode, num_steps=cfg.eval.num_steps, clip_x0=bool(cfg.eval.clip_x0))
  options.update(kwargs)
  return DiffusionRestorer(net, daclip, IRSDE(**cfg.sde), view=view, words=words, **options)

"""Latent-diffusion training of Stable Diffusion on the spine: fine-tuning the UNet (or parts of
it), or training a ControlNet beside a frozen UNet.

Per example (randomness from `fold_in(step key, global index)`, so independent of the devices):

  z   = (mean + exp(logvar / 2) · n) · scaling_factor     frozen VAE posterior sample (n ~ N(0, I);
                                                         `sd.latent_sample=False`: the mean)
  c   = text_encoder(ids), with the ids of the empty prompt instead with probability
        `sd.cond_dropout` (classifier-free guidance needs the unconditional model)
  t ~ U{0 … T−1},  ε ~ N(0, I),  z_t = α_t z + σ_t ε     (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t))
  loss = mean over the latent of (model(z_t, t, c [, control]) − target)², target ε (epsilon) or
         v = α_t ε − σ_t z (v_prediction), the process's `prediction_type`

then the mean over the batch (diffusers' train_text_to_image / train_controlnet loss). The VAE and
the text encoder are frozen arrays (`Stage.aux`, sharded like parameters, never checkpointed: they
are reloaded from `sd_path` or rebuilt from the seed); the model is {unet, controlnet?} and
`sd.trainable` names what trains:

  "unet"          the whole UNet
  "controlnet"    a ControlNet (diffusers' `from_unet`: the UNet's encoder copied, zero
                  convolutions), the UNet frozen
  "a.b,c.d"       parameters under these module paths (e.g. "unet.up_blocks.3.attentions"; each
                  must name at least one parameter), everything else frozen

Frozen parameters are the train state's `rest`: carried through every step unchanged, bit for bit.
Options: `sd.remat` "none" | "blocks" (every UNet / ControlNet block recomputed in the backward
pass: activation memory of one block at a time) | "dots" (the whole loss under `jax.checkpoint`
saving only matmul outputs); `dtype` "bfloat16" for bf16 compute (parameters, optimizer state and
EMA stay float32); FSDP over the spine's `config.mesh` ((-1, 8): an SD UNet's Adam state sharded
8 ways). Captions are tokenised on the host (`Stage.prepare`) with the folder's `tokenizer/` (its
pad token: "<|endoftext|>" for SD 1.x, "!" for SD 2.x) or, without `sd_path`, the default CLIP
vocabulary. Evaluation: the same loss on a held-out batch at a fixed draw, with the EMA weights.

    uir-jax train --config configs/sd_finetune.py --workdir runs/sd15 \\
        --config.sd_path=runwayml/stable-diffusion-v1-5 --config.data.root=DIR
    uir-jax train --config configs/sd_controlnet.py:tiny --workdir /tmp/cn   # CPU, seconds
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uir_jax.diffusion import adapters
from uir_jax.diffusion.vp import VPProcess
from uir_jax.models.sd import AutoencoderKL, ControlNet, UNet2DConditionModel
from uir_jax.train import common, loop

TRAINABLE_SETS = ("unet", "controlnet")
REMAT = ("none", "blocks", "dots")
MODULES = ("unet", "controlnet")


class SDTrainModel(nnx.Module):
  """What the stage trains: the UNet and, for ControlNet training, a ControlNet feeding it."""

  def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNet | None = None):
    self.unet, self.controlnet = unet, controlnet

  def __call__(self, sample: jax.Array, timesteps: jax.Array, states: jax.Array,
               control: jax.Array | None = None) -> jax.Array:
    if self.controlnet is None:
      return self.unet(sample, timesteps, states)
    if control is None:
      raise ValueError("a ControlNet model needs the batch's 'control' images")
    down, mid = self.controlnet(sample, timesteps, states, control)
    return self.unet(sample, timesteps, states, down_residuals=down, mid_residual=mid)


# ---- The trainable set ---------------------------------------------------------------------------

def trainable_prefixes(spec: str | Sequence[str]) -> tuple[str, ...]:
  """`sd.trainable` -> module path prefixes ("unet" / "controlnet" are single prefixes)."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  out = tuple(p.strip().strip(".") for p in items if p.strip())
  if not out:
    raise ValueError("sd.trainable is empty: name 'unet', 'controlnet' or module path prefixes")
  for p in out:
    if p.split(".")[0] not in MODULES:
      raise ValueError(f"sd.trainable: {p!r} is not under {' or '.join(MODULES)} (module paths "
                       "look like 'unet.up_blocks.1.attentions')")
  return out


def needs_controlnet(spec: str | Sequence[str]) -> bool:
  return any(p.split(".")[0] == "controlnet" for p in trainable_prefixes(spec))


def path_filter(prefixes: Sequence[str]) -> Callable[[tuple, Any], bool]:
  """nnx filter: Params whose dotted path is one of `prefixes` or lies under one."""
  pre = tuple(prefixes)

  def keep(path: tuple, value: Any) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    name = ".".join(str(k) for k in path)
    return any(name == p or name.startswith(p + ".") for p in pre)

  return keep


def check_prefixes(model: nnx.Module, prefixes: Sequence[str]) -> None:
  """Each prefix must name at least one parameter (a typo must not freeze everything)."""
  names = [".".join(str(k) for k in path)
           for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  for p in prefixes:
    if not any(n == p or n.startswith(p + ".") for n in names):
      near = sorted({".".join(n.split(".")[:3]) for n in names if n.startswith(p.split(".")[0])})
      raise ValueError(f"sd.trainable: {p!r} names no parameter of the model (e.g. "
                       f"{', '.join(near[:6])})")


# ---- Block rematerialisation -------------------------------------------------------------------

_REMAT_CLASSES: dict[type, type] = {}


def _remat_class(cls: type) -> type:
  """A subclass of a block whose call is `jax.checkpoint`ed (the same parameters and paths)."""
  if cls not in _REMAT_CLASSES:
    base = cls.__call__

    def __call__(self, *args, **kwargs):
      graphdef, state = nnx.split(self)

      def run(state, *args):
        return base(nnx.merge(graphdef, state), *args, **kwargs)

      return jax.checkpoint(run)(state, *args)

    _REMAT_CLASSES[cls] = type(f"Remat{cls.__name__}", (cls,),
                               {"__call__": __call__, "__module__": __name__})
  return _REMAT_CLASSES[cls]


def remat_blocks(model: SDTrainModel) -> SDTrainModel:
  """Every down / mid / up block of the UNet and the ControlNet recomputed in the backward pass.
  Applied to the model the loss merges inside the step, so graph definitions and checkpoints are
  those of the plain model."""
  for net in (model.unet, model.controlnet):
    if net is None:
      continue
    blocks = [*net.down_blocks, net.mid_block, *getattr(net, "up_blocks", ())]
    for block in blocks:
      if block is not None and type(block) not in _REMAT_CLASSES.values():
        block.__class__ = _remat_class(type(block))
  return model


# ---- Building and loading ----------------------------------------------------------------------

def _dtype(config: ml_collections.ConfigDict) -> Any:
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  return jnp.dtype(config.dtype)


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def process_of(config: ml_collections.ConfigDict, folder: str | None) -> VPProcess:
  """The noise process: the folder's `scheduler/scheduler_config.json` (or SD's settings), its
  prediction type replaced by `sd.prediction` when set."""
  cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}
  if folder is not None:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"sd_path: no scheduler/scheduler_config.json in {folder}")
    cfg = _read_json(path)
  if config.sd.prediction:
    cfg = dict(cfg, prediction_type=config.sd.prediction)
  return VPProcess.from_config(cfg)


def _tiny_text_config(t: ml_collections.ConfigDict):
  from uir_jax.models.clip import text_config

  return text_config(int(t.width), int(t.layers), int(t.heads), int(t.mlp_dim),
                     context_length=int(t.context_length), act=str(t.act))


class Tokens:
  """Captions -> int32 ids [B, L]: the SD folder's `tokenizer/` as transformers' CLIPTokenizer
  (`tokenizer.load_hf_tokenizer`: its pad token, truncation without a warning, as diffusers'
  training scripts), or without a folder open_clip's tokenizer (SOT, tokens, EOT, zeros)."""

  def __init__(self, folder: str | None, context_length: int):
    from uir_jax import tokenizer

    self.length, self.hf = int(context_length), folder is not None
    self.tok = tokenizer.load_hf_tokenizer(folder) if self.hf else tokenizer.get_tokenizer()

  def __call__(self, captions: Sequence[Any]) -> np.ndarray:
    texts = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
    if self.hf:
      return self.tok(texts, self.length, warn=False).astype(np.int32)
    return self.tok(texts, self.length).astype(np.int32)


def _frozen(module: nnx.Module) -> tuple[Any, Any]:
  graphdef, state = nnx.split(module)
  return graphdef, jax.device_get(state)


def _random_frozen(make: Callable[[], nnx.Module], seed: int) -> tuple[Any, Any]:
  """(graphdef, state) of a random frozen module, drawn with numpy on the host (a jitted random
  init would compile one more program per run): kernels N(0, 1 / fan_in), embeddings N(0, 0.02²),
  position embeddings N(0, 0.01²), norm scales 1, biases 0."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = [n for n in name if n != "value"][-1]
    if name == "scale":
      return np.ones(x.shape, x.dtype)
    if name == "bias":
      return np.zeros(x.shape, x.dtype)
    std = {"embedding": 0.02, "positional_embedding": 0.01}.get(
        name, 1.0 / np.sqrt(max(1, int(np.prod(x.shape[:-1])))))
    return (std * rng.standard_normal(x.shape)).astype(x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


class Parts:
  """What a config names: the model builder, the frozen VAE and text encoder, the tokenizer and
  the process (for `sd_path`, read from the folder; else the config's random tiny SD)."""

  def __init__(self, config: ml_collections.ConfigDict):
    sd, dtype = config.sd, _dtype(config)
    self.prefixes = trainable_prefixes(sd.trainable)
    self.with_controlnet = needs_controlnet(sd.trainable) or bool(sd.controlnet_path)
    impl = str(sd.attention_impl)
    self.folder = None
    if config.sd_path:
      from uir_jax.convert import sd as convert

      self.folder = convert.resolve(config.sd_path)
      if not os.path.isdir(self.folder):
        raise FileNotFoundError(f"sd_path: no such folder: {config.sd_path}")
      unet_cfg = _read_json(os.path.join(self.folder, "unet", "config.json")) \
          if os.path.isfile(os.path.join(self.folder, "unet", "config.json")) else None
      if unet_cfg is None:
        raise FileNotFoundError(f"sd_path: no unet/config.json in {self.folder}")
      self.vae_def, vae_state = _frozen(convert.load_vae(self.folder, dtype=dtype,
                                                         attention_impl=impl))
      self.text_def, text_state = _frozen(convert.load_text_encoder(self.folder, dtype=dtype))
    else:
      t = sd.tiny
      unet_cfg = t.unet.to_dict()
      from uir_jax.models.clip import CLIPTextTower

      self.vae_def, vae_state = _random_frozen(lambda: AutoencoderKL(
          t.vae.to_dict(), rngs=nnx.Rngs(0), dtype=dtype, attention_impl=impl), config.seed + 1)
      self.text_def, text_state = _random_frozen(lambda: CLIPTextTower(
          _tiny_text_config(t.text), rngs=nnx.Rngs(0), dtype=dtype), config.seed + 2)
    self.unet_cfg = unet_cfg
    self.controlnet_cfg = (_read_json(os.path.join(convert.resolve(sd.controlnet_path),
                                                   "config.json"))
                           if sd.controlnet_path else None)
    self.aux = {"vae": vae_state, "text": text_state}
    vae = nnx.merge(self.vae_def, vae_state)
    self.scaling_factor = float(vae.scaling_factor)
    self.vae_factor, self.latent_channels = vae.downsample_factor, vae.config.latent_channels
    self.tokens = Tokens(self.folder, nnx.merge(self.text_def, text_state).config.context_length)
    self.process = process_of(config, self.folder)
    self.dtype, self.impl, self.seed = dtype, impl, config.seed
    self.cond_channels = tuple(int(c) for c in sd.conditioning_embedding_out_channels)

  def build(self) -> SDTrainModel:
    """A random model of the configured shape (traced under jit by the spine)."""
    rngs = nnx.Rngs(self.seed)
    unet = UNet2DConditionModel(self.unet_cfg, rngs=rngs, dtype=self.dtype,
                                attention_impl=self.impl)
    cn = None
    if self.controlnet_cfg is not None:
      cn = ControlNet(self.controlnet_cfg, rngs=rngs, dtype=self.dtype, attention_impl=self.impl)
    elif self.with_controlnet:
      cn = ControlNet.from_unet(unet, conditioning_embedding_out_channels=self.cond_channels,
                                rngs=rngs, attention_impl=self.impl)
    return SDTrainModel(unet, cn)

  def load(self, config: ml_collections.ConfigDict) -> SDTrainModel:
    """The pretrained model (`sd_path`'s UNet; a ControlNet from `sd.controlnet_path` or copied
    from that UNet), on the host."""
    from uir_jax.convert import sd as convert

    unet = convert.load_unet(self.folder, dtype=self.dtype, attention_impl=self.impl)
    cn = None
    if config.sd.controlnet_path:
      cn = convert.load_controlnet(config.sd.controlnet_path, dtype=self.dtype,
                                   attention_impl=self.impl)
    elif self.with_controlnet:
      cn = ControlNet.from_unet(unet, conditioning_embedding_out_channels=self.cond_channels,
                                rngs=nnx.Rngs(self.seed), attention_impl=self.impl)
    return SDTrainModel(unet, cn)


# ---- The loss ----------------------------------------------------------------------------------

def per_example_loss(parts: Parts, model: SDTrainModel, batch: dict, key: jax.Array, aux: Any,
                     *, cond_dropout: float, latent_sample: bool, empty_ids: jax.Array
                     ) -> jax.Array:
  """[B] mean squared error of the model's ε / v against its target (module docstring)."""
  images = batch["image"]
  b, h, w, _ = images.shape
  f = parts.vae_factor
  latent_shape = (h // f, w // f, parts.latent_channels)
  T = parts.process.num_train_timesteps

  def draws(k):
    kt, kn, kz, kd = jax.random.split(k, 4)
    return (jax.random.randint(kt, (), 0, T), jax.random.normal(kn, latent_shape),
            jax.random.normal(kz, latent_shape), jax.random.uniform(kd) < cond_dropout)

  t, noise, z_noise, drop = jax.vmap(draws)(common.example_keys(key, batch["index"]))
  vae = nnx.merge(parts.vae_def, aux["vae"])
  mean, logvar = vae.encode(images * 2.0 - 1.0)
  z = mean + jnp.exp(0.5 * logvar) * z_noise if latent_sample else mean
  z = jax.lax.stop_gradient(z * parts.scaling_factor)
  ids = jnp.where(drop[:, None], empty_ids[None].astype(jnp.int32), batch["ids"])
  states = jax.lax.stop_gradient(nnx.merge(parts.text_def, aux["text"])(ids))
  alpha_t, sigma_t = (jnp.asarray(x, jnp.float32) for x in parts.process.tables())
  alpha, sigma = alpha_t[t][:, None, None, None], sigma_t[t][:, None, None, None]
  z_t = alpha * z + sigma * noise
  prediction = parts.process.prediction
  if prediction == "eps":
    target = noise
  elif prediction == "v":
    target = adapters.velocity(z, noise, alpha, sigma)
  else:
    raise ValueError(f"sd.prediction: the stage trains 'epsilon' or 'v_prediction', got "
                     f"{prediction!r}")
  pred = model(z_t, t, states, batch.get("control"))
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target).reshape(b, -1), axis=1)


# ---- The stage ---------------------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
  sd = config.sd
  if sd.remat not in REMAT:
    raise ValueError(f"sd.remat must be one of {REMAT}, got {sd.remat!r}")
  if not 0.0 <= float(sd.cond_dropout) <= 1.0:
    raise ValueError(f"sd.cond_dropout must be in [0, 1], got {sd.cond_dropout}")
  if config.total_steps <= 0:
    raise ValueError("the sd trainer needs total_steps > 0 (num_epochs is not supported)")


def make_examples(config: ml_collections.ConfigDict, with_control: bool, split: str):
  """`input_pipeline.captioned.Examples` of the training or the held-out split."""
  from input_pipeline import captioned

  d = config.data
  if d.source == "synthetic":
    source = captioned.SyntheticSource(int(d.num_items), int(d.resolution))
  elif d.source == "folder":
    root = d.val_root if split == "eval" and d.val_root else d.root
    source = captioned.folder_source(root, d.captions if root == d.root else "")
  else:
    raise ValueError(f"data.source must be 'folder' or 'synthetic' for the sd trainer, got "
                     f"{d.source!r}")
  control = d.control if with_control else "none"
  if with_control and control == "none":
    raise ValueError("a ControlNet is trained: data.control must name its condition images "
                     f"(one of {captioned.CONTROLS[1:]})")
  return captioned.Examples(source, int(d.resolution), random_flip=bool(d.random_flip),
                            random_crop=bool(d.random_crop), control=control,
                            control_root=d.control_root)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  check_config(config)
  parts = Parts(config)
  sd = config.sd
  f = parts.vae_factor * 2 ** (len(parts.unet_cfg.get("block_out_channels", (0,) * 4)) - 1)
  if config.data.resolution % f:
    raise ValueError(f"data.resolution {config.data.resolution} must be a multiple of {f} (the "
                     "VAE's and the UNet's downsampling)")
  if parts.with_controlnet and 2 ** (len(parts.cond_channels) - 1) != parts.vae_factor:
    raise ValueError(f"sd.conditioning_embedding_out_channels {parts.cond_channels} downsample "
                     f"by {2 ** (len(parts.cond_channels) - 1)}, the VAE by {parts.vae_factor}: "
                     "the condition image would not match the latents")
  trainable = path_filter(parts.prefixes)
  check_prefixes(nnx.eval_shape(parts.build), parts.prefixes)
  empty_ids = parts.tokens([""])[0]
  tx, schedule = loop.make_optimizer(config.optimizer, config.total_steps)
  remat, dropout, latent_sample = sd.remat, float(sd.cond_dropout), bool(sd.latent_sample)

  def losses(model, batch, key, aux, p_drop):
    if remat == "blocks":
      model = remat_blocks(model)
    return per_example_loss(parts, model, batch, key, aux, cond_dropout=p_drop,
                            latent_sample=latent_sample, empty_ids=jnp.asarray(empty_ids))

  def loss_fn(model, batch, key, aux):
    if remat == "dots":
      graphdef, state = nnx.split(model)
      run = jax.checkpoint(
          lambda s, b, k, a: jnp.mean(losses(nnx.merge(graphdef, s), b, k, a, dropout)),
          policy=jax.checkpoint_policies.dots_saveable)
      return run(state, batch, key, aux), {}
    return jnp.mean(losses(model, batch, key, aux, dropout)), {}

  eval_key = loop.step_key(config.seed + 2)
  # The held-out loss at one fixed draw (t, noise, no condition dropout) with the EMA weights.
  eval_losses = jax.jit(lambda graphdef, params, rest, aux, batch: losses(
      nnx.merge(graphdef, params, rest), batch, eval_key, aux, 0.0), static_argnums=0)

  def evaluate(graphdef, params, rest, aux, batch):
    per = np.asarray(loop.to_host(eval_losses(graphdef, params, rest, aux, batch)), np.float64)
    mask = np.asarray(loop.to_host(batch["mask"]), bool) if "mask" in batch else np.ones(
        len(per), bool)
    return {"eval/loss": float(per[mask].mean())}, {}

  def prepare(batch):
    return dict(batch, ids=parts.tokens(list(batch["caption"])))

  with_control = parts.with_controlnet
  train_examples = make_examples(config, with_control, "train")
  eval_examples = make_examples(config, with_control, "eval")

  def batches(*, split=None, train, **kw):
    from input_pipeline import captioned

    examples = eval_examples if split == "eval" else train_examples
    return captioned.batches(examples, train=train, split=split, **kw)

  def initial_state():
    _, params, rest = nnx.split(parts.load(config), trainable, ...)
    return params, rest

  keys = ("image", "ids", "index") + (("control",) if with_control else ())
  return loop.Stage(
      name="sd", build_model=parts.build, loss_fn=loss_fn, batch_keys=keys, optimizer=tx,
      schedule=schedule, trainable=trainable, aux=parts.aux, evaluate=evaluate,
      eval_keys=keys + ("mask",), initial_state=initial_state if parts.folder else None,
      prepare=prepare, batches=batches)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return loop.train(config, workdir, make_stage)

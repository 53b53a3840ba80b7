r"""Stable Diffusion fine-tuning (latent diffusion on image + caption pairs; the `sd` trainer,
`uir_jax/systems/sd/train.py`): the whole UNet by default, or the module paths named in
`sd.trainable`; the VAE and the text encoder frozen.

SD 1.5 (512², ε-prediction) and SD 2.1-base (512², ε-prediction) from diffusers folders (or their
Hugging Face repo ids, found in the local cache); captions from `<image>.txt` beside each image or
a JSON {relative path: caption}:

  uir-jax train --config configs/sd_finetune.py --workdir runs/sd15_ft \
      --config.sd_path=runwayml/stable-diffusion-v1-5 --config.data.root=DIR
  uir-jax train --config configs/sd_finetune.py --workdir runs/sd21b_ft \
      --config.sd_path=stabilityai/stable-diffusion-2-1-base --config.data.root=DIR \
      --config.data.captions=DIR/captions.json --config.mesh="(-1, 8)"
  # only the up-path attentions: --config.sd.trainable=unet.up_blocks.1.attentions,...
  uir-jax train --config configs/sd_finetune.py:tiny --workdir /tmp/sd   # random tiny SD, CPU

Memory: an 860M UNet with AdamW and an EMA is ~14 GB of float32 state: shard it with FSDP
(`mesh=(-1, 8)`), and use `dtype=bfloat16` and `sd.remat=blocks` for the activations.
"""

import ml_collections

from configs import common

# The random tiny SD of `:tiny` (32² images -> 8² latents, width 32; one UNet level: the
# training step's compile dominates the tests' time): diffusers config dicts.
TINY_UNET = dict(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=2, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",))
TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT = dict(width=32, layers=1, heads=2, mlp_dim=64, context_length=16, act="quick_gelu")


def sd_config(trainable: str) -> ml_collections.ConfigDict:
  """The `sd` block: what trains and how (see uir_jax/systems/sd/train.py)."""
  s = ml_collections.ConfigDict()
  s.trainable = trainable  # "unet" | "controlnet" | comma-separated module path prefixes
  s.prediction = ""  # "" = the folder's scheduler prediction_type; "epsilon" | "v_prediction"
  s.cond_dropout = 0.1  # probability of the empty prompt (classifier-free guidance)
  s.latent_sample = True  # VAE posterior sample (diffusers); False: its mean
  s.remat = "none"  # "none" | "blocks" | "dots"
  s.attention_impl = "auto"
  s.controlnet_path = ""  # start the ControlNet from this folder instead of the UNet's copy
  s.conditioning_embedding_out_channels = (16, 32, 96, 256)  # a new ControlNet's (diffusers')
  s.tiny = ml_collections.ConfigDict(dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT))
  return s


def sd_data_config(**overrides) -> ml_collections.ConfigDict:
  """The image + caption stream (input_pipeline/captioned.py)."""
  d = ml_collections.ConfigDict(dict(
      source="folder",  # "folder" | "synthetic"
      root="", captions="",  # folder: images (+ <stem>.txt) and an optional captions JSON
      val_root="",  # held-out images for the evaluation loss ("" = the training folder's first)
      num_items=64,  # synthetic: distinct images
      resolution=512, random_flip=True, random_crop=True,
      control="none",  # ControlNet conditions: "edges" | "gray" | "folder" (control_root)
      control_root="", eval_augment=False))
  d.update(overrides)
  return d


def base(trainable: str, tiny: bool) -> ml_collections.ConfigDict:
  c = common.base("sd")
  c.sd_path = ""  # a diffusers SD folder (or a cached repo id); "" only for :tiny
  c.sd = sd_config(trainable)
  c.data = sd_data_config()
  c.batch_size = 16
  c.total_steps = 20_000
  c.ema_decay = 0.9999
  c.eval_every = 2_000
  c.eval_batch = 16
  c.checkpoint_every = 2_000
  c.optimizer = common.optimizer_config(lr=1e-5, end_lr=1e-5, warmup_steps=500, b2=0.999,
                                        weight_decay=1e-2, grad_clip=1.0)
  if tiny:
    c.total_steps, c.batch_size, c.eval_batch = 4, 8, 8
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 1, 4, 2, 3
    c.ema_decay = 0.99
    c.optimizer.lr = c.optimizer.end_lr = 1e-3
    c.optimizer.warmup_steps = 0
    c.data.source, c.data.resolution, c.data.num_items = "synthetic", 32, 16
    c.sd.conditioning_embedding_out_channels = (8, 16, 32)  # /4: the tiny VAE's factor
  return c


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  return base("unet", v.tiny)

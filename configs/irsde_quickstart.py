r"""Quickstart: IR-SDE restoration training on the embedded photos, on any machine (CPU included).

The photos are scikit-image's bundled colour samples; each training crop is degraded on the fly
by the wild-IR shuffled pipeline (blur, resize, noise, JPEG). The denoiser is a small unconditional
ConditionalUNet (no DA-CLIP: no weights are needed). Launch:

  uir-jax train --config configs/irsde_quickstart.py --workdir workdir/quickstart
  uir-jax train --config configs/irsde_quickstart.py:tiny --workdir /tmp/qs   # seconds, for tests

Override any field: --config.total_steps=2000 --config.batch_size=16
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 600
  c.batch_size = 8  # global batch, split over all devices on the 'data' mesh axis
  c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

  c.data = ml_collections.ConfigDict()
  c.data.source = "quickstart"
  c.data.patch_size = 64
  c.data.gray_prob = 0.1  # wild-IR: 10% of GT crops go grayscale before degradation

  c.sde = ml_collections.ConfigDict(dict(max_sigma=50, T=100, schedule="cosine", eps=0.005))

  c.model = ml_collections.ConfigDict()
  c.model.name = "unet"
  c.model.nf = 16
  c.model.ch_mult = (1, 2, 4)
  c.model.use_image_context = False  # no DA-CLIP in the quickstart
  c.model.use_degra_context = False
  c.model.context_dim = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 5e-4  # the paper uses 2e-4 for 700k steps; a short run can go faster
  c.optimizer.end_lr = 1e-6  # cosine annealing to eta_min, like TrueCosineAnnealingLR
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  c.loss = "l1"
  c.ema_decay = 0.995

  c.log_every = 25
  c.eval_every = 300
  c.eval_batch = 4
  c.eval_sampling_steps = 20  # posterior sampling on a subsequence: 5x fewer calls than T=100
  c.eval_mode = "posterior"
  # Clamp x̂_0 to [0, 1] while sampling (not in the reference): a briefly trained denoiser's
  # errors are otherwise amplified up to 1/m_T = 200x at the first steps.
  c.eval_clip_x0 = True
  c.checkpoint_every = 300
  c.keep_checkpoints = 2

  if arg == "tiny":
    c.total_steps = 6
    c.batch_size = 8  # divisible by the 8 fake devices the tests use
    c.data.patch_size = 32
    c.model.nf = 16
    c.model.ch_mult = (1, 2)
    c.log_every = 2
    c.eval_every = 6
    c.eval_batch = 2
    c.eval_sampling_steps = 3
    c.checkpoint_every = 3
  elif arg:
    raise ValueError(f"unknown variant {arg!r} for irsde_quickstart (expected '' or 'tiny')")
  return c

r"""Quickstart: the whole system on the photos embedded in the package, on any machine.

Six synthetic degradation types (noisy, blurry, jpeg-compressed, low-light, hazy, low-resolution;
`common.SYNTHETIC_TASKS`) are applied on the fly to crops of scikit-image's bundled photos; two
photos (`common.QUICKSTART_HOLDOUT`) are held out and only used for evaluation.
  stage 1: a DA-CLIP controller on a small random frozen CLIP learns the six types;
  stage 2: a NAFNet conditioned on that DA-CLIP (degradation prompt + content cross-attention)
           learns to restore them;
  then a report on held-out crops: report.md / report.json, grids per type, the confusion matrix.

  uir-jax train --config configs/quickstart.py --workdir workdir/quickstart
  uir-jax train --config configs/quickstart.py:tiny --workdir /tmp/q   # seconds, for tests

The same command resumes an interrupted run without redoing a finished stage. Override any
field, e.g. --config.stage2.total_steps=3000.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.trainer = "quickstart"
  c.seed = 0
  # Fields the launcher reads before the stages start (each stage has its own as well).
  c.distributed = common.base("quickstart").distributed
  c.total_steps = 0  # (see the stages)

  tasks = common.SYNTHETIC_TASKS
  names = tuple(name for name, _ in tasks)

  s1 = common.base("daclip")
  s1.seed = c.seed
  s1.total_steps = 500
  s1.batch_size = 32
  s1.ema_decay = 0.0
  # The CLIP views are the LQ's full-resolution 32-px centre (a resize to 32 px would blur away
  # the noise, blocks and softness that tell the types apart), for a random 4-px-patch tiny CLIP.
  s1.data = common.data_config("quickstart", patch_size=64, tasks=tasks, clip_lq=True,
                               clip_size=32, clip_view="crop", holdout=common.QUICKSTART_HOLDOUT,
                               eval_augment=True)
  s1.clip = common.clip_config(arch="tiny-p4", exact_noop_start=True)
  s1.clip.checkpoint = "random:tiny-p4"
  s1.contrastive = common.daclip_loss_config(robust=False)
  s1.optimizer = common.optimizer_config(lr=2e-3, end_lr=1e-5, warmup_steps=10, b1=0.9, b2=0.98,
                                         eps=1e-6, weight_decay=0.05)
  s1.eval = common.daclip_eval_config(names)
  s1.eval_batch = 96
  s1.log_every = 50
  s1.eval_every = 500
  s1.checkpoint_every = 500
  s1.keep_checkpoints = 1
  c.stage1 = s1

  s2 = common.base("nafnet")
  s2.seed = c.seed
  s2.total_steps = 1000
  s2.batch_size = 8
  s2.loss = "psnr"
  s2.ema_decay = 0.99
  s2.data = common.data_config("quickstart", patch_size=48, tasks=tasks, clip_lq=True,
                               clip_size=32, clip_view="crop", holdout=common.QUICKSTART_HOLDOUT,
                               eval_augment=True)
  s2.model = common.nafnet_config(width=16, middle_blk_num=1, enc_blk_nums=(1, 1, 2),
                                  dec_blk_nums=(1, 1, 1), context_dim=64,
                                  use_degra_context=True, use_image_context=True,
                                  global_color=True)
  s2.daclip.checkpoint = ""  # set to stage 1's workdir by the quickstart trainer
  # The controller reads 32-px full-resolution windows: average its embeddings over windows
  # tiling the LQ (2 x 2 on a 48-px patch, 3 x 3 on a 96-px report crop) rather than trusting
  # the centre alone (a dark centre would read "low-light" and be brightened).
  s2.daclip.windows = True
  s2.optimizer = common.optimizer_config(lr=2e-3, end_lr=1e-5, warmup_steps=50, b1=0.9, b2=0.99,
                                         grad_clip=1.0)
  s2.eval_batch = 16
  s2.log_every = 100
  s2.eval_every = 1000
  s2.checkpoint_every = 300
  s2.keep_checkpoints = 1
  c.stage2 = s2

  c.report = ml_collections.ConfigDict(dict(patch_size=96, num_crops=192, min_gt_std=0.02,
                                            grid_rows=4))
  if v.tiny:
    for s in (s1, s2):
      s.total_steps, s.log_every, s.eval_every, s.checkpoint_every = 2, 1, 2, 1
      s.batch_size, s.eval_batch = 8, 8
      s.data.patch_size = 32
    c.report.patch_size, c.report.num_crops = 48, 24
  return c

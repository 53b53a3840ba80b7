r"""DA-CLIP ViT-B/32: the released `daclip_ViT-B-32.pt` run (DA-CLIP paper §4, spec §1.8).

A frozen LAION-2B ViT-B/32 CLIP with a trained controller, on DA-CLIP's captions CSV of the
ten-task universal set (`title` = "caption: degradation"); batch 784 per GPU x 4 = 3136, AdamW
lr 3e-5, β (0.9, 0.98), eps 1e-6, weight decay 0.05 (matrices only), 100 warmup steps then cosine
to 0, 50 epochs. Faithful to the reference: the reference's controller initialisation quirk, and
a degradation text repeated in a batch enters the softmax once per image
(`contrastive.distinct_texts=False`).

  uir-jax train --config configs/daclip_vitb32.py --workdir runs/daclip \
      --config.data.csv_path=datasets/universal/daclip_train.csv \
      --config.clip.checkpoint=open_clip_vit_b32_laion2b_s34b_b79k.bin
  uir-jax train --config configs/daclip_vitb32.py:tiny --workdir /tmp/d   # CPU, seconds
"""

from configs import common
from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("daclip")
  c.batch_size = 784 * 4
  c.total_steps = -1  # 50 epochs of the CSV
  c.num_epochs = 50
  c.ema_decay = 0.0  # the reference evaluates the trained weights themselves
  c.data = common.data_config("csv", csv_path="datasets/universal/daclip_train.csv",
                              patch_size=224, clip_lq=True)
  c.clip = common.clip_config(arch="ViT-B-32", exact_noop_start=False)
  c.contrastive = common.daclip_loss_config(robust=False)
  c.optimizer = common.optimizer_config(lr=3e-5, end_lr=0.0, warmup_steps=100, b1=0.9, b2=0.98,
                                        eps=1e-6, weight_decay=0.05)
  c.eval = common.daclip_eval_config(DEGRADATION_WORDS)
  c.eval_batch = 256
  c.eval_every = 1000
  c.checkpoint_every = 1000
  if v.tiny:
    common.shrink_for_tests(c)
    c.clip.arch, c.clip.checkpoint = "tiny", "random:tiny"
    c.data.tasks = common.SYNTHETIC_TASKS
    c.data.holdout = common.QUICKSTART_HOLDOUT
    c.eval.words = tuple(name for name, _ in common.SYNTHETIC_TASKS)
    c.optimizer.warmup_steps = 1
  return c

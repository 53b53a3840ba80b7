r"""Robust (wild) DA-CLIP ViT-L/14: the wild-IR paper's `wild-daclip_ViT-L-14.pt` recipe (§3.3).

A frozen ViT-L/14 CLIP with a trained controller on clean photos (the paper: LSDIR, captions
from BLIP on the clean images, given here as a JSON {relative path: caption}), degraded on the
fly by the wild chain; each image's degradation text combines the words of the degradations the
chain applied; an L1 term pulls the LQ content embedding to the frozen CLIP's embedding of the
clean image. The paper gives no optimizer settings: ours are DA-CLIP's (lr 3e-5, β (0.9, 0.98),
eps 1e-6, wd 0.05, 100 warmup steps, cosine, 50 epochs) at batch 1024. New-config default:
the exact no-op controller start (`contrastive.distinct_texts` stays off: the reference's loss).

  uir-jax train --config configs/daclip_vitl14_wild.py --workdir runs/wild-daclip \
      --config.data.root=datasets/lsdir/train/GT_sharp --config.data.captions=lsdir_captions.json \
      --config.clip.checkpoint=openai_vit_l14.pt
  uir-jax train --config configs/daclip_vitl14_wild.py:tiny --workdir /tmp/dw   # CPU, seconds
"""

import itertools

from configs import common

# The chain's words (input_pipeline.degradations.DEGRADATION_WORDS) and every combination of
# them, in the format the pipeline writes ("blur, noise"; "" = nothing applied).
WILD_WORDS = ("blur", "ringing artifact", "noise", "jpeg block")
WILD_VOCABULARY = tuple(", ".join(c) for n in range(len(WILD_WORDS) + 1)
                        for c in itertools.combinations(WILD_WORDS, n))


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("daclip")
  c.batch_size = 1024
  c.total_steps = -1
  c.num_epochs = 50
  c.ema_decay = 0.0
  c.data = common.data_config("folder", root="datasets/lsdir/train/GT_sharp", patch_size=256,
                              captions="datasets/lsdir/captions.json", chain="wild",
                              clip_lq=True, clip_gt=True)
  c.clip = common.clip_config(arch="ViT-L-14", exact_noop_start=True)
  c.contrastive = common.daclip_loss_config(robust=True)
  c.optimizer = common.optimizer_config(lr=3e-5, end_lr=0.0, warmup_steps=100, b1=0.9, b2=0.98,
                                        eps=1e-6, weight_decay=0.05)
  c.eval = common.daclip_eval_config(WILD_VOCABULARY)
  c.eval_batch = 256
  c.eval_every = 1000
  c.checkpoint_every = 1000
  if v.tiny:
    common.shrink_for_tests(c)
    c.clip.arch, c.clip.checkpoint = "tiny", "random:tiny"
    c.data.captions = ""
    c.data.holdout = common.QUICKSTART_HOLDOUT
    c.optimizer.warmup_steps = 1
  return c

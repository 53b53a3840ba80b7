r"""Wild IR (the wild-IR paper, `wild-ir.pth`): IR-SDE + robust ViT-L/14 DA-CLIP on clean photos
degraded on the fly by the shuffled wild chain.

Clean images under `data.root` (the paper: LSDIR), 256² crops, 10% turned gray, then the wild
chain (blur / resize / noise / JPEG stages in random orders, spec §7.2); a ConditionalUNet with
768-d content cross-attention and no degradation prompt (`use_degra_context=False`, `scale 0.5`);
batch 16, AdamW 2e-4, β (0.9, 0.99), cosine to 1e-6 over 500k steps; posterior-sampling
evaluation every 5k steps (spec §8.1).

  uir-jax train --config configs/irsde_wild.py --workdir runs/wild-ir \
      --config.data.root=datasets/lsdir/train/GT_sharp \
      --config.daclip.checkpoint=pretrained/wild-daclip_ViT-L-14.pt
  uir-jax train --config configs/irsde_wild.py:tiny --workdir /tmp/w   # CPU, seconds
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("irsde")
  c.total_steps = 500_000
  c.eval_every = 5_000
  c.data = common.data_config("folder", root="datasets/lsdir/train/GT_sharp", patch_size=256,
                              gray_prob=0.1, chain="wild", clip_lq=True)
  c.sde = common.sde_config()
  c.model = common.unet_config(context_dim=768, use_degra_context=False, use_image_context=True,
                               scale=0.5)
  c.daclip.checkpoint = "pretrained/wild-daclip_ViT-L-14.pt"
  c.eval = common.eval_config("posterior")
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.nf, c.model.ch_mult = 8, (1, 2)
    c.eval.num_steps = 3
  return c

r"""Universal IR (DA-CLIP paper, "IR-SDE + DA-CLIP"): the released `universal-ir.pth` run.

A ConditionalUNet (nf 64, ch_mult 1-2-4-8, cross-attention on the 512-d content embedding, the
degradation embedding as a prompt) trained with the IR-SDE maximum-likelihood loss on the
ten-task set `datasets/universal/{train,val}/<degradation>/{LQ,GT}`, class-balanced, 256² crops
with flips / rotations, batch 16; AdamW 2e-4, β (0.9, 0.99), cosine to 1e-6 over 700k steps, no
warmup; EMA 0.995; posterior-sampling PSNR on held-out crops every 10k steps (spec §8.1). The
frozen DA-CLIP reads the 224² CLIP view of each LQ crop inside the step.

  uir-jax train --config configs/irsde_daclip_universal.py --workdir runs/universal-ir \
      --config.data.root=datasets/universal --config.daclip.checkpoint=pretrained/daclip_ViT-B-32.pt
  # 8 GPUs with parameters sharded in groups of 4 (FSDP), or a TPU pod (one process per host):
  uir-jax train --config configs/irsde_daclip_universal.py --workdir runs/u --config.mesh='(-1, 4)'
  uir-jax train --config configs/irsde_daclip_universal.py:tiny --workdir /tmp/u  # CPU, seconds
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("irsde")
  c.data = common.data_config("universal", root="datasets/universal", patch_size=256,
                              clip_lq=True)
  c.sde = common.sde_config()
  c.model = common.unet_config(context_dim=512, use_degra_context=True, use_image_context=True)
  c.daclip.checkpoint = "pretrained/daclip_ViT-B-32.pt"
  c.eval = common.eval_config("posterior")
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.nf, c.model.ch_mult = 8, (1, 2)
    c.eval.num_steps = 3
  return c

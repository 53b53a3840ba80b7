r"""IR-SDE baseline without DA-CLIP (the "IR-SDE" row of the DA-CLIP paper's universal tables).

The universal set and schedule of `irsde_daclip_universal.py` with an unconditioned U-Net
(no cross-attention, no prompt; so no CLIP view of the LQ is made).

  uir-jax train --config configs/irsde.py --workdir runs/irsde --config.data.root=datasets/universal
  uir-jax train --config configs/irsde.py:tiny --workdir /tmp/i   # CPU, seconds
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("irsde")
  c.data = common.data_config("universal", root="datasets/universal", patch_size=256)
  c.sde = common.sde_config()
  c.model = common.unet_config(context_dim=0, use_degra_context=False, use_image_context=False)
  c.eval = common.eval_config("posterior")
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.nf, c.model.ch_mult = 8, (1, 2)
    c.eval.num_steps = 3
  return c

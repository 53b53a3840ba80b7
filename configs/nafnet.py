r"""NAFNet baseline without DA-CLIP (the "NAFNet" row of the DA-CLIP paper's Table 3).

  uir-jax train --config configs/nafnet.py --workdir runs/nafnet \
      --config.data.root=datasets/universal
  uir-jax train --config configs/nafnet.py:tiny --workdir /tmp/n0   # CPU, seconds
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("nafnet")
  c.loss = "psnr"
  c.data = common.data_config("universal", root="datasets/universal", patch_size=256)
  c.model = common.nafnet_config(context_dim=0, use_degra_context=False, use_image_context=False)
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.width, c.model.middle_blk_num = 8, 1
    c.model.enc_blk_nums, c.model.dec_blk_nums = (1, 1), (1, 1)
  return c

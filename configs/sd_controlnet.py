r"""A ControlNet for Stable Diffusion (diffusers' `ControlNetModel.from_unet`: the UNet's encoder
copied, zero convolutions), trained beside the frozen UNet, VAE and text encoder (the `sd`
trainer, `uir_jax/systems/sd/train.py`). The condition images: Sobel edges of each image
(`data.control=edges`), its luma (`gray`), or a folder of images with the same relative paths
(`folder`, `data.control_root`).

  uir-jax train --config configs/sd_controlnet.py --workdir runs/sd15_cn \
      --config.sd_path=runwayml/stable-diffusion-v1-5 --config.data.root=DIR
  uir-jax train --config configs/sd_controlnet.py --workdir runs/sd21b_cn \
      --config.sd_path=stabilityai/stable-diffusion-2-1-base --config.data.root=DIR \
      --config.data.control=folder --config.data.control_root=CONDITIONS
  uir-jax train --config configs/sd_controlnet.py:tiny --workdir /tmp/cn   # random tiny SD, CPU
"""

from configs import common
from configs.sd_finetune import base


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = base("controlnet", v.tiny)
  c.data.control = "edges"
  c.optimizer.lr = c.optimizer.end_lr = 1e-3 if v.tiny else 1e-5
  return c

r"""NAFNet + DA-CLIP (the DA-CLIP paper's second row, Table 3): direct regression, one forward pass.

A NAFNet (width 32, 12 middle blocks, encoders 2-2-4-8) whose blocks take the degradation
embedding as a scale/shift prompt and whose middle blocks cross-attend to the content
embedding, trained on the ten-task universal set with NAFNet's PSNR loss ("MSE-based", paper
§5.2). The paper gives no NAFNet schedule: we use its restoration settings (batch 16, 256²
crops, AdamW 2e-4, β (0.9, 0.99), cosine to 1e-6 over 700k steps).

  uir-jax train --config configs/nafnet_daclip.py --workdir runs/nafnet-daclip \
      --config.data.root=datasets/universal --config.daclip.checkpoint=pretrained/daclip_ViT-B-32.pt
  uir-jax train --config configs/nafnet_daclip.py:tiny --workdir /tmp/n   # CPU, seconds
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("nafnet")
  c.loss = "psnr"
  c.data = common.data_config("universal", root="datasets/universal", patch_size=256,
                              clip_lq=True)
  c.model = common.nafnet_config(context_dim=512, use_degra_context=True, use_image_context=True)
  c.daclip.checkpoint = "pretrained/daclip_ViT-B-32.pt"
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.width, c.model.middle_blk_num = 8, 1
    c.model.enc_blk_nums, c.model.dec_blk_nums = (1, 1), (1, 1)
  return c

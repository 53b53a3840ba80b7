r"""TextualDegRemoval, motion deblurring: the guided NAFNet (width 64) on GoPro (paper Table 2,
"Ours-NAFNet" 33.97 dB; suppl. "Single-image motion deblurring").

Paper: AdamW + cosine, initial rates 1e-4 (NAFNet) / 5e-5 (dynamic aggregation = the guidance
module), patch 256, batch 16 (8 GPUs). It states no length; 1M steps as the released YAMLs.
Data: GoPro's `train/{blur,sharp}/<sequence>/<frame>.png` (test split `test/`) and one guidance
image per blurry photo under `<guidance_root>/<split>/<sequence>/<frame>.*` (generated offline by
the text half; until then any image can serve). Crops of LQ, GT and guidance are the same box
(`input_pipeline/guidance.py`); photos without guidance are skipped and counted.

  uir-jax train --config configs/tdr_nafnet_gopro.py --workdir runs/tdr_nafnet_gopro \
      --config.data.root=datasets/GoPro --config.data.guidance_root=datasets/GoPro_guidance
  uir-jax train --config configs/tdr_nafnet_gopro.py:tiny --workdir /tmp/tdr0   # CPU, seconds

Variant `fusion`: "encoder+bottleneck" (default: the released code, what its checkpoints hold) or
"encoder+decoder" (the paper's best ablation),
e.g. `configs/tdr_nafnet_gopro.py:fusion=encoder+decoder`.
"""

from configs import common

# :tiny's stand-in for motion blur: a blur of the embedded photos.
TINY_TASKS = (("blurry", [{"op": "blur", "max_radius": 5, "sinc_prob": 0.0, "deblur_prob": 0.0,
                           "blur_range": [1.5, 3.0]}]),)


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False, fusion="encoder+bottleneck")
  c = common.base("tdr")
  c.total_steps = 1_000_000
  c.batch_size = 16
  c.eval_every = 10_000
  c.data = common.guided_data_config("paired", root="datasets/GoPro", split="train",
                                     val_split="test", lq_folder="blur", gt_folder="sharp",
                                     guidance_root="datasets/GoPro_guidance", patch_size=256)
  c.model = common.guided_nafnet_config(width=64, fusion=v.fusion)
  c.optimizer = common.guided_optimizer_config(lr=1e-4, guidance_lr=5e-5)
  if v.tiny:
    common.shrink_guided_for_tests(c, TINY_TASKS)
    common.shrink_guided_nafnet(c.model)
  return c

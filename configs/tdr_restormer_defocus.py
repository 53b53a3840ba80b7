r"""TextualDegRemoval, single-image defocus deblurring: the guided Restormer on DPDD's centre views
(paper Tables 2-3; suppl. "Defocus deblurring").

Paper: AdamW + cosine, initial rates 3e-4 (Restormer) / 1e-4 (the guidance module), Restormer's
progressive learning. Progressive patch sizes are not implemented here: one patch size, 384 at
batch 32, and 1M steps, the released YAMLs' values where the paper states none. The dual-pixel
(6-channel L|R) variant is not offered: the guided Restormer has no dual-pixel mode.
Data: DPDD `train_c/{source,target}/*.png` (validation `val_c/`), one guidance image per blurry
photo under `<guidance_root>/<split>/<name>.*`; crops of LQ, GT and guidance are the same box
(`input_pipeline/guidance.py`), photos without guidance are skipped and counted.

  uir-jax train --config configs/tdr_restormer_defocus.py --workdir runs/tdr_defocus \
      --config.data.root=datasets/dd_dp_dataset_png \
      --config.data.guidance_root=datasets/DPDD_guidance
  uir-jax train --config configs/tdr_restormer_defocus.py:tiny --workdir /tmp/tdr2   # CPU

Variant `fusion`: "encoder+bottleneck" (default, the released code) or "encoder+decoder".
"""

from configs import common

# :tiny's stand-in for defocus: a disc-like blur of the embedded photos.
TINY_TASKS = (("defocus-blurry", [{"op": "blur", "max_radius": 5, "sinc_prob": 0.0,
                                   "deblur_prob": 0.0, "blur_range": [2.0, 3.0]}]),)


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False, fusion="encoder+bottleneck")
  c = common.base("tdr")
  c.total_steps = 1_000_000
  c.batch_size = 32
  c.data = common.guided_data_config("paired", root="datasets/dd_dp_dataset_png",
                                     split="train_c", val_split="val_c", lq_folder="source",
                                     gt_folder="target", guidance_root="datasets/DPDD_guidance",
                                     patch_size=384)
  c.model = common.guided_restormer_config("restormer", v.fusion)
  c.optimizer = common.guided_optimizer_config(lr=3e-4, guidance_lr=1e-4)
  if v.tiny:
    common.shrink_guided_for_tests(c, TINY_TASKS)
    common.shrink_guided_restormer(c.model)
  return c

r"""TextualDegRemoval, all-in-one restoration (three tasks: denoising, deraining, dehazing): the
guided PromptIR, the paper's main result (Table 1: PromptIR 32.06 dB average -> 32.56 dB).

Paper (suppl.): PromptIR, 8 stages [4, 6, 6, 8] + 4 refinement blocks, width 48, heads
[1, 2, 4, 8]; AdamW + cosine, initial rates 2e-4 (PromptIR) / 1e-4 (the guidance module),
patch 128, batch 48 (4 GPUs). No length is stated; 1M steps as the released YAMLs.
Data: the ten-task layout with the three tasks, `<root>/train/{noisy,rainy,hazy}/{LQ,GT}/*`
(noisy: BSD400 + WED with Gaussian noise of sigma 15 / 25 / 50 made beforehand; rainy:
Rain100L; hazy: SOTS), sampled class-balanced, and one guidance image per LQ photo under
`<guidance_root>/train/<task>/<name>.*`; crops of LQ, GT and guidance are the same box
(`input_pipeline/guidance.py`), photos without guidance are skipped and counted.

  uir-jax train --config configs/tdr_promptir_allinone.py --workdir runs/tdr_allinone \
      --config.data.root=datasets/allinone --config.data.guidance_root=datasets/allinone_guidance
  uir-jax train --config configs/tdr_promptir_allinone.py:tiny --workdir /tmp/tdr3   # CPU

`:tiny` degrades the embedded photos on the fly with noise, haze and JPEG (no rain synthesiser
exists here; JPEG stands in for the third task). Variant `fusion`: "encoder+bottleneck"
(default, the released code) or "encoder+decoder".
"""

from configs import common

TINY_TASKS = (
    ("noisy", [{"op": "gaussian_noise", "sigma_range": [15.0, 50.0], "gray_prob": 0.0}]),
    ("hazy", [{"op": "haze"}]),
    ("jpeg-compressed", [{"op": "jpeg", "quality_range": [8, 20]}]),
)


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False, fusion="encoder+bottleneck")
  c = common.base("tdr")
  c.total_steps = 1_000_000
  c.batch_size = 48
  c.data = common.guided_data_config("universal", root="datasets/allinone",
                                     guidance_root="datasets/allinone_guidance", patch_size=128)
  c.model = common.guided_restormer_config("promptir", v.fusion)
  c.optimizer = common.guided_optimizer_config(lr=2e-4, guidance_lr=1e-4)
  if v.tiny:
    common.shrink_guided_for_tests(c, TINY_TASKS)
    common.shrink_guided_restormer(c.model)
  return c

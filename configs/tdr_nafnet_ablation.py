r"""TextualDegRemoval's ablation protocol: the guided NAFNet of width 32 on GoPro for 30k steps
(the paper's ablations, spec §1.9: baseline NAFNet-32 30.16 dB, guided 31.57 dB at N = 20 words).

Rates and batch as the motion-deblurring setting (AdamW + cosine, 1e-4 / 5e-5 for the backbone /
the guidance module, patch 256, batch 16); the data layout as `configs/tdr_nafnet_gopro.py`.

  uir-jax train --config configs/tdr_nafnet_ablation.py --workdir runs/tdr_ablation \
      --config.data.root=datasets/GoPro --config.data.guidance_root=datasets/GoPro_guidance
  uir-jax train --config configs/tdr_nafnet_ablation.py:tiny --workdir /tmp/tdr1   # CPU, seconds

Variant `fusion`: "encoder+decoder" (default: the paper's best row, Enc. & Dec.) or
"encoder+bottleneck" (the released code; the Enc. row),
e.g. `configs/tdr_nafnet_ablation.py:fusion=encoder+bottleneck`.
"""

from configs import common, tdr_nafnet_gopro


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False, fusion="encoder+decoder")
  c = tdr_nafnet_gopro.get_config(None)
  c.total_steps = 30_000
  c.eval_every = 5_000
  c.checkpoint_every = 5_000
  c.model = common.guided_nafnet_config(width=32, fusion=v.fusion)
  if v.tiny:
    common.shrink_guided_for_tests(c, tdr_nafnet_gopro.TINY_TASKS)
    common.shrink_guided_nafnet(c.model)
  return c

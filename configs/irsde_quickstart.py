r"""Quickstart: IR-SDE restoration training on the embedded photos, on any machine (CPU included).

The photos are scikit-image's bundled colour samples; each training crop is degraded on the fly
by the wild-IR shuffled chain (blur, resize, noise, JPEG). The denoiser is a small unconditioned
ConditionalUNet (no DA-CLIP: no weights are needed). Launch:

  uir-jax train --config configs/irsde_quickstart.py --workdir workdir/quickstart
  uir-jax train --config configs/irsde_quickstart.py:tiny --workdir /tmp/qs   # seconds, for tests

Override any field: --config.total_steps=2000 --config.batch_size=16
"""

from configs import common


def get_config(arg: str | None = None):
  v = common.parse_arg(arg, tiny=False)
  c = common.base("irsde")
  c.total_steps = 600
  c.batch_size = 8
  c.data = common.data_config("quickstart", patch_size=64, gray_prob=0.1)
  c.sde = common.sde_config()
  c.model = common.unet_config(nf=16, ch_mult=(1, 2, 4), context_dim=0, use_degra_context=False,
                               use_image_context=False)
  # The paper uses 2e-4 for 700k steps; a short run can go faster.
  c.optimizer = common.optimizer_config(lr=5e-4, grad_clip=1.0)
  c.log_every = 25
  c.eval_every = 300
  c.eval_batch = 4
  # Posterior sampling on a subsequence (5x fewer calls than T = 100), x̂₀ clamped to [0, 1] (not
  # in the reference): a briefly trained denoiser's errors are otherwise amplified up to 200x.
  c.eval = common.eval_config("posterior", num_steps=20, clip_x0=True)
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  if v.tiny:
    common.shrink_for_tests(c)
    c.model.ch_mult = (1, 2)
    c.eval.num_steps = 3
  return c

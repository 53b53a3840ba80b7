"""Noise processes, solvers over (α_t, σ_t) tables, the one sampling loop, adapters and tiling.

  vp.py        DDPM / Stable Diffusion's discrete VP process, its timesteps and samplers (DDIM,
               DPM-Solver++(2M), UniPC), equal to diffusers' schedulers
  irsde.py     the IR-SDE process: schedule, marginals, ML target, its samplers (`IRSDE.sample`)
  solvers.py   process-agnostic steps on (α_t, σ_t): posterior step, multistep exponential
               integrator (DDIM / DPM-Solver++(2M) / 3rd order, ODE and SDE), DDIM with η, UniPC,
               as loop solvers
  loop.py      `sample_loop`: the one jitted `lax.scan` over process + solver + model function
  adapters.py  prediction types (ε / x0 / v) and classifier-free guidance around any model function
  tiling.py    a denoiser evaluated on overlapping tiles (bounded memory at any image size)

Imports no models, systems or train (network adapters live in `uir_jax.denoiser`).
"""

from uir_jax.diffusion.irsde import IRSDE, MODES
from uir_jax.diffusion.loop import sample_loop
from uir_jax.diffusion.vp import VPProcess

__all__ = ["IRSDE", "MODES", "VPProcess", "sample_loop"]

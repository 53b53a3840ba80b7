"""The table-driven solvers on Stable Diffusion's schedule against diffusers' schedulers (oracle).

diffusers 0.42's DDIMScheduler (η = 0, ε- and v-prediction) and DPMSolverMultistepScheduler
("dpmsolver++" and "sde-dpmsolver++", 2M midpoint) are run step by step on a fixed analytic model
(the same function in torch and JAX); `solvers.MultistepSolver` of order 1 / 2 in `sample_loop`,
fed α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t) at the scheduler's timesteps, must land on the same sample.
This is the machinery the SD issue builds its schedulers on; IR-SDE is one more table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.diffusion import solvers
from uir_jax.diffusion.loop import sample_loop

pytestmark = pytest.mark.torch

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000)
SHAPE = (2, 6, 5, 3)


def _model(xp):
  """A smooth stand-in network: output depends on x and t, so every history term matters."""
  def model_fn(x, t):
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0  # float in both frameworks
    return 0.8 * xp.tanh(x) * (1.0 - 0.5 * tt) + 0.3 * tt
  return model_fn


def _run_diffusers(scheduler, x_T, noises=None):
  import torch

  model = _model(torch)
  x = torch.from_numpy(np.asarray(x_T))
  for i, t in enumerate(scheduler.timesteps):
    out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.float32))
    kw = {} if noises is None else {"variance_noise": torch.from_numpy(np.asarray(noises[i]))}
    x = scheduler.step(out, t, x, **kw).prev_sample
  return x.numpy()


def _run_ours(solver, ts, alphas, sigmas, x_T, key):
  return sample_loop(solver, _model(jnp), jnp.asarray(x_T), key, jnp.asarray(ts, jnp.int32),
                     solver.inputs(alphas, sigmas))[0]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_order1_ode_is_diffusers_ddim(prediction):
  from diffusers import DDIMScheduler

  sched = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing="leading", prediction_type=prediction)
  sched.set_timesteps(10)
  ts = sched.timesteps.numpy()  # 901, 801, ..., 1; the last step lands on ᾱ_0 (no alpha-to-one)
  abar = sched.alphas_cumprod.numpy().astype(np.float64)
  abar_pts = np.append(abar[ts], abar[0])
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  want = _run_diffusers(sched, x_T)
  solver = solvers.MultistepSolver(1, False, "eps" if prediction == "epsilon" else "v")
  got = _run_ours(solver, ts, np.sqrt(abar_pts), np.sqrt(1 - abar_pts), x_T, jax.random.key(1))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_order2_is_diffusers_dpm_solver_pp_2m(algorithm):
  """20 steps (>= 15: diffusers keeps order 2 up to the last step, which it takes at order 1 to
  σ = 0 as ours does); the SDE variant gets our loop's per-step noise as `variance_noise`."""
  from diffusers import DPMSolverMultistepScheduler

  sched = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type=algorithm, solver_order=2,
                                      solver_type="midpoint", final_sigmas_type="zero")
  n = 20
  sched.set_timesteps(n)
  ts = sched.timesteps.numpy()  # 999, 949, ..., 50 ("linspace"), then σ = 0
  abar = sched.alphas_cumprod.numpy().astype(np.float64)
  alphas = np.append(np.sqrt(abar[ts]), 1.0)
  sigmas = np.append(np.sqrt(1 - abar[ts]), 0.0)
  x_T = jax.random.normal(jax.random.key(0), SHAPE)
  key = jax.random.key(2)
  stochastic = algorithm.startswith("sde")
  noises = None
  if stochastic:  # what sample_loop draws at step i (multistep_step: normal(keys[i]))
    noises = [jax.random.normal(k, SHAPE, jnp.float32) for k in jax.random.split(key, n)]
  want = _run_diffusers(sched, x_T, noises)
  got = _run_ours(solvers.MultistepSolver(2, stochastic, "eps"), ts, alphas, sigmas, x_T, key)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)

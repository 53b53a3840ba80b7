"""diffusion.solvers and diffusion.loop: table-driven solvers serve IR-SDE and any other process.

IR-SDE's own samplers are checked against exact Gaussian laws in test_sde.py. Here: the solver,
fed IR-SDE's tables (built from the spec's formulas, not the library's), gives
`IRSDE.mr_coefficients`; the generic solvers in the generic loop reproduce `IRSDE.sample`; the
posterior coefficients match their closed forms; and the package imports no model code.
"""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.diffusion import solvers
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.diffusion.loop import sample_loop


@pytest.fixture(scope="module")
def sde():
  return IRSDE(max_sigma=50, T=100, schedule="cosine", eps=0.005)


def _spec_tables(T=100, max_sigma=50.0, eps=0.005):
  """IR-SDE's m_t and σ̄_t from the spec §5.1 formulas (cosine θ), float64, independently."""
  n, s = T + 2, 0.008
  k = np.arange(n + 1, dtype=np.float64)
  abar = np.cos(((k / n) + s) / (1 + s) * math.pi * 0.5) ** 2
  theta = 1 - (abar / abar[0])[1:-1]
  theta_bar = np.cumsum(theta) - theta[0]
  dt = -math.log(eps) / theta_bar[-1]
  lam = max_sigma / 255
  m = np.exp(-theta_bar * dt)
  return m, lam * np.sqrt(1 - m**2)


@pytest.mark.parametrize("n,sched", [(3, "time"), (10, "logsnr"), (12, "time"), (100, "time")])
def test_solver_on_irsde_tables_gives_irsde_coefficients(sde, n, sched):
  """α = m, σ = σ̄ at the visited timesteps then t = 0: the generic solver's coefficients are
  IR-SDE's (and so today's: bitwise equal to the pre-split `IRSDE.mr_coefficients`)."""
  m, sb = _spec_tables()
  ts = sde.timesteps(n, sched)
  points = np.append(ts, 0)
  for order in (1, 2, 3):
    for stochastic in (False, True):
      ours = solvers.multistep_coefficients(m[points], sb[points], order, stochastic)
      theirs = sde.mr_coefficients(ts, order, stochastic)
      for a, b, name in zip(ours, theirs, ("coef_x", "coef_d", "std"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-15,
                                   err_msg=f"{name} n={n} order={order} sde={stochastic}")


def test_posterior_coefficients_general_and_vp_forms_agree():
  """The general (α, σ) form equals the closed-form Gaussian posterior (computed by conditioning
  the joint of (y_s, y_t) given y_0) and, where σ² = c²(1 − α²), the VP form."""
  rng = np.random.default_rng(0)
  a_s, a_t = 0.9, 0.55
  s_s, s_t = 0.3, 0.8  # not VP: α² + σ² ≠ 1
  # Joint of (y_s, y_t) | y_0: y_t = (a_t/a_s) y_s + e, e ~ N(0, s_t² − (a_t/a_s)² s_s²).
  ratio = a_t / a_s
  v_ts = s_t**2 - ratio**2 * s_s**2
  cov = np.array([[s_s**2, ratio * s_s**2], [ratio * s_s**2, s_t**2]])
  y0 = rng.normal()
  mean = np.array([a_s * y0, a_t * y0])
  yt = rng.normal()
  cond_mean = mean[0] + cov[0, 1] / cov[1, 1] * (yt - mean[1])
  cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
  ct, c0, var = solvers.posterior_coefficients(a_t, s_t, a_s, s_s)
  np.testing.assert_allclose(ct * yt + c0 * y0, cond_mean, rtol=1e-12)
  np.testing.assert_allclose(var, cond_var, rtol=1e-12)
  assert v_ts > 0
  for c in (1.0, 50 / 255):  # DDPM (c = 1) and IR-SDE (c = λ)
    sig = lambda a, c=c: c * np.sqrt(1 - a**2)
    general = solvers.posterior_coefficients(a_t, sig(a_t), a_s, sig(a_s))
    vp = solvers.vp_posterior_coefficients(a_t, a_s)
    np.testing.assert_allclose(general[:2], vp[:2], rtol=1e-12)
    np.testing.assert_allclose(general[2], vp[2] * c**2, rtol=1e-12)


def _gauss_model(m, sb):
  """The exact ε̂ for x0 = μ + δ + s·N(0, 1) per channel (as test_sde.py), loop signature."""
  m, sb = jnp.asarray(m, jnp.float32), jnp.asarray(sb, jnp.float32)

  def model_fn(x, t, mu, delta, s0):
    mt, sbt = m[t][:, None, None, None], sb[t][:, None, None, None]
    return sbt * (x - mu - mt * delta) / (mt**2 * s0**2 + sbt**2)

  return model_fn


@pytest.mark.parametrize("mode,n", [("mr2", 10), ("mr3-sde", 8), ("posterior", 7)])
def test_generic_solvers_in_the_loop_reproduce_irsde_sample(sde, mode, n):
  """`MultistepSolver` / `PosteriorSolver` (x̂_0 via the ε adapter, μ as the loop's offset) in
  `sample_loop` give `IRSDE.sample` on the same key and x_T: the process enters only as tables."""
  m, sb = _spec_tables()
  shape = (2, 16, 16, 3)
  mu = jax.random.uniform(jax.random.key(1), shape, minval=0.2, maxval=0.8)
  x_T = sde.noise_state(jax.random.key(2), mu)
  args = (jnp.asarray([0.3, -0.2, 0.0]), jnp.asarray([0.1, 0.05, 0.2]))
  model_fn = _gauss_model(m, sb)
  key = jax.random.key(3)
  want = sde.sample(lambda x, mu_, t, *a: model_fn(x, t, mu_, *a), mu, key, mode, n, x_T=x_T,
                    eps_args=args, step_schedule="logsnr")
  ts = sde.timesteps(n, "logsnr")
  points = np.append(ts, 0)
  if mode == "posterior":
    solver = solvers.PosteriorSolver("eps", min_var=sde.lam**2 * 1e-20 * sde.dt)
  else:
    solver = solvers.MultistepSolver(int(mode[2]), mode.endswith("-sde"), "eps")
  got, _ = sample_loop(solver, model_fn, x_T, jax.random.split(key)[1], jnp.asarray(ts),
                       solver.inputs(m[points], sb[points]), (mu, *args), (mu,))
  # The mr modes run the same float32 arithmetic (measured: bitwise equal); the posterior's
  # coefficients are float64 host values here, float32 lookups in IRSDE (measured 2.5e-6).
  np.testing.assert_allclose(got, want, atol=1e-5 if mode == "posterior" else 1e-6, rtol=0)


def test_loop_compiles_once_per_solver_and_shape():
  """Equal solver dataclasses share the compilation; another order compiles anew."""
  traces = []

  def model_fn(x, t):
    traces.append(1)  # runs only while tracing
    return 0.1 * x

  alphas, sigmas = np.array([0.2, 0.6, 0.9, 1.0]), np.array([0.98, 0.8, 0.43, 0.0])
  x_T = jnp.ones((1, 4, 4, 1))
  ts = jnp.array([900, 500, 100], jnp.int32)
  for _ in range(2):
    s = solvers.MultistepSolver(2, False, "eps")
    sample_loop(s, model_fn, x_T, jax.random.key(0), ts, s.inputs(alphas, sigmas))
  assert len(traces) == 1
  s3 = solvers.MultistepSolver(3, False, "eps")
  sample_loop(s3, model_fn, x_T, jax.random.key(0), ts, s3.inputs(alphas, sigmas))
  assert len(traces) == 2


def test_bad_tables_give_one_line_errors():
  with pytest.raises(ValueError, match="equal length"):
    solvers.multistep_coefficients(np.ones(4), np.ones(3), 2, False)
  with pytest.raises(ValueError, match="order must be"):
    solvers.multistep_coefficients(np.ones(4), np.ones(4), 0, False)


def test_diffusion_imports_no_model_code():
  """diffusion/ imports no flax, no uir_jax.models / systems / train (DESIGN.md's layering)."""
  code = ("import sys; import uir_jax.diffusion, uir_jax.diffusion.tiling, "
          "uir_jax.diffusion.adapters, uir_jax.diffusion.solvers, uir_jax.diffusion.loop; "
          "bad = sorted(m for m in sys.modules if m == 'flax' or m == 'torch' or "
          "m.startswith(('uir_jax.models', 'uir_jax.systems', 'uir_jax.train', 'flax.'))); "
          "print(bad); sys.exit(bool(bad))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr

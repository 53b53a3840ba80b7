"""IR-SDE: schedule values, marginals, training target, samplers (spec §5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.diffusion.irsde import IRSDE


@pytest.fixture(scope="module")
def sde():
  return IRSDE(max_sigma=50, T=100, schedule="cosine", eps=0.005)


def _images(seed, shape=(2, 12, 10, 3)):
  r = np.random.default_rng(seed)
  x0 = r.uniform(0, 1, shape).astype(np.float32)
  # A "degraded" μ: blurred-ish + offset, clearly different from x0.
  mu = np.clip(0.6 * x0 + 0.4 * x0.mean(axis=(1, 2), keepdims=True) + 0.05, 0, 1)
  return jnp.asarray(x0), jnp.asarray(mu.astype(np.float32))


# The reference values table of spec §5.1 (own float64 evaluation of the formulas).
SPEC_TABLE = [
    ("dt", None, 0.1040938),
    ("theta", 0, 6.142e-4), ("theta", 1, 1.6946e-3), ("theta", 50, 0.50616),
    ("theta", 100, 0.99977),
    ("theta_bar", 100, 50.8994),
    ("m", 1, 0.999824), ("sigma_bar", 1, 0.0036826), ("sigma", 1, 0.011415),
    ("m", 10, 0.98536), ("sigma_bar", 10, 0.033423),
    ("m", 50, 0.36082), ("sigma_bar", 50, 0.18287),
    ("m", 100, 0.005), ("sigma_bar", 100, 0.196076), ("sigma", 100, 0.27726),
]


@pytest.mark.parametrize("name,t,expected", SPEC_TABLE)
def test_schedule_matches_spec_table(sde, name, t, expected):
  value = sde.dt if t is None else getattr(sde, name)[t]
  # 1e-5 absolute, or relative for the one large value (θ̄_100 ≈ 50.9, printed to 4 decimals).
  assert abs(value - expected) <= max(1e-5, 1e-5 * abs(expected)), (name, t, value, expected)


def test_schedule_identities(sde):
  assert sde.lam == pytest.approx(50 / 255)
  assert sde.theta.shape == (101,) and sde.theta_bar[0] == 0.0
  np.testing.assert_allclose(np.exp(-sde.theta_bar[-1] * sde.dt), 0.005, rtol=1e-12)
  m = np.exp(-sde.theta_bar * sde.dt)
  np.testing.assert_allclose(sde.sigma_bar, sde.lam * np.sqrt(1 - m**2))
  np.testing.assert_allclose(sde.sigma, np.sqrt(2 * sde.lam**2 * sde.theta))
  # θ rises monotonically for the cosine schedule (it is 1 − ᾱ_{t+1}).
  assert np.all(np.diff(sde.theta) > 0)


def test_other_schedules():
  lin = IRSDE(schedule="linear", T=100)
  np.testing.assert_allclose(lin.theta[[0, -1]], [1000 / 101 * 1e-4, 1000 / 101 * 0.02])
  const = IRSDE(schedule="constant", T=10, eps=0.01)
  np.testing.assert_allclose(const.theta, 1.0)
  np.testing.assert_allclose(const.m[-1], 0.01, rtol=1e-12)
  # max_sigma <= 1 is taken in [0, 1] units (the reference only divides values > 1 by 255).
  assert IRSDE(max_sigma=0.5).lam == 0.5


def test_reverse_optimum_matches_reference_formula(sde):
  """Our m_t/m_s form equals the reference's A, B, C form of x*_{t−1} (spec §5.4)."""
  x0, mu = _images(1)
  xt = x0 + 0.3
  t = jnp.array([1, 57], jnp.int32)
  ours = sde.reverse_optimum_step(xt, x0, mu, t)
  for i, ti in enumerate([1, 57]):
    A = np.exp(-sde.theta[ti] * sde.dt)
    B = np.exp(-sde.theta_bar[ti] * sde.dt)
    C = np.exp(-sde.theta_bar[ti - 1] * sde.dt)
    ref = (A * (1 - C**2) / (1 - B**2) * (xt[i] - mu[i])
           + C * (1 - A**2) / (1 - B**2) * (x0[i] - mu[i]) + mu[i])
    np.testing.assert_allclose(ours[i], ref, atol=1e-6)


def test_noise_relations_roundtrip(sde):
  x0, mu = _images(2)
  t = jnp.array([3, 90], jnp.int32)
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  xt = sde.q_sample(x0, mu, t, eps)
  np.testing.assert_allclose(sde.noise_from_x0(xt, x0, mu, t), eps, atol=2e-5)
  np.testing.assert_allclose(sde.x0_from_noise(xt, mu, eps, t), x0, atol=1e-4)
  sb = sde.sigma_bar[np.array([3, 90])][:, None, None, None]
  np.testing.assert_allclose(sde.score_from_noise(eps, t), -eps / sb, rtol=1e-6)


def test_training_pair_matches_optimum_to_euler_error(sde):
  """With the true ε, the model's mean step equals the optimum x*_{t−1} up to Euler's error.

  Both are linear in (x_t − μ, x_0 − μ); the Euler step's x_t coefficient 1 + θ_t dt − σ_t² dt/σ̄_t²
  differs from the exact a_t(1 − m_{t−1}²)/(1 − m_t²) by O((θ_t dt)²), at most 5.3% of the step
  x*_{t−1} − x_t (t = 100, θ_t dt = 0.10; 1e-8 of it at t = 1). So the error must stay under 10%
  of the step at every t; a halved score term makes it 50-100%.
  """
  x0, mu = _images(3, shape=(4, 16, 16, 3))
  t = jnp.array([1, 10, 50, 100], jnp.int32)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  xt = sde.q_sample(x0, mu, t, noise)
  pred, target = sde.training_pair(noise, xt, x0, mu, t)
  assert pred.shape == target.shape == x0.shape
  norm = lambda a: np.sqrt(np.sum(np.asarray(a, np.float64) ** 2, axis=(1, 2, 3)))
  rel = norm(pred - target) / norm(target - xt)
  assert np.all(rel < 0.1), rel
  # And a wrong ε gives a clearly worse match: the target really depends on x_0.
  pred_bad, _ = sde.training_pair(-noise, xt, x0, mu, t)
  assert np.all(norm(pred_bad - target) / norm(target - xt) > 0.5)


def test_random_states_match_closed_form_marginal(sde):
  """Empirical mean/var of the training states at each t match μ + (x0−μ)m_t and σ̄_t²."""
  n = 20000
  x0 = jnp.full((n, 1, 1, 1), 0.9)
  mu = jnp.full((n, 1, 1, 1), 0.2)
  t, xt, _ = sde.random_states(jax.random.key(7), x0, mu)
  t, xt = np.asarray(t), np.asarray(xt)[:, 0, 0, 0]
  assert t.min() == 1 and t.max() == sde.T
  counts = np.bincount(t, minlength=sde.T + 1)[1:]
  assert counts.min() > 0.6 * n / sde.T and counts.max() < 1.4 * n / sde.T  # ~uniform
  for ti in (1, 10, 50, 100):
    sel = xt[t == ti]
    mean = 0.2 + 0.7 * sde.m[ti]
    var = sde.sigma_bar[ti] ** 2
    se = np.sqrt(var / len(sel))
    assert abs(sel.mean() - mean) < 5 * se + 1e-6
    assert abs(sel.var() - var) < 6 * var * np.sqrt(2 / len(sel)) + 1e-10


def test_forward_sde_simulation_matches_marginal(sde):
  """Euler–Maruyama simulation of dx = θ(μ−x)dt + σ dW agrees with the closed-form marginal."""
  n, steps = 40000, 20  # θ_t dt is tiny up to t=20, so EM's discretisation error is negligible
  x = jnp.full((n, 1, 1, 1), 0.9)
  mu = jnp.full((n, 1, 1, 1), 0.2)
  key = jax.random.key(3)
  for ti in range(1, steps + 1):
    key, sub = jax.random.split(key)
    x = sde.forward_step(sub, x, mu, jnp.full((n,), ti, jnp.int32))
  x = np.asarray(x).ravel()
  mean = 0.2 + 0.7 * sde.m[steps]
  var = sde.sigma_bar[steps] ** 2
  assert abs(x.mean() - mean) < 5 * np.sqrt(var / n) + 2e-4
  assert abs(x.var() / var - 1) < 0.05


def _oracle(sde):
  def eps_fn(x, mu, t, x0):
    return sde.noise_from_x0(x, x0, mu, t)

  return eps_fn


@pytest.mark.parametrize("num_steps", [None, 100, 10, 3])
def test_posterior_with_oracle_returns_x0(sde, num_steps):
  """x̂_0 bookkeeping only: with an oracle ε̂ every x̂_0 is exact and the last one is returned,
  whatever the step's noise (the Gaussian-law tests below check the noise and coefficients)."""
  x0, mu = _images(4)
  out = sde.sample(_oracle(sde), mu, jax.random.key(0), mode="posterior", num_steps=num_steps,
                   eps_args=(x0,))
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_posterior_step_is_optimum_mean_plus_posterior_noise(sde):
  """One posterior step = x*_{t−1}(x_t, x̂_0(ε̂)) + std·z with the spec §5.7 variance."""
  x0, mu = _images(5, shape=(4, 16, 16, 3))
  t = jnp.full((4,), 60, jnp.int32)
  xt = sde.noise_state(jax.random.key(1), mu)
  eps = sde.noise_from_x0(xt, x0, mu, t) + 0.1  # an imperfect denoiser
  step = sde.reverse_posterior_step(jax.random.key(9), xt, mu, eps, t)
  opt = sde.reverse_optimum_step(xt, sde.x0_from_noise(xt, mu, eps, t), mu, t)
  a2 = np.exp(-2 * sde.theta[60] * sde.dt)
  std = np.sqrt((1 - a2) * (1 - sde.m[59] ** 2) / (1 - sde.m[60] ** 2)) * sde.lam
  resid = np.asarray(step - opt) / std  # must be standard normal noise
  assert abs(resid.mean()) < 0.1 and 0.95 < resid.std() < 1.05


def test_reverse_sde_with_oracle_ends_near_x0(sde):
  x0, mu = _images(6, shape=(4, 16, 16, 3))
  out = sde.sample(_oracle(sde), mu, jax.random.key(2), mode="sde", eps_args=(x0,))
  err = float(jnp.sqrt(jnp.mean((out - x0) ** 2)))
  start = float(jnp.sqrt(jnp.mean((mu - x0) ** 2)))
  # Within its own noise: the last steps inject σ_t·sqrt(dt)-sized noise (~4e-3 at t=1..3).
  assert err < 0.02, err
  assert err < start / 5
  ode = sde.sample(_oracle(sde), mu, jax.random.key(2), mode="ode", eps_args=(x0,))
  assert float(jnp.sqrt(jnp.mean((ode - x0) ** 2))) < start


def test_sampler_compiles_once_per_shape(sde):
  traces = {"n": 0}

  def eps_fn(x, mu, t, x0):
    traces["n"] += 1  # runs only while tracing
    return sde.noise_from_x0(x, x0, mu, t)

  counted = chex.assert_max_traces(eps_fn, n=2)
  x0, mu = _images(7)
  for seed in range(3):
    sde.sample(counted, mu, jax.random.key(seed), eps_args=(x0,))
  assert traces["n"] == 1  # one trace for 100 steps and 3 calls: no per-step/per-call retracing
  x0b, mub = _images(8, shape=(1, 8, 8, 3))
  sde.sample(counted, mub, jax.random.key(0), eps_args=(x0b,))
  assert traces["n"] == 2  # a new shape compiles once more


def test_timesteps_subsequence(sde):
  np.testing.assert_array_equal(sde.timesteps(), np.arange(100, 0, -1))
  ts = sde.timesteps(10)
  assert ts[0] == 100 and ts[-1] == 1 and len(ts) == 10 and np.all(np.diff(ts) < 0)
  np.testing.assert_array_equal(sde.timesteps(1), [100])


@pytest.mark.parametrize("kwargs,match", [
    (dict(schedule="quadratic"), "unknown schedule"),
    (dict(T=0), "T must be"),
    (dict(T=2.5), "T must be"),
    (dict(eps=0.0), "eps"),
    (dict(max_sigma=-1), "max_sigma"),
])
def test_bad_constructor_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    IRSDE(**kwargs)


def test_bad_sampling_arguments(sde):
  x0, mu = _images(9)
  fn = _oracle(sde)
  with pytest.raises(ValueError, match="unknown sampling mode"):
    sde.sample(fn, mu, jax.random.key(0), mode="ddim", eps_args=(x0,))
  for n in (0, 101, -3):
    with pytest.raises(ValueError, match="num_steps"):
      sde.sample(fn, mu, jax.random.key(0), num_steps=n, eps_args=(x0,))
  with pytest.raises(ValueError, match="only supported for mode='posterior'"):
    sde.sample(fn, mu, jax.random.key(0), mode="sde", num_steps=10, eps_args=(x0,))
  with pytest.raises(ValueError, match="shape mismatch"):
    sde.sample(fn, mu, jax.random.key(0), x_T=mu[:, :4], eps_args=(x0,))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    sde.sample(fn, mu[0], jax.random.key(0), eps_args=(x0,))
  with pytest.raises(ValueError, match="shape mismatch"):
    sde.q_sample(x0, mu[:1], jnp.array([1, 2]), x0)
  with pytest.raises(ValueError, match="timesteps must have shape"):
    sde.marginal_mean(x0, mu, jnp.array([1, 2, 3]))


def test_clip_x0_keeps_an_inaccurate_denoiser_stable(sde):
  x0, mu = _images(4)
  # An accurate denoiser: clamping changes nothing (x0 lies in [0, 1]).
  exact = sde.sample(_oracle(sde), mu, jax.random.key(0), num_steps=10, eps_args=(x0,))
  clamped = sde.sample(_oracle(sde), mu, jax.random.key(0), num_steps=10, eps_args=(x0,),
                       clip_x0=True)
  np.testing.assert_allclose(clamped, exact, atol=1e-5)
  # A biased one (ε̂ off by 0.3): unclamped, x̂_0 carries the error times σ̄_T/m_T ~ 40.
  biased = lambda x, m, t, x0_: _oracle(sde)(x, m, t, x0_) + 0.3
  wild = sde.sample(biased, mu, jax.random.key(0), num_steps=10, eps_args=(x0,))
  tame = sde.sample(biased, mu, jax.random.key(0), num_steps=10, eps_args=(x0,), clip_x0=True)
  err = lambda y: float(jnp.mean(jnp.abs(y - x0)))
  assert err(tame) < err(wild)
  assert float(tame.min()) > -0.5 and float(tame.max()) < 1.5
  with pytest.raises(ValueError, match="clip_x0"):
    sde.sample(_oracle(sde), mu, jax.random.key(0), mode="sde", eps_args=(x0,), clip_x0=True)


# ----------------------------------------------------------------------------------------------
# Exact laws in a Gaussian case: every sampler against closed forms (issue 14).
#
# Clean pixels x0 = μ + δ_c + s_c·N(0, 1), independently per pixel (c = channel), μ a random image.
# Then y_t = x_t − μ ~ N(m_t δ, v_t) with v_t = m_t² s² + σ̄_t², and the exact denoiser is linear:
# E[ε | x_t] = σ̄_t (y_t − m_t δ) / v_t, E[y_0 | x_t] = δ + (m_t s² / v_t)(y_t − m_t δ). Driven by
# it, every sampler is a linear-Gaussian recursion in y, so each state's law is N(mean, var) per
# channel; `_gaussian_law` computes it in float64 straight from the spec / paper formulas (written
# here with θ̄ and dt, not with the library's helpers). A sampler's states are then standardised
# with that law and must have mean 0 and variance 1 within the sampling error of N = 49,152
# pixels: |mean| < 5/sqrt(N) (5 standard errors) and |var − 1| < 6 sqrt(2/N) (6 standard errors
# of a Gaussian sample variance), at every step. That is 0.023 and 0.038: a posterior std off by
# 10%, a wrong coefficient between non-adjacent steps or a halved score term fail (the breakages
# tried are listed in benchmarks/RESULTS.md, "Few-step IR-SDE samplers").
#
# The law of a discrete sampler is not the exact marginal q(x_t | μ): the posterior sampler plugs
# in E[x0 | x_t] and so drops the posterior spread of x0 (its states are slightly too narrow), and
# Euler steps of the SDE / ODE have their O(dt) error. `test_gaussian_law_vs_exact_marginal`
# measures that gap in float64 (no sampling) and bounds it with the figures in its comments.
# ----------------------------------------------------------------------------------------------

DELTA = np.array([0.3, -0.2, 0.0])  # E[x0] − μ per channel
S0 = np.array([0.1, 0.05, 0.2])  # std of x0 per channel
GAUSS_SHAPE = (4, 64, 64, 3)  # 49,152 independent pixels


def _gauss_eps_fn(sde):
  m = jnp.asarray(np.exp(-sde.theta_bar * sde.dt), jnp.float32)
  sb = jnp.asarray(sde.lam * np.sqrt(1 - np.exp(-2 * sde.theta_bar * sde.dt)), jnp.float32)

  def eps_fn(x, mu, t, delta, s0):  # pointwise, so it also runs tiled
    mt, sbt = m[t][:, None, None, None], sb[t][:, None, None, None]
    return sbt * (x - mu - mt * delta) / (mt**2 * s0**2 + sbt**2)

  return eps_fn


def _mr_weights(ell_nodes, ell_t, m_t, c):
  """m_t ∫ c e^{−c(ℓ_t−ℓ)} L_j(ℓ) dℓ over [ℓ_s, ℓ_t] for the Lagrange basis L_j through ell_nodes
  (ell_nodes[0] = ℓ_s), by 40-point Gauss–Legendre quadrature: independent of the closed form."""
  g, w = np.polynomial.legendre.leggauss(40)
  ell_s = ell_nodes[0]
  u = ell_s + (g + 1) * (ell_t - ell_s) / 2
  w = w * (ell_t - ell_s) / 2 * c * np.exp(-c * (ell_t - u))
  out = []
  for j, nj in enumerate(ell_nodes):
    basis = np.prod([(u - nk) / (nj - nk) for k, nk in enumerate(ell_nodes) if k != j], axis=0)
    out.append(m_t * np.sum(w * basis))
  return np.array(out)


def _gaussian_law(sde, kind, ts, order=1, stochastic=False):
  """float64 law of y = x − μ after each step from x_T = μ + λz: (mean [n, C], var [n, C]).

  Each quantity is an affine function of independent N(0, 1) draws, stored as coefficients
  [C, 1 + draws] (column 0 the constant): x_T's draw, then one per noisy step.
  """
  n, lam, dt, tb = len(ts), sde.lam, sde.dt, sde.theta_bar
  m = lambda t: np.exp(-tb[t] * dt)
  var_m = lambda t: 1 - np.exp(-2 * tb[t] * dt)  # σ̄_t² / λ²
  cols = iter(range(2, n + 2))

  def draw():
    v = np.zeros((3, n + 2))
    v[:, next(cols)] = 1
    return v

  def const(c):
    v = np.zeros((3, n + 2))
    v[:, 0] = c
    return v

  def denoise(y, t):  # E[y0 | y_t]
    k = (m(t) * S0**2 / (m(t) ** 2 * S0**2 + lam**2 * var_m(t)))[:, None]
    return k * y + const(DELTA * (1 - k[:, 0] * m(t)))

  def score(y, t):  # ∇ log q(y_t) = −(y − m_t δ) / v_t
    v = (m(t) ** 2 * S0**2 + lam**2 * var_m(t))[:, None]
    return -(y - const(m(t) * DELTA)) / v

  y = np.zeros((3, n + 2))
  y[:, 1] = lam
  ts_next = list(ts[1:]) + [0]
  ell = lambda t: np.log(m(t) / (lam * np.sqrt(var_m(t))))
  hist, means, vars_ = [], [], []
  for t, s in zip(ts, ts_next, strict=True):
    if kind == "posterior":  # wild-IR Eq. 6-7 between t and s < t (θ̄ differences for s ≠ t − 1)
      d = denoise(y, t)
      e_ts = np.exp(-(tb[t] - tb[s]) * dt)
      cx = var_m(s) / var_m(t) * e_ts
      c0 = (1 - e_ts**2) / var_m(t) * m(s)
      var = max(var_m(s) * (1 - e_ts**2) / var_m(t), 1e-20 * dt)  # spec §5.7's clamp
      y = cx * y + c0 * d + lam * np.sqrt(var) * draw()
    elif kind in ("sde", "ode"):  # spec §5.5 / 5.6 in y: μ − x = −y
      th = sde.theta[t]
      sg2 = 2 * lam**2 * th
      half = 0.5 if kind == "ode" else 1.0
      y = y + th * y * dt + half * sg2 * score(y, t) * dt
      if kind == "sde":
        y = y - np.sqrt(sg2 * dt) * draw()
    else:  # the exponential integrator: exact linear part, D = E[y0 | y] interpolated in ℓ
      hist.insert(0, (ell(t), denoise(y, t)))
      if s == 0:
        y = hist[0][1]
      else:
        eta = 1.0 if stochastic else 0.0
        h = ell(s) - ell(t)
        sb_t, sb_s = lam * np.sqrt(var_m(t)), lam * np.sqrt(var_m(s))
        k = min(order, len(hist))
        if k == 2:  # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; its SDE variant with 1 − e^{−2h})
          r = (hist[0][0] - hist[1][0]) / h
          a = m(s) * (1 - np.exp(-(1 + eta) * h))
          w = [a * (1 + 1 / (2 * r)), -a / (2 * r)]
        else:
          w = _mr_weights([e for e, _ in hist[:k]], ell(s), m(s), 1 + eta)
        y = sb_s / sb_t * np.exp(-eta * h) * y
        y = y + sum(wj * dj for wj, (_, dj) in zip(w, hist[:k], strict=True))
        if stochastic:
          y = y + sb_s * np.sqrt(1 - np.exp(-2 * h)) * draw()
    means.append(y[:, 0].copy())
    vars_.append(np.sum(y[:, 1:] ** 2, axis=1))
  return np.array(means), np.array(vars_)


def _kl_to_data(mean, var):
  """KL(N(mean, var) || N(δ, s²)) per channel, averaged: the final samples vs the clean law."""
  return float(np.mean(np.log(S0 / np.sqrt(var)) + (var + (mean - DELTA) ** 2) / (2 * S0**2)
                       - 0.5))


# (mode, num_steps, step_schedule) -> (kind, order, stochastic) of `_gaussian_law`.
GAUSS_CASES = {
    ("posterior", None, "time"): ("posterior", 1, True),
    ("posterior", 10, "time"): ("posterior", 1, True),
    ("posterior", 7, "logsnr"): ("posterior", 1, True),
    ("sde", None, "time"): ("sde", 1, True),
    ("ode", None, "time"): ("ode", 1, False),
    ("mr2", 10, "logsnr"): ("mr", 2, False),
    ("mr2-sde", 10, "logsnr"): ("mr", 2, True),
    ("mr3", 12, "logsnr"): ("mr", 3, False),
    ("mr3-sde", 8, "time"): ("mr", 3, True),
}


@pytest.fixture(scope="module")
def gauss(sde):
  """One sampler run per case (cached), shared by the law and one-step tests."""
  mu = jax.random.uniform(jax.random.key(11), GAUSS_SHAPE, minval=0.2, maxval=0.8)
  x_T = sde.noise_state(jax.random.key(12), mu)
  args = (jnp.asarray(DELTA, jnp.float32), jnp.asarray(S0, jnp.float32))
  eps_fn = _gauss_eps_fn(sde)
  runs = {}

  def run(case):
    if case not in runs:
      mode, n, sched = case
      runs[case] = sde.sample(eps_fn, mu, jax.random.key(13), mode, n, x_T=x_T, eps_args=args,
                              step_schedule=sched, return_path=True)
    return runs[case]

  return dict(mu=mu, x_T=x_T, args=args, eps_fn=eps_fn, run=run, key=jax.random.key(13))


def _assert_law(path, mu, mean, var, what):
  y = np.asarray(path, np.float64) - np.asarray(mu, np.float64)[None]  # [n, B, H, W, C]
  z = ((y - mean[:, None, None, None, :]) / np.sqrt(var)[:, None, None, None, :])
  z = z.reshape(len(z), -1)
  n = z.shape[1]
  zm, zv = z.mean(axis=1), z.var(axis=1)
  bad = np.nonzero((np.abs(zm) > 5 / np.sqrt(n)) | (np.abs(zv - 1) > 6 * np.sqrt(2 / n)))[0]
  assert bad.size == 0, (f"{what}: states {bad[:8]} off their exact law: standardised mean "
                         f"{zm[bad[:8]]}, variance {zv[bad[:8]]} (tolerance "
                         f"{5 / np.sqrt(n):.3f}, {6 * np.sqrt(2 / n):.3f})")


@pytest.mark.parametrize("case", list(GAUSS_CASES), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_sampler_states_follow_exact_gaussian_law(sde, gauss, case):
  """Every intermediate state and the output have the mean and variance of their exact law."""
  mode, n, sched = case
  kind, order, stochastic = GAUSS_CASES[case]
  out, path = gauss["run"](case)
  ts = sde.timesteps(n, sched)
  assert path.shape == (len(ts),) + GAUSS_SHAPE
  np.testing.assert_array_equal(out, path[-1])
  mean, var = _gaussian_law(sde, kind, ts, order, stochastic)
  _assert_law(path, gauss["mu"], mean, var, case)


def test_gaussian_law_vs_exact_marginal(sde):
  """How far each discrete sampler's law is from the exact marginals q(x_t | μ) (float64).

  Measured here (no sampling noise), from x_T = μ + λz, per-channel KL averaged:
    posterior, 100 steps: every state too narrow or exact (derivation: plugging x̂_0 = E[x0 | x_t]
      into q(x_s | x_t, x0) drops c0² Var[x0 | x_t] each step, and the linear steps keep a
      narrower law narrower), variance ratio 0.866..1; output KL to the data 2.8e-3.
    posterior, 10 steps: the same deficit over larger gaps, variance ratio down to 0.37, KL 0.125
      (44x the 100-step KL).
    reverse SDE, Euler: states up to 9% too wide (O(θ_t dt) per step, θ_t dt up to 0.10); KL 6.6e-4.
    ODE, Euler: up to 10% too wide; KL 1.4e-3.
    mr2 (ODE, 2M): KL 7.9e-4 at 10 calls, 1.8e-4 at 20 (at 10 calls its middle states are up to
      15% too narrow, recovered by the end).
  The bounds below leave ~1.5x room over these figures: they catch a sampler whose scheme (not
  its code, which the law tests check) drifts from the exact process.
  """
  def law(kind, n, sched="time", order=1, stochastic=True):
    ts = sde.timesteps(n, sched)
    mean, var = _gaussian_law(sde, kind, ts, order, stochastic)
    s = np.array(list(ts[1:]) + [0])
    m = sde.m[s][:, None]
    exact_var = m**2 * S0**2 + sde.sigma_bar[s][:, None] ** 2
    return mean - m * DELTA, var / exact_var, _kl_to_data(mean[-1], var[-1])

  start_err = sde.m[sde.T] * np.abs(DELTA).max()  # x_T = μ + λz vs E[x_T − μ] = m_T δ
  dmean, ratio, kl_post = law("posterior", None)
  assert np.abs(dmean).max() <= 1.05 * start_err  # the mean is exact but for the start
  assert ratio.max() <= 1 + 1e-4 and ratio.min() > 0.8
  assert kl_post < 4e-3
  _, ratio10, kl_post10 = law("posterior", 10)
  assert ratio10.max() <= 1 + 1e-4 and kl_post10 > 20 * kl_post
  for kind in ("sde", "ode"):
    _, ratio, kl = law(kind, None, stochastic=kind == "sde")
    assert 0.99 < ratio.min() and ratio.max() < 1.15 and kl < 2e-3, (kind, ratio, kl)
  # The bar for the few-step solver: at 10 calls as close to the data as the 100-step
  # posterior, closer still at 20.
  _, _, kl_mr10 = law("mr", 10, "logsnr", 2, False)
  _, _, kl_mr20 = law("mr", 20, "logsnr", 2, False)
  assert kl_mr10 <= kl_post and kl_mr20 < kl_mr10 / 2, (kl_mr10, kl_mr20, kl_post)


@pytest.mark.parametrize("case", list(GAUSS_CASES), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_sampler_loop_step_equals_step_method(sde, gauss, case):
  """path[i] = step method(path[i − 1]) with the loop's per-step key, for the first, a middle and
  the last step (the loop splits key into (init, loop) and the loop key into one key per step)."""
  mode, n, sched = case
  _, path = gauss["run"](case)
  mu, eps_fn, args = gauss["mu"], gauss["eps_fn"], gauss["args"]
  ts = sde.timesteps(n, sched)
  ts_next = np.array(list(ts[1:]) + [0])
  keys = jax.random.split(jax.random.split(gauss["key"])[1], len(ts))
  state = lambda i: gauss["x_T"] if i < 0 else path[i]
  full = lambda t: jnp.full((GAUSS_SHAPE[0],), t, jnp.int32)
  for i in sorted({0, 2, len(ts) // 2, len(ts) - 1}):
    x, t = state(i - 1), full(ts[i])
    eps = eps_fn(x, mu, t, *args)
    if mode == "posterior":
      expected = sde.reverse_posterior_step(keys[i], x, mu, eps, t, full(ts_next[i]))
    elif mode == "sde":
      expected = sde.reverse_sde_step(keys[i], x, mu, eps, t)
    elif mode == "ode":
      expected = sde.reverse_ode_step(x, mu, eps, t)
    else:
      order, stochastic = GAUSS_CASES[case][1:]
      cx, cd, sd = (jnp.asarray(c, jnp.float32) for c in sde.mr_coefficients(ts, order, stochastic))
      hist = [sde.x0_from_noise(state(j), mu, eps_fn(state(j), mu, full(ts[j + 1]), *args),
                                full(ts[j + 1])) if j >= -1 else jnp.zeros_like(x)
              for j in range(i - 2, i - 1 - order, -1)]
      expected, _ = sde.reverse_mr_step(keys[i], x, mu, eps, t, jnp.stack(hist), cx[i], cd[i],
                                        sd[i])
    np.testing.assert_allclose(path[i], expected, atol=2e-6, rtol=0, err_msg=f"{case} step {i}")


def test_sampler_loop_calls_the_step_methods(monkeypatch):
  """The compiled loop is built from IRSDE's step methods (not its own copies of the formulas)."""
  sde = IRSDE(T=4)  # a fresh instance: nothing compiled for it yet
  calls = []
  for name in ("reverse_posterior_step", "reverse_sde_step", "reverse_ode_step",
               "reverse_mr_step"):
    method = getattr(sde, name)
    spy = lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k)
    monkeypatch.setattr(sde, name, spy)
  mu = jnp.zeros((1, 4, 4, 3))
  for mode, name in (("posterior", "reverse_posterior_step"), ("sde", "reverse_sde_step"),
                     ("ode", "reverse_ode_step"), ("mr2-sde", "reverse_mr_step")):
    calls.clear()
    sde.sample(zero_eps, mu, jax.random.key(0), mode)
    assert calls == [name], (mode, calls)  # traced once inside the scan


def zero_eps(x, mu, t):
  del mu, t
  return jnp.zeros_like(x)


@pytest.mark.parametrize("order,stochastic", [(1, True), (1, False), (2, False), (2, True),
                                              (3, False), (3, True)])
def test_mr_coefficients_match_independent_formulas(sde, order, stochastic):
  """Order 1: the posterior step (SDE) / DDIM (ODE); order 2: DPM-Solver++(2M) as published;
  order 3: the quadratic through the last three outputs integrated by quadrature."""
  ts = sde.timesteps(12, "logsnr")
  cx, cd, sd = sde.mr_coefficients(ts, order, stochastic)
  tb, dt, lam = sde.theta_bar, sde.dt, sde.lam
  m = lambda t: np.exp(-tb[t] * dt)
  sb = lambda t: lam * np.sqrt(1 - m(t) ** 2)
  ell = lambda t: np.log(m(t) / sb(t))
  ts_next = list(ts[1:]) + [0]
  eta, c = (1.0, 2.0) if stochastic else (0.0, 1.0)
  for i, (t, s) in enumerate(zip(ts, ts_next, strict=True)):
    if s == 0:
      np.testing.assert_allclose([cx[i], sd[i], *cd[i]], [0, 0, 1] + [0] * (order - 1))
      continue
    h = ell(s) - ell(t)
    k = min(order, i + 1)
    if k == 1 and stochastic:  # wild-IR Eq. 6-7 between t and s
      e = m(t) / m(s)
      want_x = (1 - m(s) ** 2) / (1 - m(t) ** 2) * e
      want_d = [(1 - e**2) / (1 - m(t) ** 2) * m(s)]
      want_sd = lam * np.sqrt((1 - m(s) ** 2) * (1 - e**2) / (1 - m(t) ** 2))
    else:
      want_x = sb(s) / sb(t) * np.exp(-eta * h)
      want_sd = sb(s) * np.sqrt(1 - np.exp(-2 * eta * h))
      if k == 1:  # DDIM: x̂_0 re-noised with the same ε̂
        want_d = [m(s) - m(t) * sb(s) / sb(t)]
      elif k == 2:
        r = (ell(t) - ell(ts[i - 1])) / h
        a = m(s) * (1 - np.exp(-c * h))
        want_d = [a * (1 + 1 / (2 * r)), -a / (2 * r)]
      else:
        want_d = _mr_weights([ell(ts[i - j]) for j in range(3)], ell(s), m(s), c)
    np.testing.assert_allclose(cx[i], want_x, rtol=1e-9, err_msg=f"step {i}")
    np.testing.assert_allclose(sd[i], want_sd, rtol=1e-9, atol=1e-15, err_msg=f"step {i}")
    np.testing.assert_allclose(cd[i], list(want_d) + [0] * (order - k), rtol=1e-9, atol=1e-15,
                               err_msg=f"step {i}")


def test_logsnr_timesteps(sde):
  for n in range(1, sde.T + 1):
    ts = sde.timesteps(n, "logsnr")
    assert len(ts) == n and ts[0] == sde.T and np.all(np.diff(ts) < 0)
    assert n == 1 or ts[-1] == 1
  # Roughly uniform in ℓ where the integer grid allows: 10 steps over ℓ ∈ [−3.67, 5.60].
  gaps = np.diff(sde.log_snr[sde.timesteps(10, "logsnr")])
  assert np.all(np.abs(gaps / gaps.mean() - 1) < 0.2), gaps
  np.testing.assert_array_equal(sde.timesteps(sde.T, "logsnr"), np.arange(sde.T, 0, -1))
  with pytest.raises(ValueError, match="step schedule"):
    sde.timesteps(10, "karras")


def test_mr_under_jit_with_tiling_and_clip(sde):
  """mr2 inside an outer jit, with the tiled denoiser (a pointwise ε̂ gives the untiled result),
  and clip_x0 applied to every x̂_0 the solver uses."""
  from uir_jax.diffusion.tiling import tiled_eps_fn  # re-exported by systems.daclip_uir.restorers

  mu = jax.random.uniform(jax.random.key(3), (1, 24, 20, 3), minval=0.2, maxval=0.8)
  args = (jnp.asarray(DELTA, jnp.float32), jnp.asarray(S0, jnp.float32))
  eps_fn = _gauss_eps_fn(sde)
  # A biased ε̂ (+0.3) makes x̂_0 ≈ −12 at t = T: clip_x0 has something to do.
  biased = lambda x, m, t, *a: eps_fn(x, m, t, *a) + 0.3
  wild = sde.sample(biased, mu, jax.random.key(4), "mr2", 10, eps_args=args)
  jitted = jax.jit(lambda mu, key, *a: sde.sample(tiled_eps_fn(biased, 12, 4), mu, key, "mr2",
                                                   10, eps_args=a))
  np.testing.assert_allclose(jitted(mu, jax.random.key(4), *args), wild, atol=1e-5)
  # Clamped, every x̂_0 in the history is in [0, 1], so the trajectory differs from the unclamped
  # one, not just by a final clamp.
  tame = sde.sample(biased, mu, jax.random.key(4), "mr2", 10, eps_args=args, clip_x0=True)
  assert float(tame.min()) >= 0 and float(tame.max()) <= 1  # the output is the last x̂_0
  assert float(jnp.abs(tame - jnp.clip(wild, 0, 1)).max()) > 1e-3

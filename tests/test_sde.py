"""IR-SDE: schedule values, marginals, training target, samplers (spec §5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.sde import IRSDE


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


def test_training_pair_is_exact_for_true_noise(sde):
  """With the true ε, the model's mean step is close to the optimum (both estimate x_{t−1})."""
  x0, mu = _images(3)
  t, xt, eps = sde.random_states(jax.random.key(1), x0, mu)
  pred, target = sde.training_pair(eps, xt, x0, mu, t)
  assert pred.shape == target.shape == x0.shape
  assert float(jnp.mean(jnp.abs(pred - target))) < 0.05
  # And a wrong ε gives a clearly worse match: the target really depends on x_0.
  pred_bad, _ = sde.training_pair(-eps, xt, x0, mu, t)
  assert float(jnp.mean(jnp.abs(pred_bad - target))) > 2 * float(jnp.mean(jnp.abs(pred - target)))


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

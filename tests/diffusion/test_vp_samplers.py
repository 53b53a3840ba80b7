"""diffusion.vp: SD's discrete VP process and its samplers (DDIM, DPM-Solver++(2M)) on the generic
solvers, against diffusers' schedulers (PyTorch, the oracle) and the exact Gaussian case.

Gaussian case: data x_0 ~ N(m, s²) per channel, whose exact ε̂(x_t) = σ_t (x_t − α_t m)/(α_t² s² +
σ_t²) is affine in x_t; a deterministic sampler is then an affine map x_T ↦ a x_T + c, and DDIM with
η > 0 a Gaussian chain. The test propagates both from the samplers' published step formulas
(diffusers' `step`, written here in float64 scalars: not the library's generic coefficients).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.diffusion import adapters, solvers
from uir_jax.diffusion.vp import VPProcess, make_betas

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False)
SD = VPProcess.from_config(SD_CONFIG)


def _diffusers(name, **extra):
  diffusers = pytest.importorskip("diffusers")
  cls = {"ddim": diffusers.DDIMScheduler, "dpm++2m": diffusers.DPMSolverMultistepScheduler,
         "unipc": diffusers.UniPCMultistepScheduler}[name]
  cfg = dict(SD_CONFIG)
  if name != "ddim":
    cfg.pop("clip_sample")
    cfg.pop("set_alpha_to_one")
  return cls(**{**cfg, **extra})


@pytest.mark.torch
@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "unipc"])
def test_timesteps_equal_diffusers(name):
  """SD's scheduler config, each spacing, 10 / 20 / 50 steps (and 7, which divides nothing)."""
  for spacing in (None, "leading", "trailing", "linspace"):
    extra = {} if spacing is None else dict(timestep_spacing=spacing)
    ref = _diffusers(name, **extra)
    ours = VPProcess.from_config({**SD_CONFIG, **extra})
    for n in (7, 10, 20, 50):
      ref.set_timesteps(n)
      np.testing.assert_array_equal(ours.timesteps(n, name), ref.timesteps.numpy(),
                                    err_msg=f"{name} {spacing} {n}")


@pytest.mark.torch
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_diffusers(schedule):
  """ᾱ_t (float64 here, float32 there: ~1e-6 relative) for the three β schedules."""
  ref = _diffusers("ddim", beta_schedule=schedule)
  ours = VPProcess(beta_start=ref.config.beta_start, beta_end=ref.config.beta_end,
                   beta_schedule=schedule)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=5e-6,
                             atol=1e-12)


def test_alphas_cumprod_match_spec_values():
  """Spec §3.6 (derived): ᾱ_0 = 0.99915, ᾱ_499 ≈ 0.2777, ᾱ_999 ≈ 0.004660."""
  abar = SD.alphas_cumprod
  np.testing.assert_allclose(abar[[0, 499, 999]], [0.99915, 0.2777, 0.004660], rtol=2e-4)
  np.testing.assert_allclose(make_betas("scaled_linear", 1000, 0.00085, 0.012)[[0, -1]],
                             [0.00085, 0.012], rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# A fixed model function, the same in JAX and torch, against diffusers' scheduler loop.
# ------------------------------------------------------------------------------------------------

SHAPE = (2, 8, 8, 4)


def _model_jax(x, t, *args):
  tt = t.astype(jnp.float32)[:, None, None, None] / 1000.0
  ch = jnp.arange(x.shape[-1], dtype=jnp.float32)
  return x * (0.4 + 0.5 * tt) + 0.3 * jnp.sin(7.0 * tt + ch)


def _model_torch(x, t):
  import torch
  tt = float(t) / 1000.0
  ch = torch.arange(x.shape[-1], dtype=torch.float32)
  return x * (0.4 + 0.5 * tt) + 0.3 * torch.sin(7.0 * tt + ch)


def _diffusers_loop(sched, x_T, n, model, noises=None, **step_kwargs):
  import torch
  sched.set_timesteps(n)
  x = torch.from_numpy(np.asarray(x_T, np.float32))
  for i, t in enumerate(sched.timesteps):
    out = model(x, t)
    kw = dict(step_kwargs)
    if noises is not None:
      kw["variance_noise"] = torch.from_numpy(np.asarray(noises[i], np.float32))
    x = sched.step(out, t, x, **kw).prev_sample
  return x.numpy()


def _step_noises(key, n, shape):
  """The per-step noise `sample_loop` draws (one key per step, `posterior_step`)."""
  return [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(key, n)]


@pytest.mark.torch
@pytest.mark.parametrize("sampler,eta,prediction,n", [
    ("ddim", 0.0, "epsilon", 10), ("ddim", 0.7, "epsilon", 10), ("ddim", 0.0, "v_prediction", 10),
    ("dpm++2m", 0.0, "epsilon", 10), ("dpm++2m", 0.0, "v_prediction", 10),
    ("dpm++2m", 0.0, "epsilon", 20), ("dpm++2m-sigma_min", 0.0, "epsilon", 10),
    ("dpm++2m-sigma_min", 0.0, "epsilon", 20), ("unipc", 0.0, "epsilon", 10),
    ("unipc", 0.0, "v_prediction", 10), ("unipc", 0.0, "epsilon", 20)])
def test_loop_equals_diffusers_loop(sampler, eta, prediction, n):
  """A 10-step run (DPM++ also at 20, past diffusers' lower_order_final threshold of 15, and
  with final_sigmas_type "sigma_min", where the last step is a real second-order step)."""
  torch = pytest.importorskip("torch")
  x_T = np.asarray(jax.random.normal(jax.random.key(0), SHAPE, jnp.float32))
  key = jax.random.key(1)
  proc = VPProcess.from_config({**SD_CONFIG, "prediction_type": prediction})
  final = "sigma_min" if sampler.endswith("sigma_min") else "zero"
  sampler = sampler.split("-")[0]
  ours, _ = proc.sample(_model_jax, jnp.asarray(x_T), key, n, sampler=sampler, eta=eta,
                        final_sigmas_type=final)
  extra = dict(final_sigmas_type=final) if sampler == "dpm++2m" else {}
  ref = _diffusers(sampler, prediction_type=prediction, **extra)
  noises = _step_noises(key, n, SHAPE) if eta else None
  kw = dict(eta=eta) if sampler == "ddim" else {}
  with torch.no_grad():
    theirs = _diffusers_loop(ref, x_T, n, _model_torch, noises, **kw)
  err = float(np.max(np.abs(np.asarray(ours) - theirs)))
  assert err <= 1e-5 * max(1.0, float(np.max(np.abs(theirs)))), err


@pytest.mark.torch
def test_guided_ddim_equals_diffusers_guidance_loop():
  """CFG with a negative prompt: `adapters.ClassifierFreeGuidance` around a context-dependent
  model, 10 DDIM steps, scale 5, against the pipeline's formula in a diffusers loop."""
  torch = pytest.importorskip("torch")
  x_T = np.asarray(jax.random.normal(jax.random.key(2), SHAPE, jnp.float32))
  cond = np.asarray(jax.random.normal(jax.random.key(3), (2, 4)), np.float32)
  neg = np.asarray(jax.random.normal(jax.random.key(4), (2, 4)), np.float32)

  def model(x, t, ctx):
    return _model_jax(x, t) + 0.2 * ctx[:, None, None, :] * jnp.tanh(x)

  cfg = adapters.ClassifierFreeGuidance(model)
  scale = 5.0
  ours, _ = SD.sample(cfg, jnp.asarray(x_T), jax.random.key(5), 10, sampler="ddim",
                      model_args=(jnp.asarray(cond), jnp.asarray(neg), scale))

  def model_torch(x, t):  # diffusers' pipeline: one batch [uncond; cond], then the formula
    xx = torch.cat([x, x])
    ctx = torch.from_numpy(np.concatenate([neg, cond]))
    out = _model_torch(xx, t) + 0.2 * ctx[:, None, None, :] * torch.tanh(xx)
    u, c = out.chunk(2)
    return u + scale * (c - u)

  with torch.no_grad():
    theirs = _diffusers_loop(_diffusers("ddim"), x_T, 10, model_torch, eta=0.0)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5 * np.abs(theirs).max())


# ------------------------------------------------------------------------------------------------
# The analytic Gaussian case.
# ------------------------------------------------------------------------------------------------

M = np.array([0.5, -0.3, 0.0, 1.2])  # data mean per channel
S = np.array([0.2, 0.5, 1.0, 0.05])  # data std per channel
GSHAPE = (8, 64, 64, 4)  # 32,768 samples per channel


def _abar_spec():
  """ᾱ of SD's schedule from spec §3.6, float64, independently of the library."""
  return np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def _gauss_eps(x, t, m, s):
  abar = jnp.asarray(SD.alphas_cumprod, jnp.float32)[t][:, None, None, None]
  a, sg = jnp.sqrt(abar), jnp.sqrt(1 - abar)
  return sg * (x - a * m) / (a * a * s * s + sg * sg)


def _x0_affine(abar, x):
  """Exact x̂_0 = E[x_0 | x_t] as an affine (p, q) of x's (p, q) (x = p x_T + q), per channel."""
  a, sg = math.sqrt(abar), math.sqrt(1 - abar)
  k = sg / (a * a * S * S + sg * sg)  # ε̂ = k (x − a m)
  p, q = x
  return (p - sg * k * p) / a, (q - sg * k * (q - a * M)) / a


def _ddim_law(n, eta):
  """Mean and variance of DDIM's output (diffusers' `step` formulas, scalar float64)."""
  abar_all, r = _abar_spec(), 1000 // n
  ts = np.arange(n)[::-1] * r + 1
  mean, var = np.zeros(4), np.ones(4)
  for t in ts:
    abar, abar_p = abar_all[t], (abar_all[t - r] if t - r >= 0 else abar_all[0])
    # x̂_0 = p x + q (affine in the current x), ε̂ = (x − √ᾱ x̂_0)/√(1 − ᾱ)
    p, q = _x0_affine(abar, (np.ones(4), np.zeros(4)))
    std2 = eta**2 * (1 - abar_p) / (1 - abar) * (1 - abar / abar_p)
    c = math.sqrt(1 - abar_p - std2) / math.sqrt(1 - abar)
    gain = math.sqrt(abar_p) * p + c * (1 - math.sqrt(abar) * p)
    shift = math.sqrt(abar_p) * q - c * math.sqrt(abar) * q
    mean, var = gain * mean + shift, gain**2 * var + std2
  return mean, var


def _ddim_affine(n):
  """DDIM (η = 0)'s output as (a, c): x_0 = a x_T + c (diffusers' step formulas)."""
  abar_all, r = _abar_spec(), 1000 // n
  x = (np.ones(4), np.zeros(4))
  for t in np.arange(n)[::-1] * r + 1:
    abar, abar_p = abar_all[t], (abar_all[t - r] if t - r >= 0 else abar_all[0])
    d = _x0_affine(abar, x)
    c = math.sqrt(1 - abar_p) / math.sqrt(1 - abar)
    x = tuple(math.sqrt(abar_p) * v + c * (u - math.sqrt(abar) * v) for u, v in zip(x, d,
                                                                                     strict=True))
  return x


def _dpm_affine(n):
  """DPM-Solver++(2M)'s output as (a, c): x_0 = a x_T + c (diffusers' step formulas)."""
  abar_all = _abar_spec()
  ts = np.linspace(0, 999, n + 1).round()[::-1][:-1].astype(int)
  lam = lambda ab: 0.5 * math.log(ab / (1 - ab))
  x, hist = (np.ones(4), np.zeros(4)), []
  for i, t in enumerate(ts):
    d0 = _x0_affine(abar_all[t], x)
    if i == n - 1:  # the clean end (final sigma 0): x = x̂_0
      x = d0
      break
    abar_t = abar_all[ts[i + 1]]
    a_t, s_t, s_s = math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(1 - abar_all[t])
    h = lam(abar_t) - lam(abar_all[t])
    if i == 0:  # no previous output yet
      dd = d0
    else:
      r0 = (lam(abar_all[t]) - lam(abar_all[ts[i - 1]])) / h
      d1 = tuple((u - v) / r0 for u, v in zip(d0, hist[-1], strict=True))
      dd = tuple(u + 0.5 * v for u, v in zip(d0, d1, strict=True))
    x = tuple(s_t / s_s * u - a_t * math.expm1(-h) * v for u, v in zip(x, dd, strict=True))
    hist.append(d0)
  return x


def _unipc_affine(n):
  """UniPC (bh2, order 2, lower-order final)'s output as (a, c), from the paper's / diffusers'
  step: UniC (order of the previous UniP) on the new output, then UniP; order 2's weights
  solved by hand (predictor ρ = 1/2; corrector R ρ = b by Cramer's rule)."""
  abar_all = _abar_spec()
  ts = np.linspace(0, 999, n + 1).round()[::-1][:-1].astype(int)
  ab = np.append(abar_all[ts], 1.0)
  al, sg = np.sqrt(ab), np.sqrt(1 - ab)
  with np.errstate(divide="ignore"):
    lam = np.log(al) - np.log(sg)
  lin = lambda *terms: tuple(sum(w * t[k] for w, t in terms) for k in range(2))
  x, x_last, ms, last_order = (np.ones(4), np.zeros(4)), None, [], 0
  for i in range(n):
    m = _x0_affine(ab[i], x)
    if i > 0:  # corrector from point i − 1 to i
      h = lam[i] - lam[i - 1]
      hp1 = math.expm1(-h)
      b1 = (hp1 / -h - 1) / hp1
      if last_order == 1:
        terms = [(sg[i] / sg[i - 1], x_last), (-al[i] * hp1, ms[-1]),
                 (-al[i] * hp1 * 0.5, m), (al[i] * hp1 * 0.5, ms[-1])]
      else:
        r1 = (lam[i - 2] - lam[i - 1]) / h
        b2 = ((hp1 / -h - 1) / -h - 0.5) * 2 / hp1
        det = r1 - 1.0  # R = [[1, 1], [r1, 1]]
        rho0, rho1 = (b2 - b1) / det, (r1 * b1 - b2) / det
        terms = [(sg[i] / sg[i - 1], x_last), (-al[i] * hp1, ms[-1]),
                 (-al[i] * hp1 * rho0 / r1, ms[-2]), (al[i] * hp1 * rho0 / r1, ms[-1]),
                 (-al[i] * hp1 * rho1, m), (al[i] * hp1 * rho1, ms[-1])]
      x = lin(*terms)
    ms.append(m)
    order = min(2, n - i, i + 1)
    x_last, last_order = x, order
    if sg[i + 1] == 0:
      x = m
      continue
    h = lam[i + 1] - lam[i]
    hp1 = math.expm1(-h)
    terms = [(sg[i + 1] / sg[i], x), (-al[i + 1] * hp1, m)]
    if order == 2:
      r1 = (lam[i - 1] - lam[i]) / h
      terms += [(-al[i + 1] * hp1 * 0.5 / r1, ms[-2]), (al[i + 1] * hp1 * 0.5 / r1, m)]
    x = lin(*terms)
  return x


@pytest.fixture(scope="module")
def x_T():
  return jax.random.normal(jax.random.key(7), GSHAPE, jnp.float32)


@pytest.mark.parametrize("sampler,n", [("ddim", 10), ("ddim", 50), ("dpm++2m", 10),
                                       ("dpm++2m", 20), ("unipc", 10), ("unipc", 20)])
def test_deterministic_samplers_are_the_exact_affine_map(x_T, sampler, n):
  """With the exact ε̂ the output is a x_T + c per channel (a, c from the published step
  formulas), pointwise to float32: the output law N(c, a²) is the sampler's exact law."""
  args = (jnp.asarray(M, jnp.float32), jnp.asarray(S, jnp.float32))
  out, _ = SD.sample(_gauss_eps, x_T, jax.random.key(0), n, sampler=sampler, model_args=args)
  a, c = {"ddim": _ddim_affine, "dpm++2m": _dpm_affine, "unipc": _unipc_affine}[sampler](n)
  expect = a * np.asarray(x_T, np.float64) + c
  np.testing.assert_allclose(np.asarray(out), expect, atol=2e-5 * (1 + np.abs(expect).max()))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_output_law(x_T, eta):
  """DDIM with η > 0 (10 steps): per-channel mean and variance of 32,768 samples equal the
  chain's exact law (within 5 standard errors)."""
  args = (jnp.asarray(M, jnp.float32), jnp.asarray(S, jnp.float32))
  out, _ = SD.sample(_gauss_eps, x_T, jax.random.key(1), 10, sampler="ddim", eta=eta,
                     model_args=args)
  mean, var = _ddim_law(10, eta)
  y = np.asarray(out, np.float64).reshape(-1, 4)
  k = y.shape[0]
  np.testing.assert_allclose(y.mean(0), mean, atol=5 * np.sqrt(var / k).max())
  np.testing.assert_allclose(y.var(0) / var, 1.0, atol=5 * np.sqrt(2 / k))
  assert np.any(np.abs(_ddim_law(10, 0.0)[1] - var) > 6 * np.sqrt(2 / k) * var), "η inert"


def test_ddim_eta_one_is_the_posterior_step():
  """η = 1: `ddim_coefficients` equal `posterior_coefficients` (general (α, σ) form)."""
  ts, (a, s, a2, s2) = SD.ddim_points(10)
  for x, y in zip(solvers.ddim_coefficients(a, s, a2, s2, 1.0),
                  solvers.posterior_coefficients(a, s, a2, s2), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-10)


def test_bad_arguments():
  with pytest.raises(ValueError, match="beta_schedule"):
    VPProcess(beta_schedule="cosine")
  with pytest.raises(ValueError, match="prediction"):
    VPProcess(prediction="score")
  with pytest.raises(ValueError, match="timestep_spacing"):
    VPProcess(timestep_spacing="uniform")
  with pytest.raises(ValueError, match="sampler"):
    SD.sample(_gauss_eps, jnp.zeros((1, 2, 2, 4)), jax.random.key(0), 4, sampler="euler")
  with pytest.raises(ValueError, match="num_steps"):
    SD.timesteps(0)
  with pytest.raises(ValueError, match="final_sigmas_type"):
    SD.sample(_gauss_eps, jnp.zeros((1, 2, 2, 4)), jax.random.key(0), 4, sampler="unipc",
              final_sigmas_type="sigma_min")
  with pytest.raises(ValueError, match="trained_betas"):
    VPProcess.from_config({**SD_CONFIG, "trained_betas": [0.1, 0.2]})

"""The mean-reverting SDE of IR-SDE (Luo et al. 2023) used by DA-CLIP's restorers.

    dx = θ_t (μ − x) dt + σ_t dW,      μ = the low-quality image,  t ∈ {1, …, T}

Everything here follows `reference/daclip_uir_spec.md` §5 and the posterior sampler of the wild-IR
paper (Eq. 5–8). Notation (all per-step arrays have length T + 1; index 0 is the base):

    λ        = max_sigma / 255                   stationary std (`lam`)
    θ_t      = schedule                          (`theta`)
    θ̄_t      = Σ_{k=1..t} θ_k                    (`theta_bar`, θ̄_0 = 0)
    dt       = −ln(eps) / θ̄_T                    so that m_T = eps
    m_t      = exp(−θ̄_t dt)                      mean decay of the marginal (`m`)
    σ_t      = sqrt(2 λ² θ_t)                    (`sigma`)
    σ̄_t      = λ sqrt(1 − m_t²)                  marginal std (`sigma_bar`)

    x_t | x_0  ~  N(μ + (x_0 − μ) m_t,  σ̄_t²)

The network predicts ε̂ = (x_t − E[x_t | x_0]) / σ̄_t ("noise"); score = −ε̂ / σ̄_t.

In y = x − μ this is the Gaussian process y_t = m_t y_0 + σ̄_t ε, i.e. α_t = m_t and σ_t = σ̄_t in
the notation of `diffusion.solvers`, which supplies the process-agnostic parts: the posterior step
(used for the "posterior" sampler and the ML training target) and the multistep exponential
integrator of the few-step modes. This module keeps what is specific to IR-SDE: the schedule, the
marginals and ε̂ relations, the Euler steps of the reverse SDE / ODE and the timestep spacing.

The whole reverse loop is `diffusion.loop.sample_loop`, one jitted `lax.scan`, so sampling
compiles once per input shape and never re-traces per step. `num_steps < T` runs the posterior
sampler on a subsequence of timesteps using the exact Gaussian posterior between non-adjacent steps
(a capability the PyTorch reference does not have): between s < t the OU process gives
x_t − μ = (m_t/m_s)(x_s − μ) + noise, so the one-step formulas hold with a_t replaced by m_t / m_s.

The few-step solver (modes "mr2", "mr3" and their "-sde" variants; `IRSDE.mr_coefficients`) solves
the linear (OU) part of the reverse ODE / SDE exactly and integrates the network's x̂_0 with a
multistep exponential integrator in ℓ = log(m_t / σ̄_t), as DPM-Solver++ and the MR Sampler do;
"posterior" is its first-order SDE member. Every sampler's step is an `IRSDE` method, and the
compiled loop only calls those methods.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.diffusion import solvers
from uir_jax.diffusion.loop import sample_loop

Array = jax.Array
# eps_fn(x_t [B,H,W,C], mu [B,H,W,C], t int32 [B], *eps_args) -> predicted noise [B,H,W,C]
EpsFn = Callable[..., Array]

SCHEDULES = ("cosine", "linear", "constant")
# (order, stochastic) of the few-step solver's modes (`IRSDE.mr_coefficients`).
_MR_MODES = {"mr2": (2, False), "mr3": (3, False), "mr2-sde": (2, True), "mr3-sde": (3, True)}
MODES = ("posterior", "sde", "ode", *_MR_MODES)
STEP_SCHEDULES = ("time", "logsnr")  # spacing of num_steps < T steps (`IRSDE.timesteps`)


def _theta_schedule(name: str, T: int) -> np.ndarray:
  """θ_0..θ_T in float64 (spec §5.1; the reference computes the same in float32)."""
  if name == "cosine":
    # θ_t = 1 − ᾱ_{t+1} of the improved-DDPM cosine schedule on n = T + 2 steps, s = 0.008.
    n = T + 2
    s = 0.008
    k = np.arange(n + 1, dtype=np.float64)
    alpha_bar = np.cos(((k / n) + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return 1.0 - alpha_bar[1:-1]
  if name == "linear":
    scale = 1000.0 / (T + 1)
    return np.linspace(scale * 1e-4, scale * 0.02, T + 1, dtype=np.float64)
  if name == "constant":
    return np.ones(T + 1, dtype=np.float64)
  raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


class IRSDE:
  """IR-SDE schedule, marginals, training targets and samplers.

  Attributes (float64 numpy arrays of length T + 1, indexed by the timestep t):
    theta, theta_bar, sigma, sigma_bar, m; scalars `lam` (λ), `dt`, `T`.
  """

  def __init__(self, max_sigma: float = 50, T: int = 100, schedule: str = "cosine",
               eps: float = 0.005):
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
      raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if not 0.0 < eps < 1.0:
      raise ValueError(f"eps (the mean decay m_T at the last step) must be in (0, 1), got {eps!r}")
    if not max_sigma > 0:
      raise ValueError(f"max_sigma must be > 0, got {max_sigma!r}")
    self.T = int(T)
    self.schedule = schedule
    self.eps = float(eps)
    self.max_sigma = float(max_sigma)
    # The reference divides by 255 only when max_sigma > 1 (smaller values are in [0, 1] units).
    self.lam = self.max_sigma / 255.0 if self.max_sigma > 1 else self.max_sigma

    theta = _theta_schedule(schedule, self.T)
    theta_bar = np.cumsum(theta) - theta[0]  # θ̄_0 = 0: index 0 is only the cumsum's base.
    self.theta = theta
    self.theta_bar = theta_bar
    self.dt = float(-math.log(self.eps) / theta_bar[-1])
    self.sigma = np.sqrt(2.0 * self.lam**2 * theta)
    self.m = np.exp(-theta_bar * self.dt)
    self.sigma_bar = self.lam * np.sqrt(1.0 - self.m**2)
    # float32 device copies for jitted code.
    self._tables = {k: jnp.asarray(getattr(self, k), jnp.float32)
                    for k in ("theta", "theta_bar", "sigma", "sigma_bar", "m")}

  def __repr__(self) -> str:
    return (f"IRSDE(max_sigma={self.max_sigma:g}, T={self.T}, schedule={self.schedule!r}, "
            f"eps={self.eps:g})")

  # ------------------------------------------------------------------------------------------
  # Per-timestep lookups. `t` is an int array of shape [B]; results broadcast against [B, H, W, C].
  # ------------------------------------------------------------------------------------------

  def _at(self, name: str, t: Array, ndim: int) -> Array:
    t = jnp.asarray(t)
    if t.ndim != 1:
      raise ValueError(f"timesteps must have shape [batch], got shape {t.shape}")
    v = self._tables[name][t.astype(jnp.int32)]
    return v.reshape(v.shape + (1,) * (ndim - 1))

  @staticmethod
  def _check_same_shape(**arrays: Any) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
      desc = ", ".join(f"{k}={s}" for k, s in shapes.items())
      raise ValueError(f"shape mismatch: {desc}")

  def _check_t(self, t: Array, batch: int) -> None:
    shape = jnp.shape(t)
    if shape != (batch,):
      raise ValueError(f"timesteps must have shape [batch]=({batch},), got {shape}")

  # ------------------------------------------------------------------------------------------
  # Forward process and marginals (spec §5.2).
  # ------------------------------------------------------------------------------------------

  def marginal_mean(self, x0: Array, mu: Array, t: Array) -> Array:
    """E[x_t | x_0] = μ + (x_0 − μ) m_t."""
    self._check_same_shape(x0=x0, mu=mu)
    self._check_t(t, x0.shape[0])
    return mu + (x0 - mu) * self._at("m", t, x0.ndim)

  def marginal_std(self, t: Array, ndim: int = 4) -> Array:
    """σ̄_t, broadcastable to an [B, ...] array of rank `ndim`."""
    return self._at("sigma_bar", t, ndim)

  def q_sample(self, x0: Array, mu: Array, t: Array, noise: Array) -> Array:
    """x_t = μ + (x_0 − μ) m_t + σ̄_t ε for given noise ε."""
    self._check_same_shape(x0=x0, mu=mu, noise=noise)
    return self.marginal_mean(x0, mu, t) + self._at("sigma_bar", t, x0.ndim) * noise

  def random_states(self, key: Array, x0: Array, mu: Array) -> tuple[Array, Array, Array]:
    """Training states (`generate_random_states`): t ~ U{1..T} per sample and x_t ~ q(x_t | x_0).

    Returns:
      (t int32 [B], x_t [B, H, W, C] float32, noise ε [B, H, W, C]).
    """
    self._check_same_shape(x0=x0, mu=mu)
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 1, self.T + 1, dtype=jnp.int32)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    return t, self.q_sample(x0, mu, t, noise).astype(jnp.float32), noise

  def forward_step(self, key: Array, x: Array, mu: Array, t: Array) -> Array:
    """One Euler–Maruyama step of the forward SDE: x + θ_t(μ − x)dt + σ_t sqrt(dt) z."""
    self._check_same_shape(x=x, mu=mu)
    z = jax.random.normal(key, x.shape, x.dtype)
    th, sg = self._at("theta", t, x.ndim), self._at("sigma", t, x.ndim)
    return x + th * (mu - x) * self.dt + sg * math.sqrt(self.dt) * z

  def noise_state(self, key: Array, mu: Array) -> Array:
    """Initial sampling state x_T = μ + λ z (`noise_state`)."""
    return mu + self.lam * jax.random.normal(key, mu.shape, jnp.float32)

  # ------------------------------------------------------------------------------------------
  # Noise / score / x̂₀ relations (spec §5.3).
  # ------------------------------------------------------------------------------------------

  def score_from_noise(self, eps: Array, t: Array) -> Array:
    """score = −ε̂ / σ̄_t."""
    return -eps / self._at("sigma_bar", t, eps.ndim)

  def x0_from_noise(self, x: Array, mu: Array, eps: Array, t: Array) -> Array:
    """x̂_0 = μ + (x_t − μ − σ̄_t ε̂) / m_t."""
    self._check_same_shape(x=x, mu=mu, eps=eps)
    sb, m = self._at("sigma_bar", t, x.ndim), self._at("m", t, x.ndim)
    return mu + (x - mu - sb * eps) / m

  def noise_from_x0(self, x: Array, x0: Array, mu: Array, t: Array) -> Array:
    """The true ε given x_0: (x_t − E[x_t | x_0]) / σ̄_t (`get_real_noise`; an oracle denoiser)."""
    return (x - self.marginal_mean(x0, mu, t)) / self._at("sigma_bar", t, x.ndim)

  # ------------------------------------------------------------------------------------------
  # Training objective (spec §5.4): L1( x̂_{t−1}, x*_{t−1} ).
  # ------------------------------------------------------------------------------------------

  def reverse_sde_step_mean(self, x: Array, mu: Array, eps: Array, t: Array) -> Array:
    """The model's reverse-SDE mean step x_t − [θ_t(μ − x_t) − σ_t² score] dt (no noise)."""
    self._check_same_shape(x=x, mu=mu, eps=eps)
    th, sg = self._at("theta", t, x.ndim), self._at("sigma", t, x.ndim)
    score = self.score_from_noise(eps, t)
    return x - (th * (mu - x) - sg**2 * score) * self.dt

  def reverse_optimum_step(self, x: Array, x0: Array, mu: Array, t: Array) -> Array:
    """The optimal x*_{t−1} = E[x_{t−1} | x_t, x_0] (the maximum-likelihood training target)."""
    self._check_same_shape(x=x, x0=x0, mu=mu)
    self._check_t(t, x.shape[0])
    coef_t, coef_0, _ = self._posterior(t, t - 1, x.ndim)
    return mu + coef_t * (x - mu) + coef_0 * (x0 - mu)

  def training_pair(self, eps: Array, x: Array, x0: Array, mu: Array,
                    t: Array) -> tuple[Array, Array]:
    """(prediction, target) for the matching loss: the model's mean step and the optimum."""
    return self.reverse_sde_step_mean(x, mu, eps, t), self.reverse_optimum_step(x, x0, mu, t)

  # ------------------------------------------------------------------------------------------
  # Reverse steps (spec §5.5–5.7).
  # ------------------------------------------------------------------------------------------

  def reverse_sde_step(self, key: Array, x: Array, mu: Array, eps: Array, t: Array) -> Array:
    """x − [θ_t(μ − x) − σ_t² score] dt − σ_t sqrt(dt) z."""
    sg = self._at("sigma", t, x.ndim)
    z = jax.random.normal(key, x.shape, x.dtype)
    return self.reverse_sde_step_mean(x, mu, eps, t) - sg * math.sqrt(self.dt) * z

  def reverse_ode_step(self, x: Array, mu: Array, eps: Array, t: Array) -> Array:
    """x − [θ_t(μ − x) − ½ σ_t² score] dt."""
    th, sg = self._at("theta", t, x.ndim), self._at("sigma", t, x.ndim)
    score = self.score_from_noise(eps, t)
    return x - (th * (mu - x) - 0.5 * sg**2 * score) * self.dt

  def reverse_posterior_step(self, key: Array, x: Array, mu: Array, eps: Array, t: Array,
                             t_prev: Array | None = None, *, clip_x0: bool = False) -> Array:
    """Posterior sampling step: x_{s} ~ q(x_s | x_t, x̂_0(ε̂)), s = t − 1 unless `t_prev` is given.

    x, mu, eps: [B, H, W, C]; t, t_prev: int [B]. `clip_x0` clamps x̂_0 to [0, 1] first.
    """
    t_prev = t - 1 if t_prev is None else t_prev
    x0 = self.x0_from_noise(x, mu, eps, t)
    if clip_x0:
      x0 = jnp.clip(x0, 0.0, 1.0)
    # Variances in units of λ², clamped at 1e-20·dt as the reference does (spec §5.7).
    return solvers.posterior_step(key, x, x0, self._posterior(t, t_prev, x.ndim), offset=mu,
                                  min_var=1e-20 * self.dt, scale=self.lam)

  def _posterior(self, t: Array, t_prev: Array, ndim: int) -> tuple[Array, Array, Array]:
    """(coef_t, coef_0, var / λ²) of q(x_s | x_t, x_0) in x − μ between t and t_prev < t: the OU
    process has σ̄² = λ² (1 − m²), so the cancellation-free VP form applies."""
    return solvers.vp_posterior_coefficients(self._at("m", t, ndim), self._at("m", t_prev, ndim))

  # ------------------------------------------------------------------------------------------
  # Few-step solver: exact linear part, exponential integrator on x̂_0 (modes "mr2", "mr3", ...).
  # ------------------------------------------------------------------------------------------

  @property
  def log_snr(self) -> np.ndarray:
    """ℓ_t = log(m_t / σ̄_t), float64 [T + 1], increasing as t decreases (ℓ_0 = +inf)."""
    return solvers.log_snr(self.m, self.sigma_bar)

  def mr_coefficients(self, ts: np.ndarray, order: int,
                      stochastic: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step coefficients of the multistep exponential integrator visiting `ts`, then 0.

    In y = x − μ the forward marginal is y_t = m_t y_0 + σ̄_t ε, a linear Gaussian process with
    signal scale α_t = m_t and noise scale σ_t = σ̄_t, so the coefficients are those of
    `solvers.multistep_coefficients` on the tables (m, σ̄) at ts and 0: exact linear part, the
    network's x̂_0 − μ integrated by a polynomial of `order` in ℓ = log(m/σ̄) (1: DDIM / the
    posterior step; 2: DPM-Solver++(2M); 3: exponential Adams–Bashforth). This is the MR Sampler
    idea (Li et al., ICLR 2025), written for these discrete tables: the network is only ever
    called at integer t, where it was trained. The final step, to t = 0 where σ̄_0 = 0, returns
    x̂_0 of the last call (first order), as the posterior sampler does.

    Args:
      ts: descending network-evaluation timesteps [n] (from `timesteps`).
      order: polynomial order (1 = DDIM / posterior, 2, 3).
      stochastic: False for the ODE (η = 0), True for the SDE (η = 1).

    Returns:
      float64 (coef_x [n], coef_d [n, order], std [n]); step i maps x at ts[i] to
      μ + coef_x[i] (x − μ) + Σ_j coef_d[i, j] (x̂_0 of call i − j − μ) + std[i] z.
    """
    points = np.append(np.asarray(ts, np.int64), 0)
    return solvers.multistep_coefficients(self.m[points], self.sigma_bar[points], order,
                                          stochastic)

  def reverse_mr_step(self, key: Array, x: Array, mu: Array, eps: Array, t: Array,
                      x0_hist: Array, coef_x: Array, coef_d: Array, std: Array, *,
                      clip_x0: bool = False) -> tuple[Array, Array]:
    """One step of the few-step solver (coefficients from `mr_coefficients`).

    Args:
      key: PRNG key for the step's noise (unused when std is None).
      x, mu, eps: [B, H, W, C]; t: int [B] (the current timestep, for x̂_0).
      x0_hist: [order − 1, B, H, W, C], the previous calls' x̂_0, newest first (entries whose
        coefficient is 0, i.e. before the first calls, are ignored).
      coef_x: scalar; coef_d: [order]; std: scalar, or None for the ODE (no noise drawn).
      clip_x0: clamp x̂_0 to [0, 1] before it enters the step (and the history).

    Returns:
      (x at the next timestep [B, H, W, C], updated x0_hist).
    """
    x0 = self.x0_from_noise(x, mu, eps, t)
    if clip_x0:
      x0 = jnp.clip(x0, 0.0, 1.0)
    return solvers.multistep_step(key, x, x0, x0_hist, coef_x, coef_d, std, offset=mu)

  # ------------------------------------------------------------------------------------------
  # Samplers.
  # ------------------------------------------------------------------------------------------

  def timesteps(self, num_steps: int | None = None, schedule: str = "time") -> np.ndarray:
    """The descending timesteps a sampler visits: T..1, or a subsequence of `num_steps` of them.

    The subsequence always starts at T (where x_T = μ + λz matches the marginal) and ends at 1.
    schedule "time" spaces them uniformly in t; "logsnr" uniformly in ℓ_t = log(m_t / σ̄_t) as far
    as distinct integer steps allow (ℓ changes fastest near t = 1, where it then takes every step).
    """
    n = self.T if num_steps is None else num_steps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.T:
      raise ValueError(f"num_steps must be an integer in 1..T={self.T}, got {num_steps!r}")
    if schedule not in STEP_SCHEDULES:
      raise ValueError(f"unknown step schedule {schedule!r}; expected one of {STEP_SCHEDULES}")
    if n == 1:
      return np.array([self.T], np.int32)
    if schedule == "time":
      ts = np.unique(np.round(np.linspace(1, self.T, n)).astype(np.int32))[::-1]
    else:
      ell = self.log_snr
      ts, prev = [], self.T + 1
      for i, target in enumerate(np.linspace(ell[self.T], ell[1], n)):
        # Nearest ℓ among the integers below the previous step that leave room for the rest.
        cand = np.arange(n - i, prev)
        prev = int(cand[np.argmin(np.abs(ell[cand] - target))])
        ts.append(prev)
      ts = np.asarray(ts, np.int32)
    if len(ts) != n or ts[0] != self.T or ts[-1] != 1 or np.any(np.diff(ts) >= 0):
      raise AssertionError(f"bad timestep subsequence {ts} for n={n}")  # invariant check
    return ts.copy()

  def sample(self, eps_fn: EpsFn, mu: Array, key: Array, mode: str = "posterior",
             num_steps: int | None = None, *, x_T: Array | None = None,
             eps_args: tuple = (), clip_x0: bool = False, step_schedule: str | None = None,
             return_path: bool = False) -> Array | tuple[Array, Array]:
    """Runs the reverse process from x_T = μ + λz (or `x_T`) to an estimate of x_0.

    Args:
      eps_fn: denoiser `eps_fn(x, mu, t, *eps_args) -> ε̂`, t an int32 array [B]. It is a static
        argument of the compiled sampler: pass the same function object to reuse the compilation,
        and pass large arrays (model weights, conditioning) through `eps_args` rather than
        closing over them, so they are not baked into the program as constants.
      mu: the low-quality image(s), [B, H, W, C] float in [0, 1].
      key: PRNG key for the initial state and the per-step noise.
      mode: "posterior" (wild-IR's sampler, the reference default; the last step returns x̂_0),
        "sde" (reverse SDE, the ICLR paper's sampler), "ode" (probability-flow ODE, Euler), or
        the few-step solver (`mr_coefficients`): "mr2" / "mr3" (second / third-order
        exponential integrator of the probability-flow ODE; deterministic after x_T) and
        "mr2-sde" / "mr3-sde" (the same for the reverse SDE; "mr1-sde" would be "posterior").
      num_steps: number of network evaluations; < T is supported for "posterior" and "mr*".
      x_T: optional initial state (default μ + λz drawn from `key`).
      eps_args: extra (traced) arguments forwarded to `eps_fn`.
      clip_x0: posterior and mr modes: clamp each step's x̂_0 to [0, 1] (like DDPM's
        `clip_denoised`). Not in the reference (default off). x̂_0 divides by m_t, which is 0.005
        at t = T, so a partly trained denoiser's errors are amplified 200x; clamping keeps the
        sampler stable for such models and changes nothing for an accurate one.
      step_schedule: how `num_steps` < T steps are spaced (`timesteps`): "time" or "logsnr".
        Default: "time" for "posterior" (the reference's spacing), "logsnr" for the mr modes.
      return_path: also return the state after every step, [num_steps, B, H, W, C] (the last
        entry is the output), e.g. to check intermediate marginals.

    Returns:
      The restored image(s), same shape as `mu` (unclipped, like the reference); with
      `return_path`, (restored, path).
    """
    if mode not in MODES:
      raise ValueError(f"unknown sampling mode {mode!r}; expected one of {MODES}")
    if step_schedule is None:
      step_schedule = "logsnr" if mode in _MR_MODES else "time"
    ts = self.timesteps(num_steps, step_schedule)
    if mode in ("sde", "ode") and len(ts) != self.T:
      raise ValueError(
          f"num_steps={num_steps} < T={self.T} is only supported for mode='posterior' and the "
          f"mr modes (the {mode!r} sampler is a fixed-step Euler discretisation of the SDE)")
    mu = jnp.asarray(mu)
    if mu.ndim != 4:
      raise ValueError(f"mu must be a batch of images [B, H, W, C], got shape {mu.shape}")
    k_init, k_loop = jax.random.split(key)
    if x_T is None:
      x_T = self.noise_state(k_init, mu)
    else:
      self._check_same_shape(x_T=x_T, mu=mu)
    if clip_x0 and mode in ("sde", "ode"):
      raise ValueError("clip_x0 applies to mode='posterior' and the mr modes only (the SDE/ODE "
                       "samplers never form x̂_0)")
    ts_prev = np.concatenate([ts[1:], [0]]).astype(np.int32)
    order, coefs = 1, None
    if mode in _MR_MODES:
      order, stochastic = _MR_MODES[mode]
      cx, cd, sd = self.mr_coefficients(ts, order, stochastic)
      # The ODE draws no noise at all (None is an empty pytree leaf in the scan).
      coefs = (jnp.asarray(cx, jnp.float32), jnp.asarray(cd, jnp.float32),
               jnp.asarray(sd, jnp.float32) if stochastic else None)
    stepper = _Stepper(self, mode, bool(clip_x0), order)
    x, path = sample_loop(stepper, _MuFirst(eps_fn), x_T, k_loop, jnp.asarray(ts),
                          (jnp.asarray(ts_prev), coefs), (mu, *eps_args), (mu,),
                          return_path=bool(return_path))
    return (x, path) if return_path else x


# ----------------------------------------------------------------------------------------------
# The pieces `sample` hands to the generic loop. Frozen dataclasses compare by value (the IRSDE
# instance by identity), so equal settings hit the loop's compilation cache.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _MuFirst:
  """The loop's model signature (x, t, mu, *eps_args) over IR-SDE's eps_fn(x, mu, t, *eps_args)."""

  eps_fn: EpsFn

  def __call__(self, x: Array, t: Array, mu: Array, *eps_args: Any) -> Array:
    return self.eps_fn(x, mu, t, *eps_args)


@dataclasses.dataclass(frozen=True)
class _Stepper:
  """One sampler mode as a solver of `sample_loop`: each step is one of the IRSDE's step methods
  (looked up when the loop is traced). Per-step inputs: (t_prev, mr coefficients or None)."""

  sde: IRSDE
  mode: str
  clip_x0: bool
  order: int  # > 1: the mr modes carry the previous calls' x̂_0 (zeros until filled)

  def init(self, x: Array) -> Array:
    return jnp.zeros((self.order - 1,) + x.shape, x.dtype)

  def step(self, key: Array, x: Array, hist: Array, eps: Array, t: Array, inputs: Any,
           mu: Array) -> tuple[Array, Array]:
    t_prev, coef = inputs
    sde = self.sde
    if self.mode == "posterior":
      x = sde.reverse_posterior_step(key, x, mu, eps, t, jnp.full_like(t, t_prev),
                                     clip_x0=self.clip_x0)
    elif self.mode == "sde":
      x = sde.reverse_sde_step(key, x, mu, eps, t)
    elif self.mode == "ode":
      x = sde.reverse_ode_step(x, mu, eps, t)
    else:
      x, hist = sde.reverse_mr_step(key, x, mu, eps, t, hist, *coef, clip_x0=self.clip_x0)
    return x, hist

"""Solvers for Gaussian diffusion processes, written on the process's (α_t, σ_t) tables only.

A Gaussian diffusion process is, in y = x − offset (offset μ for IR-SDE, 0 for DDPM / Stable
Diffusion),

    y_t = α_t y_0 + σ_t ε,      ε ~ N(0, I),      log-SNR  λ_t = log(α_t / σ_t),

with Markov transitions y_t | y_s ~ N((α_t/α_s) y_s, σ_t² − (α_t/α_s)² σ_s²) for s before t (less
noise). Nothing below knows which process produced the tables:

  IR-SDE (`diffusion.irsde`):  α_t = m_t = exp(−θ̄_t dt),  σ_t = σ̄_t = λ sqrt(1 − m_t²),  offset μ
  DDPM / SD (ε, v targets):    α_t = sqrt(ᾱ_t),  σ_t = sqrt(1 − ᾱ_t),  offset 0

Two families of steps:

- `posterior_coefficients` / `posterior_step`: the first-order stochastic step y_s ~ q(y_s | y_t,
  ŷ_0) (DDPM's ancestral step, IR-SDE's "posterior" sampler, DDIM with η = 1).
- `multistep_coefficients` / `multistep_step`: the multistep exponential integrator in data
  (x̂_0) prediction that solves the linear part exactly: order 1 is DDIM (ODE) or the posterior step
  (SDE); order 2 is DPM-Solver++(2M) (and its SDE variant); order 3 integrates the quadratic
  through the last three outputs against the kernel (exponential Adams–Bashforth, as DEIS).

Coefficients are computed once on the host in float64 from the tables at the visited points; the
jitted loop (`diffusion.loop`) only multiplies arrays by them. `PosteriorSolver` and
`MultistepSolver` are those steps as solvers of `diffusion.loop.sample_loop`, for a model of any
prediction type (`diffusion.adapters`):

    solver = MultistepSolver(order=2, stochastic=False, prediction="eps")
    x0, _ = sample_loop(solver, model_fn, x_T, key, ts, solver.inputs(alphas, sigmas), args)

with alphas, sigmas the tables at ts followed by the end point.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.diffusion import adapters

Array = jax.Array


def log_snr(alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """λ = log(α / σ) elementwise, float64 (+inf where σ = 0, i.e. at the clean end)."""
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(alpha, np.float64)) - np.log(np.asarray(sigma, np.float64))


# ------------------------------------------------------------------------------------------------
# First-order posterior step (any Gaussian process).
# ------------------------------------------------------------------------------------------------


def posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s):
  """q(y_s | y_t, y_0) = N(coef_t y_t + coef_0 y_0, var) for s before t (σ_s < σ_t), any process.

  Numpy or jax arrays (broadcasting). With a = α_t/α_s and the transition variance
  σ_{t|s}² = σ_t² − a² σ_s²: coef_t = a σ_s²/σ_t², coef_0 = α_s σ_{t|s}²/σ_t²,
  var = σ_{t|s}² σ_s²/σ_t². The subtraction cancels for close points: prefer float64, or
  `vp_posterior_coefficients` where it applies.

  Returns:
    (coef_t, coef_0, var), broadcast shapes of the inputs.
  """
  a = alpha_t / alpha_s
  var_t, var_s = sigma_t**2, sigma_s**2
  var_ts = var_t - a * a * var_s
  return a * var_s / var_t, alpha_s * var_ts / var_t, var_ts * var_s / var_t


def vp_posterior_coefficients(alpha_t, alpha_s):
  """`posterior_coefficients` for processes with σ² = c² (1 − α²), var in units of c².

  DDPM / Stable Diffusion (c = 1, α = sqrt(ᾱ)) and IR-SDE's Ornstein–Uhlenbeck process (c = λ,
  α = m) are of this kind; then σ_{t|s}² = c² (1 − a²) has no cancellation, and
    coef_t = a (1 − α_s²)/(1 − α_t²),  coef_0 = α_s (1 − a²)/(1 − α_t²),
    var / c² = (1 − a²)(1 − α_s²)/(1 − α_t²)
  (diffusers' DDPMScheduler: β_t = 1 − a² for adjacent steps; IR-SDE: spec §5.4 / §5.7).
  """
  a = alpha_t / alpha_s
  denom = 1.0 - alpha_t**2
  var_s = 1.0 - alpha_s**2
  return a * var_s / denom, alpha_s * (1.0 - a**2) / denom, (1.0 - a**2) * var_s / denom


def ddim_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, eta):
  """DDIM's step from t to s (σ_s < σ_t) as (coef_t, coef_0, var) for `posterior_step`.

  x_s = α_s ŷ_0 + sqrt(σ_s² − v) ε̂ + sqrt(v) z with ε̂ = (x_t − α_t ŷ_0)/σ_t and v = η² times the
  posterior variance σ_{t|s}² σ_s²/σ_t² (σ_{t|s}² = σ_t² − (α_t/α_s)² σ_s²), so coef_t =
  sqrt(σ_s² − v)/σ_t, coef_0 = α_s − α_t coef_t. η = 0: the ODE (order-1 `multistep_coefficients`);
  η = 1: exactly `posterior_coefficients`. Numpy float64 recommended (host-side tables).
  """
  a = alpha_t / alpha_s
  var = eta**2 * (sigma_t**2 - a * a * sigma_s**2) * sigma_s**2 / sigma_t**2
  coef_t = np.sqrt(np.maximum(sigma_s**2 - var, 0.0)) / sigma_t
  return coef_t, alpha_s - alpha_t * coef_t, var


def posterior_step(key: Array, x: Array, x0: Array, coefs: tuple, *, offset: Array | None = None,
                   min_var: float = 0.0, scale: float = 1.0) -> Array:
  """One ancestral step x_s ~ q(x_s | x_t = x, x_0 = x0), x and x0 [B, ...].

  coefs: (coef_t, coef_0, var) from `posterior_coefficients` / `vp_posterior_coefficients`,
  broadcastable to x (e.g. [B, 1, 1, 1]). offset: the process's offset (μ for IR-SDE), None for 0.
  The std is scale · sqrt(max(var, min_var)): `scale` c for variances in units of c²; `min_var`
  floors the variance (IR-SDE's reference clamps at 1e-20·dt, so its last step, where the
  variance is 0, still adds noise of order 1e-11).
  """
  coef_t, coef_0, var = coefs
  if offset is None:
    mean = coef_t * x + coef_0 * x0
  else:
    mean = offset + coef_t * (x - offset) + coef_0 * (x0 - offset)
  std = jnp.exp(0.5 * jnp.log(jnp.maximum(var, min_var))) * scale
  return mean + std * jax.random.normal(key, x.shape, x.dtype)


def _points(alphas: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """α, σ at the points of a trajectory as float64, checked: 1-D, equal length, >= 2."""
  alphas, sigmas = np.asarray(alphas, np.float64), np.asarray(sigmas, np.float64)
  if alphas.ndim != 1 or alphas.shape != sigmas.shape or len(alphas) < 2:
    raise ValueError(f"alphas and sigmas must be 1-D of equal length >= 2 (n points + target), "
                     f"got shapes {alphas.shape} and {sigmas.shape}")
  return alphas, sigmas


# ------------------------------------------------------------------------------------------------
# Multistep exponential integrator in data prediction.
# ------------------------------------------------------------------------------------------------


def multistep_coefficients(alphas: np.ndarray, sigmas: np.ndarray, order: int,
                           stochastic: bool, orders: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-step coefficients of the multistep exponential integrator along a trajectory.

  The probability-flow ODE (η = 0) and the reverse SDE (η = 1) of the process, written for the
  data prediction D = ŷ_0 in λ = log(α/σ), have the exact solution from point s to the next point
  t (h = λ_t − λ_s > 0, c = 1 + η):

    y_t = (σ_t/σ_s) e^{−ηh} y_s + α_t ∫_0^h c e^{−c(h−u)} D(λ_s + u) du + σ_t sqrt(1 − e^{−2ηh}) z

  (for a constant D this is DDIM when η = 0 and exactly `posterior_step` when η = 1). Only the
  integral is approximated, from the last k = min(order, i + 1) network outputs: k = 1 holds D
  constant; k = 2 is DPM-Solver++(2M) (the line through the last two outputs read at the
  interval's midpoint); k = 3 integrates the quadratic through the last three exactly against the
  kernel (exponential Adams–Bashforth, as DEIS). A step to a point with σ = 0 (λ = ∞: the clean
  end) returns the last output D (first order), as DDPM / DPM-Solver++ with a zero final sigma do.

  Args:
    alphas, sigmas: float [n + 1]: α and σ at the n network-evaluation points (noisiest first)
      followed by the point the last step lands on.
    order: polynomial order (1 = DDIM / posterior, 2, 3).
    stochastic: False for the ODE (η = 0), True for the SDE (η = 1).
    orders: optional int [n], a cap on each step's order (diffusers' DPM-Solver++ and UniPC
      drop to first order at the last one or two steps: "lower_order_final").

  Returns:
    float64 (coef_x [n], coef_d [n, order], std [n]); step i maps y at point i to
    coef_x[i] y + Σ_j coef_d[i, j] D_{i−j} + std[i] z, D_k the output of call k (`multistep_step`).
  """
  alphas, sigmas = _points(alphas, sigmas)
  if order < 1:
    raise ValueError(f"order must be >= 1, got {order}")
  n = len(alphas) - 1
  if orders is not None and np.shape(orders) != (n,):
    raise ValueError(f"orders must have one entry per step ({n}), got shape {np.shape(orders)}")
  ell = log_snr(alphas, sigmas)
  coef_x, coef_d, std = np.zeros(n), np.zeros((n, order)), np.zeros(n)
  eta = 1.0 if stochastic else 0.0
  c = 1.0 + eta
  for i in range(n):
    if sigmas[i + 1] == 0:
      coef_d[i, 0] = 1.0  # y_0 = D: the kernel is a point mass at u = h = ∞
      continue
    h = ell[i + 1] - ell[i]
    coef_x[i] = sigmas[i + 1] / sigmas[i] * math.exp(-eta * h)
    std[i] = sigmas[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h))
    k = min(order, i + 1)  # lower order until enough calls have been made
    if orders is not None:
      k = max(1, min(k, int(orders[i])))
    nodes = np.array([ell[i - j] - ell[i] for j in range(k)])  # u_0 = 0, then < 0
    # ∫_0^h c e^{−c(h−u)} u^p du for p = 0, 1, 2 (integration by parts: I_p = h^p − p I_{p−1}/c).
    moments = [-math.expm1(-c * h)]
    for p in range(1, k):
      moments.append(h**p - p * moments[-1] / c)
    if k == 2:
      # DPM-Solver++(2M)'s weights: the line through the two outputs read at the interval's
      # midpoint, u = h/2, instead of integrated against the kernel (which extrapolates to the
      # kernel's mean, nearer u = h). Also second order; measured in the Gaussian case
      # (benchmarks/sampler.py) it overshoots much less at 5-20 steps, where h ~ 0.5-2.
      w = moments[0] * 0.5 * h / -nodes[1]
      coef_d[i, :2] = alphas[i + 1] * np.array([moments[0] + w, -w])
    else:
      # Lagrange weights: P(u) = Σ_j D_j L_j(u), ∫ kernel · L_j = (V^{-T} I)_j, V[j, p] = u_j^p.
      vander = nodes[:, None] ** np.arange(k)[None, :]
      coef_d[i, :k] = alphas[i + 1] * np.linalg.solve(vander.T, np.asarray(moments))
  return coef_x, coef_d, std


def multistep_step(key: Array | None, x: Array, x0: Array, x0_hist: Array, coef_x: Array,
                   coef_d: Array, std: Array | None,
                   offset: Array | None = None) -> tuple[Array, Array]:
  """One step of the multistep integrator (coefficients from `multistep_coefficients`).

  Args:
    key: PRNG key for the step's noise (unused when std is None).
    x: the state [B, ...]; x0: this call's data prediction x̂_0 [B, ...].
    x0_hist: [order − 1, B, ...], the previous calls' x̂_0, newest first (entries whose coefficient
      is 0, i.e. before the first calls, are ignored).
    coef_x: scalar; coef_d: [order]; std: scalar, or None for the ODE (no noise drawn).
    offset: the process's offset (μ for IR-SDE, broadcastable to x); None for 0.

  Returns:
    (x at the next point, updated x0_hist).
  """
  stack = jnp.concatenate([x0[None], x0_hist], axis=0)  # [order, B, ...], newest first
  if offset is None:
    out = coef_x * x + jnp.tensordot(coef_d.astype(x.dtype), stack, axes=1)
  else:
    out = offset + coef_x * (x - offset) + jnp.tensordot(coef_d.astype(x.dtype), stack - offset,
                                                         axes=1)
  if std is not None:
    out = out + std * jax.random.normal(key, x.shape, x.dtype)
  return out, stack[:-1]


# ------------------------------------------------------------------------------------------------
# The steps as solvers of `diffusion.loop.sample_loop`.
# ------------------------------------------------------------------------------------------------


def _clip(x0: Array, clip: tuple[float, float] | None) -> Array:
  return x0 if clip is None else jnp.clip(x0, *clip)


def _x0(out: Array, x: Array, alpha: Array, sigma: Array, prediction: str,
        offset: Array | None) -> Array:
  """x̂_0 in the x frame from a model output at x (the conversion itself is in y = x − offset)."""
  if offset is None:
    return adapters.to_x0(out, x, alpha, sigma, prediction)
  return offset + adapters.to_x0(out, x - offset, alpha, sigma, prediction)


@dataclasses.dataclass(frozen=True)
class MultistepSolver:
  """The multistep exponential integrator (`multistep_coefficients`) as a `sample_loop` solver.

  order 1 / 2 / 3 with stochastic False: DDIM / DPM-Solver++(2M) / 3rd-order; True: the posterior
  step / SDE-DPM-Solver++(2M) / 3rd-order SDE. `prediction` is the model output's type; `clip`
  clamps each x̂_0 (in the x frame) before it enters the step and the history. The loop's
  `solver_args` may hold the process's offset (IR-SDE's μ); none means 0.
  """

  order: int
  stochastic: bool
  prediction: str = "eps"
  clip: tuple[float, float] | None = None

  def inputs(self, alphas: np.ndarray, sigmas: np.ndarray,
             orders: np.ndarray | None = None) -> tuple:
    """Per-step inputs from α, σ at the n evaluation points followed by the end point
    (`orders`: optional per-step caps on the order, see `multistep_coefficients`)."""
    alphas, sigmas = _points(alphas, sigmas)
    cx, cd, sd = multistep_coefficients(alphas, sigmas, self.order, self.stochastic, orders)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    # The ODE draws no noise at all (None is an empty pytree leaf in the scan).
    return (f32(alphas[:-1]), f32(sigmas[:-1]), f32(cx), f32(cd),
            f32(sd) if self.stochastic else None)

  def init(self, x: Array) -> Array:
    return jnp.zeros((self.order - 1,) + x.shape, x.dtype)

  def step(self, key: Array, x: Array, hist: Array, out: Array, t: Array, inputs: tuple,
           offset: Array | None = None) -> tuple[Array, Array]:
    del t  # the coefficients carry the step's position
    alpha, sigma, cx, cd, sd = inputs
    x0 = _clip(_x0(out, x, alpha, sigma, self.prediction, offset), self.clip)
    return multistep_step(key, x, x0, hist, cx, cd, sd, offset)


@dataclasses.dataclass(frozen=True)
class PosteriorSolver:
  """The ancestral step x_s ~ q(x_s | x_t, x̂_0) (`posterior_step`) as a `sample_loop` solver.

  The coefficients come from `posterior_coefficients` in float64 on the host; `min_var` floors
  the step's variance. `prediction`, `clip` and the optional offset in `solver_args` as for
  `MultistepSolver`.
  """

  prediction: str = "eps"
  clip: tuple[float, float] | None = None
  min_var: float = 0.0

  def inputs(self, alphas: np.ndarray, sigmas: np.ndarray) -> tuple:
    """Per-step inputs (α_t, σ_t, coef_t, coef_0, var) from α, σ at the n points and the end."""
    alphas, sigmas = _points(alphas, sigmas)
    coefs = posterior_coefficients(alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:])
    return tuple(jnp.asarray(a, jnp.float32) for a in (alphas[:-1], sigmas[:-1], *coefs))

  def init(self, x: Array) -> None:
    return None

  def step(self, key: Array, x: Array, state: None, out: Array, t: Array, inputs: tuple,
           offset: Array | None = None) -> tuple[Array, None]:
    del t  # the coefficients carry the step's position
    alpha_t, sigma_t, *coefs = inputs
    x0 = _clip(_x0(out, x, alpha_t, sigma_t, self.prediction, offset), self.clip)
    return posterior_step(key, x, x0, coefs, offset=offset, min_var=self.min_var), state


@dataclasses.dataclass(frozen=True)
class DDIMSolver:
  """DDIM with η (`ddim_coefficients` + `posterior_step`) as a `sample_loop` solver.

  Each step has its own end point (diffusers' DDIM steps from t to t − T/n whatever the spacing,
  so the end point need not be the next evaluation point). `prediction`, `clip` and the optional
  offset in `solver_args` as for `MultistepSolver`; η = 0 draws no noise.
  """

  eta: float = 0.0
  prediction: str = "eps"
  clip: tuple[float, float] | None = None

  def inputs(self, alphas: np.ndarray, sigmas: np.ndarray, alphas_to: np.ndarray,
             sigmas_to: np.ndarray) -> tuple:
    """Per-step inputs (α_t, σ_t, coef_t, coef_0, var) from α, σ [n] at the evaluation points
    and at each step's end point [n]."""
    arrs = [np.asarray(a, np.float64) for a in (alphas, sigmas, alphas_to, sigmas_to)]
    if any(a.ndim != 1 or a.shape != arrs[0].shape for a in arrs) or not len(arrs[0]):
      raise ValueError(f"DDIM tables must be 1-D of one nonzero length, got shapes "
                       f"{[a.shape for a in arrs]}")
    coefs = ddim_coefficients(*arrs, self.eta)
    var = None if self.eta == 0 else coefs[2]
    return tuple(None if a is None else jnp.asarray(a, jnp.float32)
                 for a in (arrs[0], arrs[1], coefs[0], coefs[1], var))

  def init(self, x: Array) -> None:
    return None

  def step(self, key: Array, x: Array, state: None, out: Array, t: Array, inputs: tuple,
           offset: Array | None = None) -> tuple[Array, None]:
    del t  # the coefficients carry the step's position
    alpha_t, sigma_t, coef_t, coef_0, var = inputs
    x0 = _clip(_x0(out, x, alpha_t, sigma_t, self.prediction, offset), self.clip)
    if var is None:  # the ODE: no noise drawn
      mean = coef_t * x + coef_0 * x0 if offset is None else (
          offset + coef_t * (x - offset) + coef_0 * (x0 - offset))
      return mean, state
    return posterior_step(key, x, x0, (coef_t, coef_0, var), offset=offset), state


# ------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) in data prediction.
# ------------------------------------------------------------------------------------------------


def _unipc_weights(h: float, rks: np.ndarray, variant: str, corrector: bool
                   ) -> tuple[float, float, np.ndarray]:
  """(h φ_1, B(h), ρ) of one UniPC step in data prediction, as the paper's B(h) variants.

  rks: [k − 1] (λ_{s_j} − λ_{s_0})/h of the earlier outputs. The predictor's ρ [k − 1] (1/2 at
  order 2; else R[:-1, :-1] ρ = b[:-1]); the corrector's ρ [k] (1/2 at order 1, else R ρ = b),
  R[p, j] = r_j^p over r = (rks, 1), b_p = h φ_{p+1}(h) (p + 1)! / B(h) with hh = −h.
  """
  hh = -h
  h_phi_1 = math.expm1(hh)
  b_h = h_phi_1 if variant == "bh2" else hh
  k = len(rks) + 1
  r = np.append(np.asarray(rks, np.float64), 1.0)
  big_r = np.stack([r**p for p in range(k)])
  b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
  for p in range(1, k + 1):
    b.append(h_phi_k * fact / b_h)
    fact *= p + 1
    h_phi_k = h_phi_k / hh - 1.0 / fact
  b = np.asarray(b)
  if corrector:
    rho = np.array([0.5]) if k == 1 else np.linalg.solve(big_r, b)
  else:
    rho = np.zeros(0) if k == 1 else (np.array([0.5]) if k == 2 else
                                      np.linalg.solve(big_r[:-1, :-1], b[:-1]))
  return h_phi_1, b_h, rho


def unipc_coefficients(alphas: np.ndarray, sigmas: np.ndarray, order: int = 2,
                       variant: str = "bh2", lower_order_final: bool = True) -> dict:
  """Per-step coefficients of UniPC (data prediction, `variant` "bh1" / "bh2") on a trajectory.

  Step i (model output D_i at the predicted x_i, its point i) first corrects x_i with UniC of the
  previous step's order from the corrected x_{i−1} and D_i, …, D_{i−k} (not at step 0), then
  predicts x_{i+1} with UniP of order k_i = min(order, i + 1, n − i if lower_order_final):

    x_i ← cself_i x_i + cprev_i x_{i−1} + Σ_j corr_i[j] D_{i−j}      (j = 0 … order)
    x_{i+1} = pred_x_i x_i + Σ_j pred_i[j] D_{i−j}                    (j = 0 … order − 1)

  A step onto σ = 0 is first order and returns D_i. Tables as `multistep_coefficients`.

  Returns:
    dict of float64 arrays: cself, cprev, pred_x [n]; corr [n, order + 1]; pred [n, order].
  """
  alphas, sigmas = _points(alphas, sigmas)
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"unknown UniPC variant {variant!r}; expected 'bh1' or 'bh2'")
  if order < 1:
    raise ValueError(f"order must be >= 1, got {order}")
  n = len(alphas) - 1
  ell = log_snr(alphas, sigmas)
  orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
  orders = [1 if sigmas[i + 1] == 0 else k for i, k in enumerate(orders)]
  out = dict(cself=np.zeros(n), cprev=np.zeros(n), pred_x=np.zeros(n),
             corr=np.zeros((n, order + 1)), pred=np.zeros((n, order)))
  for i in range(n):
    # Corrector: from point i − 1 to i, with the previous predictor's order.
    if i == 0:
      out["cself"][i] = 1.0
    else:
      k, s = orders[i - 1], i - 1
      h = ell[i] - ell[s]
      rks = np.array([(ell[s - j] - ell[s]) / h for j in range(1, k)])
      h_phi_1, b_h, rho = _unipc_weights(h, rks, variant, corrector=True)
      a = alphas[i]
      out["cprev"][i] = sigmas[i] / sigmas[s]
      out["corr"][i, 0] = -a * b_h * rho[-1]
      out["corr"][i, 1] = -a * h_phi_1 + a * b_h * (np.sum(rho[:-1] / rks) + rho[-1])
      for j in range(1, k):
        out["corr"][i, 1 + j] = -a * b_h * rho[j - 1] / rks[j - 1]
    # Predictor: from point i to i + 1.
    if sigmas[i + 1] == 0:
      out["pred"][i, 0] = 1.0  # the clean end: x = D_i
      continue
    k = orders[i]
    h = ell[i + 1] - ell[i]
    rks = np.array([(ell[i - j] - ell[i]) / h for j in range(1, k)])
    h_phi_1, b_h, rho = _unipc_weights(h, rks, variant, corrector=False)
    a = alphas[i + 1]
    out["pred_x"][i] = sigmas[i + 1] / sigmas[i]
    out["pred"][i, 0] = -a * h_phi_1 + a * b_h * np.sum(rho / rks) if k > 1 else -a * h_phi_1
    for j in range(1, k):
      out["pred"][i, j] = -a * b_h * rho[j - 1] / rks[j - 1]
  return out


@dataclasses.dataclass(frozen=True)
class UniPCSolver:
  """UniPC (`unipc_coefficients`) as a `sample_loop` solver; carries the corrected previous
  state and the last `order` data predictions. `prediction`, `clip` as for `MultistepSolver`."""

  order: int = 2
  variant: str = "bh2"
  lower_order_final: bool = True
  prediction: str = "eps"
  clip: tuple[float, float] | None = None

  def inputs(self, alphas: np.ndarray, sigmas: np.ndarray) -> tuple:
    """Per-step inputs from α, σ at the n evaluation points followed by the end point."""
    alphas, sigmas = _points(alphas, sigmas)
    c = unipc_coefficients(alphas, sigmas, self.order, self.variant, self.lower_order_final)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return (f32(alphas[:-1]), f32(sigmas[:-1]), f32(c["cself"]), f32(c["cprev"]),
            f32(c["corr"]), f32(c["pred_x"]), f32(c["pred"]))

  def init(self, x: Array) -> tuple[Array, Array]:
    return jnp.zeros_like(x), jnp.zeros((self.order,) + x.shape, x.dtype)

  def step(self, key: Array, x: Array, state: tuple, out: Array, t: Array, inputs: tuple,
           offset: Array | None = None) -> tuple[Array, tuple]:
    del key, t  # deterministic; the coefficients carry the step's position
    if offset is not None:
      raise ValueError("UniPCSolver supports offset-free processes only")
    alpha, sigma, cself, cprev, corr, pred_x, pred = inputs
    x_prev, hist = state
    x0 = _clip(_x0(out, x, alpha, sigma, self.prediction, None), self.clip)
    stack = jnp.concatenate([x0[None], hist], axis=0)  # [order + 1, B, ...], newest first
    x = cself * x + cprev * x_prev + jnp.tensordot(corr.astype(x.dtype), stack, axes=1)
    x_next = pred_x * x + jnp.tensordot(pred.astype(x.dtype), stack[:-1], axes=1)
    return x_next, (x, stack[:-1])

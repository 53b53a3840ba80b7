"""The discrete variance-preserving process of DDPM / Stable Diffusion and its samplers.

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε,   ᾱ_t = Π_{k<=t} (1 − β_k),   t = 0 … T − 1

so α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) in the (α_t, σ_t) language of `diffusion.solvers`, offset 0.
`VPProcess` holds diffusers' scheduler settings (`from_config` reads a `scheduler_config.json`
dict); its timesteps equal diffusers' `DDIMScheduler` / `DPMSolverMultistepScheduler` /
`UniPCMultistepScheduler.set_timesteps` (the DDIM family and the multistep family space them
differently), and `sample` runs

  "ddim"     DDIM with η (η = 0: the ODE; η = 1: the ancestral posterior step), `solvers.DDIMSolver`
  "dpm++2m"  DPM-Solver++(2M) with lower-order final steps, `solvers.MultistepSolver(order=2)`
  "unipc"    UniPC (bh2, order 2, predictor-corrector, lower-order final), `solvers.UniPCSolver`

in the one jitted loop (`diffusion.loop.sample_loop`) around any model function, e.g. a
`diffusion.adapters.ClassifierFreeGuidance` of a U-Net. Tables are float64 on the host; diffusers
builds them in float32, which differs in ᾱ by ~1e-6 relative (the float64 values are closer to the
exact products).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from uir_jax.diffusion import solvers
from uir_jax.diffusion.loop import sample_loop

Array = jax.Array
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "dpm++2m", "unipc")
# diffusers' `prediction_type` names → `diffusion.adapters.PREDICTIONS`.
PREDICTION_NAMES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0",
                    "eps": "eps", "v": "v", "x0": "x0"}


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float,
               beta_end: float) -> np.ndarray:
  """β_t [T], float64, as diffusers' schedulers define them.

  linear: linspace(β_start, β_end, T); scaled_linear (SD): linspace(√β_start, √β_end, T)²;
  squaredcos_cap_v2 (improved DDPM): β_t = min(1 − ᾱ(t+1/T)/ᾱ(t/T), 0.999) with
  ᾱ(u) = cos((u + 0.008)/1.008 · π/2)².
  """
  n = num_train_timesteps
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if schedule == "squaredcos_cap_v2":
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
  raise ValueError(f"unknown beta_schedule {schedule!r}; expected one of {BETA_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class VPProcess:
  """DDPM / SD's discrete VP process with diffusers' scheduler settings (their defaults).

  `prediction` is the model's output type ("eps", "v", "x0"; diffusers' names accepted).
  `set_alpha_to_one`: DDIM's last step lands on ᾱ = 1 (True) or ᾱ_0 (False, SD's configs).
  `steps_offset` shifts "leading" timesteps (SD: 1). `timestep_spacing` None: each sampler's
  diffusers default ("leading" for DDIM, "linspace" for DPM-Solver++ / UniPC).
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction: str = "eps"
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str | None = None

  def __post_init__(self):
    if self.prediction not in PREDICTION_NAMES:
      raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of "
                       f"{sorted(PREDICTION_NAMES)}")
    object.__setattr__(self, "prediction", PREDICTION_NAMES[self.prediction])
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of "
                       f"{BETA_SCHEDULES}")
    if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
      raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of "
                       f"{SPACINGS}")

  @classmethod
  def from_config(cls, config: dict[str, Any]) -> VPProcess:
    """From a diffusers scheduler config dict (`scheduler_config.json`); unknown keys ignored,
    absent keys take diffusers' defaults; trained_betas and rescale_betas_zero_snr refused."""
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
      raise ValueError("scheduler config: trained_betas / rescale_betas_zero_snr not supported")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "set_alpha_to_one",
            "steps_offset", "timestep_spacing")
    kwargs = {k: config[k] for k in keys if k in config}
    if "prediction_type" in config:
      kwargs["prediction"] = config["prediction_type"]
    return cls(**kwargs)

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    """ᾱ_t [T], float64."""
    betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                       self.beta_end)
    return np.cumprod(1.0 - betas)

  @property
  def final_alpha_cumprod(self) -> float:
    """ᾱ where DDIM's last step lands: 1 with set_alpha_to_one, else ᾱ_0."""
    return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

  def tables(self) -> tuple[np.ndarray, np.ndarray]:
    """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)), float64 [T] each."""
    abar = self.alphas_cumprod
    return np.sqrt(abar), np.sqrt(1.0 - abar)

  def timesteps(self, num_steps: int, sampler: str = "ddim") -> np.ndarray:
    """int64 [num_steps] timesteps, noisiest first, as diffusers' `set_timesteps`.

    The DDIM family ("ddim") spaces n points over [0, T); the multistep schedulers
    ("dpm++2m", "unipc") space n + 1 and drop the clean end.
    """
    T, n = self.num_train_timesteps, num_steps
    if not 1 <= n <= T:
      raise ValueError(f"num_steps must be in [1, {T}], got {n}")
    ddim = sampler == "ddim"
    spacing = self.timestep_spacing or ("leading" if ddim else "linspace")
    if spacing == "trailing":  # the same for both families
      return (np.round(np.arange(T, 0, -T / n)) - 1).astype(np.int64)
    m = n if ddim else n + 1  # points spaced; the multistep family drops the clean end
    if spacing == "linspace":
      ts = np.linspace(0, T - 1, m).round()[::-1]
    else:  # leading
      ts = (np.arange(m) * (T // m))[::-1] + self.steps_offset
    return ts[:n].astype(np.int64)

  def ddim_points(self, num_steps: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(ts, (α_t, σ_t, α_to, σ_to)) for DDIM: step i goes from ts[i] to ts[i] − T // n (as
    diffusers, whatever the spacing), ᾱ = `final_alpha_cumprod` below t = 0."""
    ts = self.timesteps(num_steps, "ddim")
    abar = self.alphas_cumprod
    prev = ts - self.num_train_timesteps // num_steps
    abar_to = np.where(prev >= 0, abar[np.maximum(prev, 0)], self.final_alpha_cumprod)
    return ts, (np.sqrt(abar[ts]), np.sqrt(1 - abar[ts]), np.sqrt(abar_to), np.sqrt(1 - abar_to))

  def multistep_points(self, num_steps: int, sampler: str = "dpm++2m",
                       final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """(ts [n], α [n + 1], σ [n + 1]): the evaluation points then the end point, which is the
    clean end (α = 1, σ = 0) for final_sigmas_type "zero" (diffusers' default) or t = 0's
    (DPM-Solver++'s "sigma_min")."""
    ts = self.timesteps(num_steps, sampler)
    abar = self.alphas_cumprod
    if final_sigmas_type == "zero":
      end = 1.0
    elif final_sigmas_type == "sigma_min":
      end = abar[0]
    else:
      raise ValueError(f"unknown final_sigmas_type {final_sigmas_type!r}; expected 'zero' or "
                       f"'sigma_min'")
    a = np.append(abar[ts], end)
    return ts, np.sqrt(a), np.sqrt(1 - a)

  def sample(self, model_fn: Any, x_T: Array, key: Array, num_steps: int, *,
             sampler: str = "ddim", eta: float = 0.0, model_args: tuple = (),
             final_sigmas_type: str = "zero", lower_order_final: bool = True,
             start: int = 0, return_path: bool = False) -> tuple[Array, Array | None]:
    """x_0 from x_T [B, ...] ~ N(0, I) in `num_steps` model calls, as diffusers' schedulers.

    `model_fn(x, t, *model_args)` returns the process's `prediction` type at x, t int32 [B]
    (wrap a U-Net in `adapters.ClassifierFreeGuidance` for guidance: model_args = (cond,
    uncond, scale)). "ddim" takes `eta`; "dpm++2m" follows DPMSolverMultistepScheduler
    (algorithm_type dpmsolver++, solver_order 2): first order at the first step and, with
    `lower_order_final`, at the last step below 15 steps or onto σ = 0 (diffusers'
    "lower_order_second" below 15 steps caps order 3 at 2: no effect at order 2). "unipc" follows
    UniPCMultistepScheduler's defaults (bh2, order 2, predict_x0, lower_order_final).

    `start` skips the first steps of the `num_steps` schedule (image-to-image: x_T is then the
    noised image at `timesteps(num_steps, sampler)[start]`); the multistep methods restart at
    first order there, as diffusers' schedulers with `set_begin_index`.
    """
    if not 0 <= start < num_steps:
      raise ValueError(f"start must be in [0, {num_steps}), got {start}")
    if sampler == "ddim":
      ts, points = self.ddim_points(num_steps)
      ts, points = ts[start:], tuple(p[start:] for p in points)
      solver = solvers.DDIMSolver(eta=float(eta), prediction=self.prediction)
      inputs = solver.inputs(*points)
    elif sampler == "dpm++2m":
      ts, alphas, sigmas = self.multistep_points(num_steps, sampler, final_sigmas_type)
      orders = np.full(num_steps, 2)
      if lower_order_final and (num_steps < 15 or final_sigmas_type == "zero"):
        orders[-1] = 1  # (a step to σ = 0 is first order anyway: it returns x̂_0)
      ts, alphas, sigmas, orders = ts[start:], alphas[start:], sigmas[start:], orders[start:]
      solver = solvers.MultistepSolver(order=2, stochastic=False, prediction=self.prediction)
      inputs = solver.inputs(alphas, sigmas, orders=orders)
    elif sampler == "unipc":
      if final_sigmas_type != "zero":
        raise ValueError("unipc: only final_sigmas_type 'zero' (diffusers' default) is supported")
      ts, alphas, sigmas = self.multistep_points(num_steps, sampler, final_sigmas_type)
      ts, alphas, sigmas = ts[start:], alphas[start:], sigmas[start:]
      solver = solvers.UniPCSolver(order=2, variant="bh2", lower_order_final=lower_order_final,
                                   prediction=self.prediction)
      inputs = solver.inputs(alphas, sigmas)
    else:
      raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    return sample_loop(solver, model_fn, x_T, key, jax.numpy.asarray(ts, jax.numpy.int32),
                       inputs, tuple(model_args), return_path=return_path)

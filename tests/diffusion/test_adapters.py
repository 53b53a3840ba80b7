"""diffusion.adapters: ε / x0 / v conversions and classifier-free guidance, against closed forms
(and diffusers' `rescale_noise_cfg`, the PyTorch oracle, for the guidance rescale)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.diffusion import adapters

# (α, σ): variance preserving (α² + σ² = 1, SD), IR-SDE-like (σ = λ sqrt(1 − α²)), and generic.
SCALES = [(0.8, 0.6), (0.36, 50 / 255 * np.sqrt(1 - 0.36**2)), (0.6, 0.5)]


def _draw(seed, shape=(2, 5, 4, 3)):
  r = np.random.default_rng(seed)
  return r.normal(size=shape), r.normal(size=shape)


@pytest.mark.parametrize("alpha,sigma", SCALES)
def test_predictions_convert_to_each_other_exactly(alpha, sigma):
  """From y_t = α y0 + σ ε every prediction type maps back to the true y0, ε and v."""
  y0, eps = _draw(0)
  x = alpha * y0 + sigma * eps
  true = {"x0": y0, "eps": eps, "v": alpha * eps - sigma * y0}
  np.testing.assert_allclose(adapters.velocity(y0, eps, alpha, sigma), true["v"], rtol=1e-12)
  for src, dst in itertools.product(adapters.PREDICTIONS, repeat=2):
    got = adapters.convert(true[src], x, alpha, sigma, src, dst)
    np.testing.assert_allclose(got, true[dst], rtol=1e-9, atol=1e-12, err_msg=f"{src}->{dst}")
  for src in adapters.PREDICTIONS:
    np.testing.assert_allclose(adapters.to_x0(true[src], x, alpha, sigma, src), y0, atol=1e-12)
    np.testing.assert_allclose(adapters.to_eps(true[src], x, alpha, sigma, src), eps, atol=1e-12)


def test_v_prediction_matches_diffusers_formulas():
  """For a VP schedule the general forms are diffusers' (spec §3.6):
  x̂0 = √ᾱ x − √(1−ᾱ) v, ε̂ = √ᾱ v + √(1−ᾱ) x."""
  abar = 0.2777
  a, s = np.sqrt(abar), np.sqrt(1 - abar)
  x, v = _draw(1)
  np.testing.assert_allclose(adapters.to_x0(v, x, a, s, "v"), a * x - s * v, rtol=1e-12)
  np.testing.assert_allclose(adapters.to_eps(v, x, a, s, "v"), a * v + s * x, rtol=1e-12)


def test_unknown_prediction_type_is_one_line():
  with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
    adapters.to_x0(0.0, 0.0, 1.0, 1.0, "sample")
  with pytest.raises(ValueError, match="unknown prediction type"):
    adapters.PredictionAdapter(lambda x, t: x, "eps", "epsilon")


def test_prediction_adapter_reads_the_tables_at_t():
  """A v-model seen as an ε-model (and as x0) at per-sample timesteps."""
  alphas = jnp.asarray(np.linspace(1.0, 0.05, 11), jnp.float32)
  sigmas = jnp.sqrt(1 - alphas**2)
  t = jnp.array([3, 9], jnp.int32)
  y0, eps = (jnp.asarray(a, jnp.float32) for a in _draw(2))
  a, s = alphas[t][:, None, None, None], sigmas[t][:, None, None, None]
  x = a * y0 + s * eps

  def v_model(x_, t_, y0_, eps_):  # an oracle v-model
    del x_, t_
    return a * eps_ - s * y0_

  as_eps = adapters.PredictionAdapter(v_model, "v", "eps")
  np.testing.assert_allclose(as_eps(x, t, alphas, sigmas, y0, eps), eps, atol=2e-6)
  as_x0 = adapters.PredictionAdapter(v_model, "v", "x0")
  np.testing.assert_allclose(as_x0(x, t, alphas, sigmas, y0, eps), y0, atol=2e-6)
  assert as_eps == adapters.PredictionAdapter(v_model, "v", "eps")  # equal: one compilation


def test_guidance_closed_forms():
  u, c = (jnp.asarray(a, jnp.float32) for a in _draw(3))
  np.testing.assert_allclose(adapters.guide(u, c, 1.0), c, atol=1e-6)
  np.testing.assert_allclose(adapters.guide(u, c, 0.0), u, atol=1e-6)
  g = adapters.guide(u, c, 7.5)
  np.testing.assert_allclose(g, u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)
  # φ = 1: each sample rescaled to the conditional output's std; φ = 0.7: the convex mix.
  full = np.asarray(adapters.guide(u, c, 7.5, rescale=1.0), np.float64)
  std = lambda a: np.asarray(a, np.float64).reshape(len(a), -1).std(axis=1)
  np.testing.assert_allclose(std(full), std(c), rtol=1e-5)
  ratio = np.broadcast_to((std(c) / std(g))[:, None, None, None], full.shape)
  np.testing.assert_allclose(full / np.asarray(g), ratio, rtol=1e-5)
  mix = adapters.guide(u, c, 7.5, rescale=0.7)
  np.testing.assert_allclose(mix, 0.7 * full + 0.3 * np.asarray(g), rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_guidance_rescale_matches_diffusers():
  import torch
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

  u, c = (np.asarray(a, np.float32) for a in _draw(4, shape=(2, 4, 8, 8)))  # NCHW, as diffusers
  scale, phi = 7.5, 0.7
  guided = u + scale * (c - u)
  want = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(c), guidance_rescale=phi)
  got = adapters.guide(jnp.asarray(u), jnp.asarray(c), scale, rescale=phi)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_classifier_free_guidance_adapter(batched):
  """One 2B-batch call [uncond; cond] (batched) or two calls give ε_u + s (ε_c − ε_u) of the
  two branches' own outputs; conditioning is a pytree; the scale is traced (no recompilation)."""
  calls = []

  def model_fn(x, t, context, w):
    calls.append(x.shape[0])  # at trace time
    return jnp.tanh(x * w + context["emb"][:, None, None, :] + t[:, None, None, None] / 100.0)

  x = jnp.asarray(_draw(5, shape=(2, 4, 4, 3))[0], jnp.float32)
  t = jnp.array([10, 20], jnp.int32)
  cond = {"emb": jnp.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])}
  uncond = {"emb": jnp.zeros((2, 3))}
  w = jnp.float32(0.7)
  cfg = adapters.ClassifierFreeGuidance(model_fn, rescale=0.0, batched=batched)
  run = jax.jit(cfg)
  out = run(x, t, cond, uncond, 5.0, w)
  e_c, e_u = model_fn(x, t, cond, w), model_fn(x, t, uncond, w)
  np.testing.assert_allclose(out, e_u + 5.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)
  assert calls[0] == (4 if batched else 2)
  n = len(calls)
  run(x, t, cond, uncond, 2.0, w)  # another scale: same program
  assert len(calls) == n

"""Training gradients equal PyTorch's, and the CPU-only formulations are selected on CPU only.

Gradient parity: the L1 loss of NAFNet (megvii layout, DA-CLIP middle cross-attention) and of the
IR-SDE ConditionalUNet (both DA-CLIP contexts) on the same weights and batch, differentiated by
PyTorch (the reference architectures in tests/torch_nafnet.py and tests/torch_unet.py) and by JAX
through our models (whatever formulation the platform selects, i.e. the hand-written backward
passes on CPU). The PyTorch gradients are mapped onto our parameter tree by the checkpoint
converters themselves (a gradient has its parameter's layout), then compared by global norm and
leaf by leaf, relative 1e-5.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.models import layers

# The PyTorch reference models: tests/ (or tests/helpers/ once tests/ is reorganised).
for _d in (Path(__file__).resolve().parent / "helpers", Path(__file__).resolve().parent):
  if (_d / "torch_nafnet.py").exists() and str(_d) not in sys.path:
    sys.path.insert(0, str(_d))

REL = 1e-5
CTX = 16


def _leaves(state) -> dict:
  return {"/".join(str(k) for k in path):
          np.asarray(v[...] if isinstance(v, nnx.Variable) else v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(
              state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}


def _compare_grads(ours: dict, ref: dict) -> None:
  assert ours.keys() == ref.keys()
  diff = np.sqrt(sum(np.sum((ours[k] - ref[k]) ** 2) for k in ref))
  norm = np.sqrt(sum(np.sum(ref[k] ** 2) for k in ref))
  assert norm > 1e-3  # a non-trivial gradient
  assert diff <= REL * norm, f"global gradient differs by {diff / norm:.2e} (relative)"
  bad = {k: float(np.linalg.norm(ours[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref
         if np.linalg.norm(ours[k] - ref[k]) > REL * max(np.linalg.norm(ref[k]), 1e-3 * norm)}
  assert not bad, f"per-leaf relative gradient differences above {REL}: {bad}"


def _grads(model, loss) -> dict:
  graphdef, params = nnx.split(model, nnx.Param)
  g = jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p))))(params)
  return _leaves(g)


def _torch_grads_as_ours(tm, load) -> dict:
  """The PyTorch gradients laid out as our parameters, through the checkpoint converter."""
  grads = {k: (p.grad if p.grad is not None else p.detach() * 0).detach().clone()
           for k, p in tm.named_parameters()}
  sd = {k: grads.get(k, v) for k, v in tm.state_dict().items()}
  return _leaves(nnx.state(load(sd), nnx.Param))


@pytest.mark.torch
def test_nafnet_gradient_parity_with_pytorch():
  import torch
  import torch_nafnet

  from uir_jax.convert.nafnet import load_nafnet

  torch.manual_seed(0)
  kw = dict(width=8, middle_blk_num=1, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1), context_dim=CTX)
  tm = torch_nafnet.perturb_(torch_nafnet.TorchNAFNet(**kw), seed=0).train()
  model = load_nafnet(tm.state_dict())
  r = np.random.default_rng(0)
  x, y = (r.uniform(0, 1, (2, 10, 14, 3)).astype(np.float32) for _ in range(2))  # padded: 12x16
  text, image = (r.normal(size=(2, CTX)).astype(np.float32) for _ in range(2))
  nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
  loss = (tm(nchw(x), text_context=torch.tensor(text), image_context=torch.tensor(image))
          - nchw(y)).abs().mean()
  loss.backward()
  ours = _grads(model, lambda m: jnp.mean(jnp.abs(
      m(jnp.asarray(x), text_context=jnp.asarray(text), image_context=jnp.asarray(image))
      - jnp.asarray(y))))
  _compare_grads(ours, _torch_grads_as_ours(tm, load_nafnet))


@pytest.mark.torch
def test_unet_gradient_parity_with_pytorch():
  import torch
  import torch_unet

  from uir_jax.convert.unet import load_unet

  kw = dict(nf=32, ch_mult=(1, 2), context_dim=CTX)
  tm = torch_unet.randomize_(torch_unet.ConditionalUNet(**kw), seed=0).train()
  model = load_unet(tm.state_dict())
  r = np.random.default_rng(1)
  xt, mu, y = (r.uniform(0, 1, (2, 10, 14, 3)).astype(np.float32) for _ in range(3))
  text, image = (r.normal(size=(2, CTX)).astype(np.float32) for _ in range(2))
  t = np.array([3, 77])
  nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
  loss = (tm(nchw(xt), nchw(mu), torch.tensor(t), text_context=torch.tensor(text),
             image_context=torch.tensor(image)) - nchw(y)).abs().mean()
  loss.backward()
  ours = _grads(model, lambda m: jnp.mean(jnp.abs(
      m(jnp.asarray(xt), jnp.asarray(mu), jnp.asarray(t), text_context=jnp.asarray(text),
        image_context=jnp.asarray(image)) - jnp.asarray(y))))
  _compare_grads(ours, _torch_grads_as_ours(tm, load_unet))


# ----------------------------------------------------------------------------------------------
# The CPU-only formulations: chosen from the platform at trace time; both give equal results.
# ----------------------------------------------------------------------------------------------


def test_cpu_formulation_selected_by_platform(monkeypatch):
  assert layers.cpu_formulation() == (jax.default_backend() == "cpu")
  assert layers.cpu_formulation(True) and not layers.cpu_formulation(False)
  for backend, custom in (("cpu", True), ("gpu", False), ("tpu", False)):
    monkeypatch.setattr(layers.jax, "default_backend", lambda b=backend: b)
    x = jnp.ones((1, 5, 5, 4))
    for fn in (lambda x: layers.depthwise_conv(x, jnp.ones((3, 3, 4)), jnp.zeros(4)),
               lambda x: layers.layer_norm(x, jnp.ones(4), jnp.zeros(4), 1e-6),
               lambda x: layers.layer_norm(x, jnp.ones(4), None, 1e-5),
               lambda x: layers.linear(x, jnp.ones((4, 3)))):
      assert ("custom_vjp_call" in str(jax.make_jaxpr(fn)(x))) == custom, backend
    # layers.conv: space-to-depth and a matmul (no `conv_general_dilated`) where kernel ==
    # stride without padding (NAFNet's downs, 1x1 convs), on the CPU only; lax's otherwise.
    for size, k, stride, pad, chosen in ((32, 2, 2, 0, custom), (16, 1, 1, 0, custom),
                                         (32, 3, 1, 1, False), (64, 4, 2, 1, False)):
      m = layers.conv(4, 4, k, stride=stride, padding=pad, rngs=nnx.Rngs(0))
      jaxpr = str(jax.make_jaxpr(lambda x, m=m: m(x))(jnp.ones((1, size, size, 4))))
      assert ("conv_general_dilated" not in jaxpr) == chosen, (backend, size, k, stride)


def test_the_package_turns_ynnpack_convolutions_off_on_import_only_where_asked():
  """uir_jax.xla_cpu: the XLA CPU option is added to XLA_FLAGS on import (an `xla_cpu_` option:
  read by the CPU backend only), unless the user set it or opted out, and only for the jaxlib
  series it was measured on (XLA aborts on unknown options)."""
  import subprocess

  from uir_jax import xla_cpu

  (flag,) = xla_cpu.CPU_FLAGS
  assert flag.startswith("--xla_cpu_")
  series = xla_cpu._jaxlib_series()
  assert series in xla_cpu.KNOWN_JAXLIB  # the pinned jax range: update KNOWN_JAXLIB with the pin
  assert xla_cpu.flags_to_add("--xla_force_host_platform_device_count=8", series) == [flag]
  assert xla_cpu.flags_to_add("--xla_cpu_experimental_ynn_fusion_type=", series) == []
  assert xla_cpu.flags_to_add("", series, opt_out="0") == []
  assert xla_cpu.flags_to_add("", (0, 99)) == []
  code = ("import os, jax; import uir_jax, jax.numpy as jnp; print(jnp.ones(2).sum()); "
          "print(os.environ['XLA_FLAGS'])")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["2.0", flag]  # set after `import jax`, accepted by XLA when the backend starts
  env[xla_cpu.OPT_OUT] = "0"
  out = subprocess.run([sys.executable, "-c", code.replace("print(os.environ['XLA_FLAGS'])",
                                                           "print(os.environ.get('XLA_FLAGS'))")],
                       env=env, capture_output=True, text=True, check=True).stdout.split()
  assert out == ["2.0", "None"]


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_cpu_and_reference_agree(with_bias):
  r = np.random.default_rng(int(with_bias))
  x = jnp.asarray(r.normal(size=(2, 3, 5, 8)) * 3 + 1, jnp.float32)
  scale = jnp.asarray(1 + 0.3 * r.normal(size=(8,)), jnp.float32)
  bias = jnp.asarray(r.normal(size=(8,)), jnp.float32) if with_bias else None
  ct = jnp.asarray(r.normal(size=x.shape), jnp.float32)
  outs = {}
  for cpu in (True, False):
    f = lambda x, s, b, cpu=cpu: jnp.sum(layers.layer_norm(x, s, b, 1e-6, cpu=cpu) * ct)
    outs[cpu] = (layers.layer_norm(x, scale, bias, 1e-6, cpu=cpu),
                 *jax.grad(f, argnums=(0, 1, 2) if with_bias else (0, 1))(x, scale, bias))
  for a, b in zip(outs[True], outs[False], strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_linear_cpu_and_reference_agree():
  r = np.random.default_rng(7)
  x = jnp.asarray(r.normal(size=(2, 5, 6, 8)), jnp.float32)
  kern = jnp.asarray(r.normal(size=(8, 12)), jnp.float32)
  ct = jnp.asarray(r.normal(size=(2, 5, 6, 12)), jnp.float32)
  outs = {}
  for cpu in (True, False):
    f = lambda x, k, cpu=cpu: layers.linear(x, k, cpu=cpu)
    outs[cpu] = (f(x, kern), *jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), (0, 1))(x, kern))
  for a, b in zip(outs[True], outs[False], strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_conv_cpu_and_reference_agree(k):
  r = np.random.default_rng(k)
  x = jnp.asarray(r.normal(size=(2, 6, 9, 5)), jnp.float32)
  kern = jnp.asarray(r.normal(size=(k, k, 5)), jnp.float32)
  bias = jnp.asarray(r.normal(size=(5,)), jnp.float32)
  ct = jnp.asarray(r.normal(size=(2, 6, 9, 5)), jnp.float32)
  outs = {}
  for cpu in (True, False):
    f = lambda x, kern, bias, cpu=cpu: jnp.sum(layers.depthwise_conv(x, kern, bias, cpu=cpu) * ct)
    outs[cpu] = (layers.depthwise_conv(x, kern, bias, cpu=cpu),
                 *jax.grad(f, argnums=(0, 1, 2))(x, kern, bias))
  # The reference against lax's grouped convolution (PyTorch's Conv2d(groups=C) semantics).
  conv = jax.lax.conv_general_dilated(x, kern[:, :, None, :], (1, 1), [(k // 2, k // 2)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=5) + bias
  np.testing.assert_allclose(outs[False][0], conv, atol=1e-5, rtol=1e-5)
  for a, b in zip(outs[True], outs[False], strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,pad", [(3, 1, 1), (7, 1, 3), (1, 1, 0), (2, 2, 0),
                                               (4, 2, 1), (3, 2, 1)])
def test_conv_cpu_and_reference_agree(kernel, stride, pad):
  """`layers.conv2d`'s CPU formulation (space-to-depth and a matmul where kernel == stride) equals
  lax's convolution, values and gradients, for every convolution shape the models use; and the
  `layers.conv` module equals nnx.Conv's own call on either formulation."""
  r = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(r.normal(size=(2, 9, 10, 5)), jnp.float32)
  kern = jnp.asarray(r.normal(size=(kernel, kernel, 5, 6)) / kernel, jnp.float32)
  bias = jnp.asarray(r.normal(size=(6,)), jnp.float32)
  p2 = ((pad, pad), (pad, pad))
  # Only kernel == stride without padding takes the matmul; the rest is lax's on every platform.
  assert layers._conv_cpu_wins(x.shape, (kernel, kernel), stride, p2) == (
      kernel == stride and pad == 0)
  ct = jnp.asarray(r.normal(size=layers.conv2d(x, kern, bias, stride, p2, cpu=False).shape),
                   jnp.float32)
  outs = {}
  for cpu in (True, False):
    f = lambda x, k, b, cpu=cpu: layers.conv2d(x, k, b, stride, p2, cpu=cpu)
    outs[cpu] = (f(x, kern, bias), *jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct),
                                             argnums=(0, 1, 2))(x, kern, bias))
  for a, b in zip(outs[True], outs[False], strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  m = layers.conv(5, 6, kernel, stride=stride, padding=pad, rngs=nnx.Rngs(0))
  assert isinstance(m, nnx.Conv)
  m.kernel[...], m.bias[...] = kern, bias
  for cpu in (True, False):
    with layers.formulation_override(cpu):
      np.testing.assert_allclose(m(x), outs[False][0], atol=2e-5, rtol=1e-5)

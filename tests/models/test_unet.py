"""ConditionalUNet: parity with a spec-built PyTorch U-Net, parameter counts, conversion errors,
memory-efficient attention, and the 1024x1024 compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.convert.common import ConversionError, param_shapes
from uir_jax.models import layers
from uir_jax.models.unet import ConditionalUNet, count_params

DACLIP_SDE = dict()  # the defaults are the universal-ir configuration
WILD = dict(context_dim=768, use_degra_context=False, scale=0.5)
TINY = dict(nf=32, ch_mult=(1, 2), context_dim=16)


def _jit(unet):
  """unet(x, mu, t, text_context=, image_context=) under one jit (eager dispatch is slow)."""
  graphdef, state = nnx.split(unet)

  @jax.jit
  def call(state, x, mu, t, text_context, image_context):
    return nnx.merge(graphdef, state)(x, mu, t, text_context=text_context,
                                      image_context=image_context)

  return lambda x, mu, t, text_context=None, image_context=None: call(
      state, x, mu, t, text_context, image_context)


def _abstract(**kw):
  return nnx.eval_shape(lambda: ConditionalUNet(**kw, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kw, tensors, params", [(DACLIP_SDE, 224, 48_975_747),
                                                 (WILD, 221, 49_470_467)])
def test_parameter_counts_match_spec(kw, tensors, params):
  shapes = param_shapes(_abstract(**kw))
  assert len(shapes) == tensors
  assert sum(int(np.prod(s)) for s in shapes.values()) == params
  assert count_params(_abstract(**kw)) == params


def test_forward_shapes_padding_and_errors():
  unet = _jit(ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=8, rngs=nnx.Rngs(0)))
  x = jax.random.uniform(jax.random.key(0), (2, 13, 21, 3))
  ctx = jnp.ones((2, 8))
  out = unet(x, x, 7, text_context=ctx, image_context=ctx)  # a scalar t broadcasts
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, unet(x, x, jnp.array([7, 7]), text_context=ctx,
                                       image_context=ctx), atol=1e-6)
  with pytest.raises(ValueError, match="image_context"):
    unet(x, x, 7, text_context=ctx)
  with pytest.raises(ValueError, match="text_context must be"):
    unet(x, x, 7, text_context=jnp.ones((2, 9)), image_context=ctx)
  with pytest.raises(ValueError, match="same shape"):
    unet(x, x[:, :5], 7, text_context=ctx, image_context=ctx)
  with pytest.raises(ValueError, match="context_dim > 0"):
    ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="scale"):
    ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=8, scale=0.25, rngs=nnx.Rngs(0))


def test_conditioning_changes_the_output():
  unet = ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=8, rngs=nnx.Rngs(0))
  # proj_out is zero-initialised (as in the reference): give it weights so cross-attention matters.
  for lvl_attn in (unet.mid_attn.fn, unet.downs[-1].attn.fn, unet.ups[0].attn.fn):
    lvl_attn.proj_out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1),
                                                            lvl_attn.proj_out.kernel.shape)
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
  c = jax.random.normal(jax.random.key(2), (1, 8))
  unet = _jit(unet)
  base = unet(x, x, 10, text_context=c, image_context=c)
  for kw in (dict(text_context=c + 1, image_context=c), dict(text_context=c, image_context=c + 1)):
    assert float(jnp.max(jnp.abs(unet(x, x, 10, **kw) - base))) > 1e-5
  assert float(jnp.max(jnp.abs(unet(x, x, 11, text_context=c, image_context=c) - base))) > 1e-5


@pytest.mark.parametrize("impl,cpu", [("blockwise", True), ("blockwise", False), ("xla", None)])
def test_memory_efficient_attention_equals_naive(impl, cpu):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 100, 3, 16))
  k = jax.random.normal(k2, (2, 37, 3, 16))
  v = jax.random.normal(k3, (2, 37, 3, 16))
  # A tiny block budget forces several (padded) query chunks.
  f = lambda impl_: lambda q, k, v: jnp.sum(
      jnp.sin(layers.attention(q, k, v, impl=impl_, max_block_elements=16 * 37 * 3)))
  with layers.formulation_override(cpu):  # the CPU's chunks (True) and the accelerators' (False)
    # several query chunks; on the CPU, groups of 2 whole problems; the default; one chunk
    for budget in (2000, 7400, None, 1 << 24):
      np.testing.assert_allclose(layers.attention(q, k, v, impl=impl, max_block_elements=budget),
                                 layers.attention(q, k, v, impl="naive"), atol=1e-5)
    g_ref = jax.grad(f("naive"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(f(impl), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention"):
    layers.attention(q, k, v, impl="flash")


def test_cpu_attention_chunks_are_head_problems_within_the_score_budget():
  """On the CPU: (groups of batch x heads problems per chunk, queries per chunk) within 2^21
  scores (measured fastest at 1024-4096 tokens), all in one chunk when they are few, at least
  16 queries (memory of 16k-token generations)."""
  budget = layers.BLOCK_ELEMENTS_CPU
  assert [layers._cpu_chunks(g, lq, lk, budget) for g, lq, lk in [
      (8, 4096, 4096), (8, 1024, 1024), (16, 16384, 16384), (8, 4096, 77), (512, 77, 77),
      (128, 257, 257), (6, 1 << 20, 1 << 20)]] == [
      (1, 512), (2, 1024), (1, 128), (8, 4096), (512, 77), (16, 257), (1, 16)]
  assert layers._block_size(4096, 8, layers.BLOCK_ELEMENTS) == 512  # accelerators


def test_auto_attention_goes_blockwise_for_large_token_counts():
  with layers.formulation_override(False):  # accelerators: naive unless the scores are large
    assert layers.resolve_attention_impl("auto", 16384, 16384, 16, jnp.float32) == "blockwise"
    assert layers.resolve_attention_impl("auto", 4096, 1, 16, jnp.float32) == "naive"
    assert layers.resolve_attention_impl("auto", 256, 256, 8, jnp.float32) == "naive"
  with layers.formulation_override(True):  # the CPU: always the cache-sized heads-major chunks
    assert layers.resolve_attention_impl("auto", 256, 256, 8, jnp.float32) == "blockwise"
  assert layers.resolve_attention_impl("auto", 256, 256, 8, jnp.float32) == (
      "blockwise" if jax.default_backend() == "cpu" else "naive")


def test_sinusoidal_embedding_formula():
  t = jnp.array([1.0, 50.0])
  emb = layers.sinusoidal_embedding(t, 8)
  freqs = np.exp(-np.arange(4) * np.log(10000.0) / 3)
  np.testing.assert_allclose(emb[:, :4], np.sin(np.outer([1, 50], freqs)), atol=1e-5)
  np.testing.assert_allclose(emb[:, 4:], np.cos(np.outer([1, 50], freqs)), atol=1e-5)


def test_bf16_compute_runs_close_to_fp32():
  kw = dict(nf=16, ch_mult=(1, 2), context_dim=8)
  f32 = _jit(ConditionalUNet(**kw, rngs=nnx.Rngs(0)))
  bf16 = _jit(ConditionalUNet(**kw, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  x = jax.random.uniform(jax.random.key(0), (1, 24, 24, 3))
  c = jnp.ones((1, 8))
  a = f32(x, x * 0.9, 30, text_context=c, image_context=c)
  b = bf16(x, x * 0.9, 30, text_context=c, image_context=c)
  assert b.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(a)))
  print(f"bf16 vs fp32 ConditionalUNet: max deviation {rel:.3%} of the output's max")
  assert rel < 0.1  # bf16 keeps ~3 significant digits through ~30 layers: a few percent


# ----------------------------------------------------------------------------------------------
# PyTorch parity and conversion.
# ----------------------------------------------------------------------------------------------


def _torch_pair(kw, seed=0):
  torch_unet = pytest.importorskip("torch_unet")
  from uir_jax.convert.unet import load_unet

  tm = torch_unet.randomize_(torch_unet.ConditionalUNet(**kw), seed=seed).eval()
  return tm, load_unet(tm.state_dict())


def _compare(tm, unet, size, t, context_dim, batch=2, seed=0):
  import torch

  rng = np.random.default_rng(seed)
  x = rng.random((batch, 3, *size), dtype=np.float32)
  mu = rng.random((batch, 3, *size), dtype=np.float32)
  tc = rng.standard_normal((batch, context_dim)).astype(np.float32)
  ic = rng.standard_normal((batch, context_dim)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.tensor(x), torch.tensor(mu), torch.tensor(t), text_context=torch.tensor(tc),
             image_context=torch.tensor(ic)).numpy()
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  fn = jax.jit(lambda a, b, t_, c1, c2: unet(a, b, t_, text_context=c1, image_context=c2))
  out = np.asarray(fn(nhwc(x), nhwc(mu), jnp.asarray(t), jnp.asarray(tc), jnp.asarray(ic)))
  return out.transpose(0, 3, 1, 2), ref


@pytest.mark.torch
@pytest.mark.parametrize("kw", [DACLIP_SDE, WILD], ids=["daclip-sde", "wild"])
def test_parity_with_pytorch_full_size(kw):
  tm, unet = _torch_pair(kw)
  assert unet.scale == kw.get("scale", 1.0) and unet.context_dim == kw.get("context_dim", 512)
  out, ref = _compare(tm, unet, (70, 94), np.array([3, 77]), kw.get("context_dim", 512))
  assert np.abs(ref).max() > 0.1  # a non-trivial output
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.torch
def test_parity_tiny_and_module_prefix_and_safetensors(tmp_path):
  import torch

  from uir_jax.convert.unet import load_unet

  tm, unet = _torch_pair(TINY, seed=3)
  out, ref = _compare(tm, unet, (33, 18), np.array([1, 100]), 16, seed=1)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  # A DataParallel checkpoint file ("module." prefix), read from disk.
  path = tmp_path / "unet.pth"
  torch.save({f"module.{k}": v for k, v in tm.state_dict().items()}, path)
  again = load_unet(str(path))
  out2, _ = _compare(tm, again, (33, 18), np.array([1, 100]), 16, seed=1)
  np.testing.assert_allclose(out2, out, atol=1e-6)


@pytest.mark.torch
def test_conversion_errors_name_the_key():
  from uir_jax.convert.unet import infer_options, load_unet

  tm, _ = _torch_pair(TINY)
  sd = dict(tm.state_dict())
  assert infer_options(sd) == dict(in_nc=3, out_nc=3, nf=32, ch_mult=(1, 2), context_dim=16,
                                   use_degra_context=True, use_image_context=True, scale=1.0)
  missing = {k: v for k, v in sd.items() if k != "ups.1.2.fn.fn.to_out.1.g"}
  with pytest.raises(ConversionError, match=r"ups\.1\.attn\.fn\.out_norm\.g"):
    load_unet(missing)
  bad = dict(sd, **{"mid_block1.mlp.1.bias": sd["mid_block1.mlp.1.bias"][:-1]})
  with pytest.raises(ConversionError, match=r"mid_block1\.mlp\.1\.bias"):
    load_unet(bad)
  extra = dict(sd, **{"downs.0.2.fn.fn.extra.weight": sd["prompt"]})
  with pytest.raises(ConversionError, match=r"downs\.0\.2\.fn\.fn\.extra\.weight"):
    load_unet(extra)
  with pytest.raises(ConversionError, match="context_dim"):
    load_unet(sd, context_dim=512)
  with pytest.raises(ValueError, match="unknown ConditionalUNet option"):
    load_unet(sd, widht=3)
  with pytest.raises(ConversionError, match="not a ConditionalUNet"):
    load_unet({"foo": sd["prompt"]})


# ----------------------------------------------------------------------------------------------
# Large images.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_1024_forward_compiles_with_bounded_attention_memory():
  """At 1024x1024 the bottom self-attention has 128*128 = 16,384 tokens: a naive score matrix
  for the 16-head mid block alone is 16 GiB. The compiled forward must need far less."""
  unet = ConditionalUNet(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(unet)

  def fwd(state, x, c):
    return nnx.merge(graphdef, state)(x, x, 50, text_context=c, image_context=c)

  x = jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32)
  c = jax.ShapeDtypeStruct((1, 512), jnp.float32)
  compiled = jax.jit(fwd).lower(state, x, c).compile()
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes
  print(f"1024x1024 forward: compiled temp memory {temp / 2**30:.2f} GiB")
  assert temp < 12 * 2**30, temp  # a naive mid-block attention map alone is 16 GiB

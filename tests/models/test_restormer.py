"""Restormer and PromptIR: parity with our PyTorch references (`tests/helpers/
torch_restormer.py`, written from swz30/Restormer and va1shn9v/PromptIR) through the converters,
and the converters' checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.convert.common import ConversionError
from uir_jax.convert.promptir import infer_options as promptir_options
from uir_jax.convert.promptir import load_promptir
from uir_jax.convert.restormer import expected_keys, infer_options, load_restormer
from uir_jax.models.layers import pixel_shuffle, pixel_unshuffle, resize_bilinear
from uir_jax.models.promptir import PromptIR
from uir_jax.models.restormer import RESTORMER_VARIANTS, Restormer

TINY = dict(dim=8, num_blocks=(1, 2, 1, 1), num_refinement_blocks=1, heads=(1, 2, 4, 8))
TINY_PROMPTS = dict(prompt_dims=(8, 16, 24), prompt_sizes=(12, 6, 5), prompt_len=3)


def _torch_ref():
  return pytest.importorskip("torch_restormer")


def _close(ours, ref, rel=1e-5):
  """max |ours - ref| <= rel · max |ref| (the output's scale)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x output scale {scale:.3g}"


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _apply(model, x):
  """model(x) under jit: one compile instead of hundreds of eager ops."""
  return _call(*nnx.split(model), jnp.asarray(x))


def _run_torch(model, x_nhwc):
  import torch

  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
@pytest.mark.parametrize("opts,size", [
    (dict(), (24, 40)),
    # Every other switch at once, on sides that are not multiples of 8: our model reflect-pads
    # to a multiple of 8 and crops, as the official demo does around the official forward.
    (dict(LayerNorm_type="BiasFree", bias=True, ffn_expansion_factor=2.0, inp_channels=6,
          dual_pixel_task=True), (21, 35)),
], ids=["released-default", "biasfree-bias-dualpixel-padded"])
def test_restormer_parity_with_pytorch(opts, size, tmp_path):
  import torch

  ref = _torch_ref()
  torch.manual_seed(0)
  model = ref.perturb_(ref.TorchRestormer(**TINY, **opts)).eval()
  path = tmp_path / "restormer.pth"
  torch.save({"params": model.state_dict()}, path)  # the released files' layout
  net = load_restormer(str(path))
  cin = opts.get("inp_channels", 3)
  h, w = size
  x = np.random.default_rng(0).uniform(size=(2, h, w, cin)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (0, -h % 8), (0, -w % 8), (0, 0)), mode="reflect")
  _close(_apply(net, x), _run_torch(model, padded)[:, :h, :w])


@pytest.mark.torch
def test_promptir_parity_with_pytorch(tmp_path):
  import torch

  ref = _torch_ref()
  torch.manual_seed(0)
  model = ref.perturb_(ref.TorchPromptIR(**TINY, **TINY_PROMPTS)).eval()
  # The released file: a Lightning checkpoint whose module holds the network as `net`.
  path = tmp_path / "model.ckpt"
  torch.save({"epoch": 1, "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}},
             path)
  net = load_promptir(str(path))
  # 32x48: the prompts (12², 6², 5²) are resized up and, for prompt3 to 4x6, down in one axis.
  x = np.random.default_rng(1).uniform(size=(2, 32, 48, 3)).astype(np.float32)
  _close(_apply(net, x), _run_torch(model, x))


@pytest.mark.torch
def test_resampling_ops_match_pytorch():
  import torch
  import torch.nn.functional as F

  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for size in [(5, 7), (12, 9), (3, 4), (16, 3), (1, 1)]:
    ref = F.interpolate(xt, size, mode="bilinear").numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), ref, atol=1e-6)
  y = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
  yt = torch.from_numpy(y.transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(
      pixel_unshuffle(jnp.asarray(y)), F.pixel_unshuffle(yt, 2).numpy().transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(
      pixel_shuffle(jnp.asarray(y)), F.pixel_shuffle(yt, 2).numpy().transpose(0, 2, 3, 1))


@pytest.mark.torch
def test_released_restormer_layouts_are_read_off_the_keys():
  """Full-size state_dicts (meta tensors: shapes only) of every released model give back its
  options; our model expects exactly the keys of one (dual-pixel: skip_conv, 6 channels)."""
  import torch

  ref = _torch_ref()
  want = dict(inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
              num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False,
              layernorm_type="WithBias", dual_pixel_task=False)
  for variant, opts in RESTORMER_VARIANTS.items():
    torch_opts = {("LayerNorm_type" if k == "layernorm_type" else k): v for k, v in opts.items()}
    with torch.device("meta"):
      sd = ref.TorchRestormer(**torch_opts).state_dict()
    assert infer_options(sd) == {**want, **opts}, variant
  opts = RESTORMER_VARIANTS["dual_pixel_defocus_deblurring"]
  with torch.device("meta"):
    sd = ref.TorchRestormer(inp_channels=6, dual_pixel_task=True).state_dict()
  abstract = nnx.eval_shape(lambda: Restormer(**opts, rngs=nnx.Rngs(0)))
  assert expected_keys(abstract) == sorted(sd)


@pytest.mark.torch
def test_released_promptir_layout_is_read_off_the_keys():
  import torch

  ref = _torch_ref()
  # Our dim-derived widths are the released hard-coded numbers at dim 48.
  official, ours = ref.official_promptir_widths(48, (64, 128, 320))
  assert official == ours
  with torch.device("meta"):
    sd = ref.TorchPromptIR().state_dict()
  assert promptir_options(sd) == dict(
      inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
      heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, layernorm_type="WithBias",
      decoder=True, prompt_dims=(64, 128, 320), prompt_sizes=(64, 32, 16), prompt_len=5)
  abstract = nnx.eval_shape(lambda: PromptIR(rngs=nnx.Rngs(0)))
  unused = {k for k in sd if k.startswith(("chnl_reduce", "reduce_noise_channel_"))}
  assert len(unused) == 6
  assert expected_keys(abstract) == sorted(set(sd) - unused)


@pytest.mark.torch
def test_conversion_errors_name_the_key():
  import torch

  ref = _torch_ref()
  torch.manual_seed(0)
  sd = ref.TorchRestormer(**TINY).state_dict()
  key = "encoder_level2.1.ffn.dwconv.weight"
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    load_restormer({k: v for k, v in sd.items() if k != key})
  with pytest.raises(ConversionError, match=r"latent\.0\.attn\.extra"):
    load_restormer({**sd, "latent.0.attn.extra": torch.zeros(1)})
  bad = dict(sd)
  bad["latent.0.attn.project_out.weight"] = torch.zeros(64, 63, 1, 1)
  with pytest.raises(ConversionError, match=r"latent\.0\.attn\.project_out\.weight"):
    load_restormer(bad)
  with pytest.raises(ConversionError, match="dim=16"):
    load_restormer(sd, dim=16)
  with pytest.raises(ConversionError, match="ffn_expansion_factor"):
    load_restormer(sd, ffn_expansion_factor=3.0)
  assert load_restormer(sd, ffn_expansion_factor=2.659).dim == 8  # same hidden widths
  with pytest.raises(ConversionError, match="patch_embed.proj.weight"):
    load_restormer({"foo": torch.zeros(1)})
  prompt_sd = ref.TorchPromptIR(**TINY, **TINY_PROMPTS).state_dict()
  with pytest.raises(ConversionError, match="load_promptir"):
    load_restormer(prompt_sd)
  # Only the named unused modules may be dropped.
  with pytest.raises(ConversionError, match=r"prompt1\.extra"):
    load_promptir({**prompt_sd, "prompt1.extra": torch.zeros(1)})


def test_promptir_decoder_false_and_bad_inputs_raise():
  with pytest.raises(ValueError, match="decoder=False"):
    PromptIR(decoder=False, rngs=nnx.Rngs(0))
  net = nnx.eval_shape(lambda: Restormer(**TINY, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    net(jnp.zeros((1, 16, 16, 4)))
  with pytest.raises(ValueError, match="too small"):
    net(jnp.zeros((1, 4, 16, 3)))
  with pytest.raises(ValueError, match="heads"):
    Restormer(dim=8, heads=(3, 2, 4, 4), rngs=nnx.Rngs(0))

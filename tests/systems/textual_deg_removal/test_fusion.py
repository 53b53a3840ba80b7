"""TextualDegRemoval's guided Restormer / PromptIR (and every network's decoder fusion): parity
with the test's copy of the official `RestormerRefFusion` / `PromptIRRefFusion`
(`tests/helpers/torch_tdr.py`, B7 fixed there) through `load_guided`, B7 shown, the converter's
layouts and key checks, and `build_guided`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.convert.common import ConversionError
from uir_jax.systems.textual_deg_removal.convert import infer_guided, load_guided
from uir_jax.systems.textual_deg_removal.guidance import geometry
from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet
from uir_jax.systems.textual_deg_removal.guided_restormer import GuidedPromptIR, GuidedRestormer
from uir_jax.systems.textual_deg_removal.networks import ARCHS, build_guided

# Tiny: dim = nf = 4, heads that split the fusion widths. The backbone blocks are checked by
# tests/models/test_restormer.py; here the wiring around them matters (compile time is the cost).
TINY = dict(dim=4, nf=4, num_blocks=(1, 0, 0, 1), num_refinement_blocks=0, heads=(1, 2, 2, 4),
            ffn_expansion_factor=2.0, ext_n_blocks=(1, 1, 1, 1), reffusion_n_blocks=(1, 1, 1, 1))
PROMPT = dict(prompt_dims=(4, 8, 12), prompt_sizes=(8, 4, 2), prompt_len=3)


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, lq, guidance):
  return nnx.merge(graphdef, state)(lq, guidance)


def _nchw(a):
  import torch

  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _torch_model(prompt=False, fusion="encoder+bottleneck", fix_b7=True):
  torch_tdr = pytest.importorskip("torch_tdr")
  import torch
  import torch_restormer

  torch.manual_seed(0)
  model = torch_tdr.TorchRestormerRefFusion(**TINY, prompt=prompt, fusion=fusion, fix_b7=fix_b7,
                                            **(PROMPT if prompt else {}))
  model = torch_restormer.perturb_(model).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("alpha"):  # zero-init: give the fusion blocks a say
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.startswith("masa_enc."):  # discriminative matching features (see test_guidance)
        p.zero_() if name.endswith("bias") else p.normal_(0, (2 / p[0].numel()) ** 0.5)
  return model


def _parity(tm, lq, ref):
  """Ours (through load_guided) == the torch copy; then, with every α (and NAFNet β/γ of the
  fusion stacks) zeroed as at init, the guidance changes nothing (same compiled function)."""
  import torch

  net = load_guided({"params": tm.state_dict()})
  with torch.no_grad():
    want = tm(_nchw(lq), _nchw(ref)).numpy().transpose(0, 2, 3, 1)
    other = tm(_nchw(lq), _nchw(np.ascontiguousarray(ref[:, ::-1]))).numpy().transpose(0, 2, 3, 1)
  assert np.abs(other - want).max() > 1e-3  # the guidance reaches the output
  graphdef, state = nnx.split(net)
  got = np.asarray(_call(graphdef, state, jnp.asarray(lq), jnp.asarray(ref)))
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= 1e-5 * scale, f"max abs error {err:.3g} > 1e-5 x output scale {scale:.3g}"
  init = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if _zero_at_init(path) else v, state)
  a = _call(graphdef, init, jnp.asarray(lq), jnp.asarray(ref))
  b = _call(graphdef, init, jnp.asarray(lq), jnp.asarray(ref[:, ::-1] * 0.5))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return net


def _zero_at_init(path) -> bool:
  keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  if keys[-1] == "value":  # the Variable's value
    keys = keys[:-1]
  return keys[-1] == "alpha" or (keys[0].startswith("masa_blk") and keys[-1] in ("beta", "gamma"))


def _images(lq_hw, ref_hw, seed):
  rng = np.random.default_rng(seed)
  return (rng.uniform(size=(1, *lq_hw, 3)).astype(np.float32),
          rng.uniform(size=(1, *ref_hw, 3)).astype(np.float32))


@pytest.mark.torch
def test_guided_restormer_parity_square_photo():
  """RestormerRefFusion (the code's fusion points): a 120² photo (padded to 128: 2 x 2 blocks at
  /8) with a 192² guidance (21-cell blocks in a 24² map)."""
  assert geometry((128, 128), (192, 192), down=8).d_x == 19
  net = _parity(_torch_model(), *_images((120, 120), (192, 192), seed=0))
  assert isinstance(net, GuidedRestormer) and net.fusion == "encoder+bottleneck"


@pytest.mark.torch
def test_guided_promptir_parity_non_square_photo_decoder_fusion():
  """PromptIRRefFusion with our decoder fusion (in the test's copy too) on a 128 x 192 photo
  with a 128² guidance: d_y = 13 != d_x = 7."""
  g = geometry((128, 192), (128, 128), down=8)
  assert (g.py, g.px, g.d_y, g.d_x) == (2, 3, 13, 7)
  tm = _torch_model(prompt=True, fusion="encoder+decoder")
  net = _parity(tm, *_images((128, 192), (128, 128), seed=2))
  assert isinstance(net, GuidedPromptIR) and net.fusion == "encoder+decoder"


@pytest.mark.torch
def test_released_restormer_family_indexing_crashes_b7():
  import torch

  tm = _torch_model(fix_b7=False)
  lq, ref = _images((128, 128), (128, 128), seed=0)
  with pytest.raises(IndexError), torch.no_grad():
    tm(_nchw(lq), _nchw(ref))


@pytest.mark.slow
@pytest.mark.torch
def test_guided_nafnet_decoder_fusion_parity():
  """NAFNetRefFusion + our decoder fusion (256² photo: 2 x 2 blocks at /16; 256² guidance)."""
  torch_tdr = pytest.importorskip("torch_tdr")
  import torch
  import torch_nafnet

  torch.manual_seed(0)
  # Backbone blocks only where the decoder fusion's position matters (the last decoder level):
  # the NAFNet blocks are checked elsewhere, the compile time is the cost here.
  tm = torch_nafnet.perturb_(torch_tdr.TorchNAFNetRefFusion(
      width=4, nf=4, enc_blk_nums=(0, 0, 0, 0), dec_blk_nums=(0, 0, 0, 1), middle_blk_num=0,
      fusion="encoder+decoder")).eval()
  with torch.no_grad():
    for name, p in tm.masa_enc.named_parameters():
      p.zero_() if name.endswith("bias") else p.normal_(0, (2 / p[0].numel()) ** 0.5)
  net = _parity(tm, *_images((256, 256), (256, 256), seed=3))
  assert isinstance(net, GuidedNAFNet) and net.fusion == "encoder+decoder"
  assert infer_guided(tm.state_dict())[1]["reffusion_n_blocks_dec"] == (1, 1, 1, 1)


@pytest.mark.torch
def test_load_guided_layouts_and_key_checks(tmp_path):
  """Lightning `net.`-prefixed and BasicSR `.pth` files (safe loader) give the same network; an
  unknown or missing key is named; every official key is consumed."""
  import torch

  tm = _torch_model(prompt=True)
  sd = tm.state_dict()
  arch, opts = infer_guided(sd)
  assert arch == "promptir" and opts["reffusion_n_blocks"] == (1, 1, 1, 1)
  assert opts["prompt_dims"] == PROMPT["prompt_dims"] and opts["fusion"] == "encoder+bottleneck"
  torch.save({"params": sd}, tmp_path / "net_g.pth")
  a = load_guided(tmp_path / "net_g.pth")
  b = load_guided({"state_dict": {f"net.{k}": v for k, v in sd.items()}})
  la, lb = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
  assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))
  alpha = np.asarray(a.masa_blk_enc_level2[0].alpha[...])
  assert alpha.shape == () and alpha == sd["masa_blk_enc_level2.0.alpha"].item()
  with pytest.raises(ConversionError, match="masa_blk_enc_level5"):
    load_guided({**sd, "masa_blk_enc_level5.0.alpha": sd["masa_blk_enc_level1.0.alpha"]})
  with pytest.raises(ConversionError, match=r"masa_blk_enc_level3\.0\.alpha"):
    load_guided({k: v for k, v in sd.items() if k != "masa_blk_enc_level3.0.alpha"})
  with pytest.raises(ConversionError, match="guidance encoder"):
    load_guided({k: v for k, v in sd.items() if not k.startswith("masa_enc.")})


@pytest.mark.parametrize("arch", ARCHS)
def test_build_guided_options(arch):
  """Every arch builds (abstractly: no compile) with either fusion; the decoder stacks exist
  only with "encoder+decoder"; unknown names give one clear line."""
  small = dict(width=4, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1),
               ext_n_blocks=(1, 1, 1, 1), reffusion_n_blocks=(1, 1, 1, 1)) \
      if arch == "nafnet" else dict(TINY, **(PROMPT if arch == "promptir" else {}))
  for fusion in ("encoder+bottleneck", "encoder+decoder"):
    net = nnx.eval_shape(lambda: build_guided(arch, **small, fusion=fusion))  # noqa: B023
    dec = [path for path, _ in nnx.to_flat_state(nnx.state(net, nnx.Param))
           if str(path[0]).startswith("masa_blk_dec")]
    assert bool(dec) == (fusion == "encoder+decoder")
  with pytest.raises(ValueError, match="fusion must be one of"):
    build_guided(arch, **small, fusion="decoder")
  with pytest.raises(ValueError, match="unknown arch"):
    build_guided("swinir")

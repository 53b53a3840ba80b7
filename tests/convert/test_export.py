"""`uir-jax convert`: PyTorch checkpoints -> .safetensors state_dicts that load without torch."""

import numpy as np
import pytest
from flax import nnx

from uir_jax.convert.common import ConversionError, flat_params
from uir_jax.convert.to_safetensors import detect_kind, to_safetensors
from uir_jax.convert.unet import load_unet

torch = pytest.importorskip("torch")
torch_unet = pytest.importorskip("torch_unet")
pytestmark = pytest.mark.torch


def _unet_state_dict():
  model = torch_unet.ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=0,
                                     use_degra_context=False, use_image_context=False)
  return torch_unet.randomize_(model).state_dict()


def test_unet_checkpoint_round_trips_through_safetensors(tmp_path):
  from safetensors import safe_open

  sd = _unet_state_dict()
  src = tmp_path / "unet.pth"
  # Wrapped like a training checkpoint, with a DataParallel prefix.
  torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "iter": 7}, src)
  dest = tmp_path / "out" / "unet.safetensors"
  assert to_safetensors(str(src), str(dest)) == "denoiser"
  with safe_open(str(dest), "np") as f:
    assert f.metadata()["kind"] == "denoiser" and f.metadata()["source"] == "unet.pth"
    assert set(f.keys()) == set(sd)
  a = flat_params(nnx.state(load_unet(str(src)), nnx.Param))
  b = flat_params(nnx.state(load_unet(str(dest)), nnx.Param))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_convert_refuses_what_would_not_load(tmp_path):
  sd = _unet_state_dict()
  broken = dict(sd)
  broken.pop(next(iter(broken)))
  with pytest.raises(ConversionError):
    to_safetensors(broken, str(tmp_path / "x.safetensors"))
  assert not (tmp_path / "x.safetensors").exists()
  with pytest.raises(ValueError, match=".safetensors"):
    to_safetensors(sd, str(tmp_path / "x.pth"))
  with pytest.raises(ValueError, match="kind"):
    to_safetensors(sd, str(tmp_path / "x.safetensors"), kind="vae")


def test_detect_kind():
  assert detect_kind({"state_dict": {"clip.visual.proj": 0, "visual_control.proj": 0}}) == "daclip"
  assert detect_kind({"visual.proj": 0, "text_projection": 0}) == "clip"
  assert detect_kind({"net.slice1.0.weight": 0, "lin0.model.1.weight": 0}) == "lpips"
  assert detect_kind(_unet_state_dict()) == "denoiser"

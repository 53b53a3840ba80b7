"""LPIPS(alex) in JAX against the `lpips` package on the same (random-trunk) weights."""

import numpy as np
import pytest

from uir_jax.convert.common import ConversionError

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")
pytestmark = pytest.mark.torch


def _torch_lpips(seed=0):
  """The package's LPIPS with its shipped lin heads and a random AlexNet trunk (no download)."""
  torch.manual_seed(seed)
  return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def _images(shape, seed):
  import skimage.data
  from scipy import ndimage

  rng = np.random.default_rng(seed)
  gt = skimage.data.astronaut()[:shape[0], 100:100 + shape[1]].astype(np.float32) / 255.0
  lq = np.clip(ndimage.gaussian_filter(gt, (1.5, 1.5, 0)) + rng.normal(0, 0.03, gt.shape), 0, 1)
  noise = rng.uniform(size=(1,) + gt.shape).astype(np.float32)
  return np.stack([lq.astype(np.float32), noise[0]]), np.stack([gt, gt])


def _reference(model, x, y):
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model(to_t(x), to_t(y), normalize=True).reshape(-1).numpy()


@pytest.mark.parametrize("shape", [(64, 64), (77, 101)])
def test_lpips_matches_the_lpips_package(shape):
  from uir_jax.convert.lpips import load_lpips

  ref_model = _torch_lpips()
  ours = load_lpips(ref_model.state_dict())
  x, y = _images(shape, 0)
  ref = _reference(ref_model, x, y)
  out = np.asarray(ours(x, y))
  assert out.shape == (2,) and ref[0] < ref[1]  # blurred photo closer than noise
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours(y, y)), 0.0, atol=1e-7)


def test_lpips_from_a_torchvision_alexnet_and_the_package_heads(tmp_path):
  import torchvision

  from uir_jax.convert.lpips import load_lpips

  ref_model = _torch_lpips(1)
  alexnet = torchvision.models.alexnet(weights=None)
  # Put the reference trunk's weights into a full torchvision AlexNet (classifier included).
  trunk = {k.split(".", 2)[2]: v for k, v in ref_model.state_dict().items()
           if k.startswith("net.slice")}
  alexnet.features.load_state_dict(trunk)
  path = tmp_path / "alexnet.pth"
  torch.save(alexnet.state_dict(), path)
  ours = load_lpips(str(path))  # lin heads: the installed lpips package's file
  x, y = _images((64, 80), 2)
  np.testing.assert_allclose(np.asarray(ours(x, y)), _reference(ref_model, x, y), rtol=1e-4,
                             atol=1e-6)


def test_lpips_rejects_bad_files_and_inputs():
  from uir_jax.convert.lpips import load_lpips

  sd = dict(_torch_lpips().state_dict())
  broken = dict(sd)
  del broken["lin2.model.1.weight"]
  with pytest.raises(ConversionError, match="lins.2.kernel"):
    load_lpips(broken)
  broken = dict(sd)
  broken["net.slice3.6.weight"] = broken["net.slice3.6.weight"][:10]
  with pytest.raises(ConversionError, match="net.slice3.6.weight"):
    load_lpips(broken)
  broken = dict(sd)
  broken["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
  with pytest.raises(ConversionError, match="scaling_layer.shift"):
    load_lpips(broken)
  model = load_lpips(sd)
  with pytest.raises(ValueError, match="32x32"):
    model(np.zeros((1, 16, 40, 3), np.float32), np.zeros((1, 16, 40, 3), np.float32))

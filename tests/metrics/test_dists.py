"""DISTS in JAX against `dists-pytorch` with its shipped alpha/beta and a random VGG16 trunk."""

import numpy as np
import pytest

from uir_jax.convert.common import ConversionError

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
dists_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def reference():
  """The package's DISTS() (which loads its weights.pt alpha/beta) on a random VGG16: its
  `models.vgg16(pretrained=True)` download is replaced by an untrained torchvision VGG16."""
  original = dists_pt.models.vgg16
  torch.manual_seed(0)
  dists_pt.models.vgg16 = lambda pretrained=False, **kwargs: original(weights=None)
  try:
    model = dists_pt.DISTS().eval()
  finally:
    dists_pt.models.vgg16 = original
  return model


def _images(h, w, seed):
  import skimage.data

  rng = np.random.default_rng(seed)
  gt = skimage.data.astronaut()[40:40 + h, 100:100 + w].astype(np.float32) / 255.0
  noisy = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
  return (np.stack([noisy, rng.uniform(size=gt.shape), gt]).astype(np.float32),
          np.stack([gt, gt, gt]))


def _reference(model, x, y):
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model(to_t(x), to_t(y)).reshape(-1).numpy()


@pytest.mark.parametrize("shape", [(96, 120), (75, 101)])
def test_dists_matches_dists_pytorch(reference, shape):
  from uir_jax.convert.dists import load_dists
  from uir_jax.metrics.common import jit_pair_metric

  ours = jit_pair_metric(load_dists(reference.state_dict()))  # whole state_dict: trunk, alpha/beta
  x, y = _images(*shape, seed=0)
  ref = _reference(reference, x, y)
  out = np.asarray(ours(x, y))
  assert out.shape == (3,) and ref[0] < ref[1]  # the noisy photo is closer than noise
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  assert abs(out[2]) < 1e-6  # identical images


def test_dists_from_a_torchvision_vgg16_and_the_package_weights(reference, tmp_path):
  from flax import nnx

  from uir_jax.convert.common import flat_params
  from uir_jax.convert.dists import load_dists

  # A torchvision VGG16 file's layout (features.N.*, plus a classifier that is ignored; a small
  # stand-in, to keep the file small) with the reference's trunk.
  sd = {f"features.{k.split('.', 1)[1]}": v for k, v in reference.state_dict().items()
        if k.startswith("stage") and not k.endswith("filter")}
  sd["classifier.6.weight"] = torch.zeros(10, 4)
  path = tmp_path / "vgg16.pth"
  torch.save(sd, path)
  ours = load_dists(str(path))  # alpha/beta: the installed DISTS_pytorch's weights.pt
  full = load_dists(reference.state_dict())
  theirs = flat_params(nnx.state(full))
  for key, value in flat_params(nnx.state(ours)).items():  # the network parity test checks
    np.testing.assert_array_equal(np.asarray(value), np.asarray(theirs[key]), err_msg=key)


def test_dists_rejects_bad_files_and_inputs(reference):
  from uir_jax.convert.dists import load_dists

  sd = dict(reference.state_dict())
  broken = dict(sd)
  del broken["stage3.12.bias"]
  with pytest.raises(ConversionError, match="convs.5.bias"):
    load_dists(broken)
  broken = dict(sd)
  broken["alpha"] = broken["alpha"][:, :100]
  with pytest.raises(ConversionError, match="alpha"):
    load_dists(broken)
  broken = dict(sd)
  broken["std"] = torch.ones(1, 3, 1, 1)
  with pytest.raises(ConversionError, match="std"):
    load_dists(broken)
  with pytest.raises(ConversionError, match="do not pass weights"):
    load_dists(sd, weights={"alpha": sd["alpha"], "beta": sd["beta"]})
  model = load_dists(sd)
  with pytest.raises(ValueError, match="one shape"):
    model(np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 40, 3)))
  with pytest.raises(ValueError, match="RGB"):
    model(np.zeros((1, 32, 32)), np.zeros((1, 32, 32)))

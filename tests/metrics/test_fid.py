"""FID: Inception features against pytorch-fid's InceptionV3 on the same random weights, and the
Fréchet distance against pytorch-fid's `calculate_frechet_distance`."""

import numpy as np
import pytest

from uir_jax.convert.common import ConversionError

torch = pytest.importorskip("torch")
fid_inception = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")
pytestmark = pytest.mark.torch


def _random_fid_state_dict(seed):
  """A state_dict with the keys of pytorch-fid's `fid_inception_v3()` (the pt_inception file's)
  and random weights scaled so that activations stay O(1) through the 20-odd layers."""
  net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for key, v in net.state_dict().items():
    if key.endswith("conv.weight"):
      v = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    elif key.endswith("bn.weight"):
      v = torch.rand(v.shape, generator=g) + 0.5
    elif key.endswith(("bn.bias", "running_mean")):
      v = 0.1 * torch.randn(v.shape, generator=g)
    elif key.endswith("running_var"):
      v = 1.5 * torch.rand(v.shape, generator=g) + 0.5
    sd[key] = v
  return sd


@pytest.fixture(scope="module")
def reference():
  """pytorch-fid's own InceptionV3([3]) (resize, normalisation, FID blocks) on random weights:
  its weight download is replaced by the random state_dict."""
  sd = _random_fid_state_dict(0)
  original = fid_inception.load_state_dict_from_url
  fid_inception.load_state_dict_from_url = lambda *args, **kwargs: sd
  try:
    model = fid_inception.InceptionV3([3]).eval()
  finally:
    fid_inception.load_state_dict_from_url = original
  return model, sd


def _photos(h, w, n):
  import skimage.data

  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
  return np.stack([p[10:10 + h, 20:20 + w] for p in photos[:n]]).astype(np.float32) / 255.0


def _torch_features(model, images):
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))[0]
  return out[:, :, 0, 0].numpy().astype(np.float64)


def test_fid_features_and_distance_match_pytorch_fid(reference):
  from uir_jax.convert.fid import _unwrap_blocks, load_inception
  from uir_jax.metrics.fid import FeatureExtractor, fid_from_features

  model, sd = reference
  net = load_inception(sd)  # the pt_inception layout
  # Two sizes through one extractor (batch 2: the 3-image set has a zero-padded short batch).
  a, b = _photos(120, 150, 2), _photos(90, 100, 3)
  extract = FeatureExtractor(net, batch_size=2)
  out_a, out_b = extract(a), extract(b)
  ref_a, ref_b = _torch_features(model, a), _torch_features(model, b)
  assert out_a.shape == (2, 2048) and out_b.shape == (3, 2048)
  for out, ref in ((out_a, ref_a), (out_b, ref_b)):
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
  # The distance of the two sets from our features against the one from pytorch-fid's features.
  ours, theirs = fid_from_features(out_a, out_b), fid_from_features(ref_a, ref_b)
  assert theirs > 1.0
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  # The wrapper's state_dict (blocks.N.M.*) names the same tensors as the pt_inception file.
  unwrapped = _unwrap_blocks(model.state_dict())
  assert set(unwrapped) == set(sd) - {"fc.weight", "fc.bias"}  # the wrapper drops the head
  assert all(torch.equal(v, sd[k]) for k, v in unwrapped.items())


@pytest.mark.parametrize("n1,n2", [(300, 250), (10, 12)])
def test_frechet_distance_matches_pytorch_fid(n1, n2):
  from uir_jax.metrics.fid import feature_statistics, fid_from_features, frechet_distance

  rng = np.random.default_rng(n1)
  a = rng.normal(size=(n1, 64))
  b = 1.2 * rng.normal(size=(n2, 64)) @ rng.normal(size=(64, 64)) / 8 + 0.1
  (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
  ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  # n > d: pytorch-fid's sqrtm computation; n <= d (singular covariances): the exact low-rank form.
  np.testing.assert_allclose(fid_from_features(a, b), ref, rtol=1e-6)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-6)
  assert abs(fid_from_features(a, a)) < 1e-8


def test_fid_rejects_bad_checkpoints_and_inputs(reference):
  import torchvision

  from uir_jax.convert.fid import load_inception
  from uir_jax.metrics.fid import feature_statistics, frechet_distance

  _, sd = reference
  broken = dict(sd)
  del broken["Mixed_6c.branch7x7_2.bn.running_var"]
  with pytest.raises(ConversionError, match="Mixed_6c.branch7x7_2.bn.var"):
    load_inception(broken)
  broken = dict(sd)
  broken["Mixed_7c.branch_pool.conv.weight"] = broken["Mixed_7c.branch_pool.conv.weight"][:5]
  with pytest.raises(ConversionError, match="Mixed_7c.branch_pool.conv.weight"):
    load_inception(broken)
  imagenet = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
  with pytest.raises(ConversionError, match="torchvision's ImageNet Inception-v3"):
    load_inception(imagenet.state_dict())
  with pytest.raises(ValueError, match="at least two"):
    feature_statistics(np.zeros((1, 2048)))
  with pytest.raises(ValueError, match="mismatched"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

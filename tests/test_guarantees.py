"""Guarantees whose earlier tests let a planted bug through (issue 26): each test here failed with
that bug in place. The NAFNet + DA-CLIP stage reads the degradation embedding; SSIM / PSNR on the
luma honour `crop_border`; every epoch draws a new crop of an image; the FSDP tie-break takes the
last axis; FID is float64 where float32 is far off."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from uir_jax import parallel
from uir_jax.metrics.image import psnr, ssim


def test_nafnet_daclip_stage_reads_the_degradation_embedding(monkeypatch):
  """Only the degradation context on, noisy parameters (the zero-initialised conditioning would
  ignore any context): two different large degradation embeddings must give different losses.
  (The random tiny DA-CLIP's own embeddings of two images move the loss by ~2e-6 only.)"""
  from configs import nafnet_daclip
  from uir_jax.systems.daclip_uir import nafnet
  from uir_jax.train import loop

  config = nafnet_daclip.get_config("tiny")
  with config.unlocked():
    config.model.use_image_context = False
    config.daclip.windows = False
  dim = config.model.context_dim
  seen = []

  def contexts(daclip_def, aux, clip_images, *, use_degra, use_image, **kwargs):
    # The stage's DA-CLIP call, answered with a large embedding made from the CLIP view.
    seen.append((use_degra, use_image))
    return 5.0 * jnp.tanh(clip_images.reshape(clip_images.shape[0], -1)[:, :dim]), None

  monkeypatch.setattr(nafnet.conditioning, "daclip_contexts", contexts)
  stage = nafnet.make_stage(config)
  graphdef, init = loop.init_state_fn(stage)
  state = jax.jit(init)()
  leaves, tree = jax.tree.flatten(state["params"])
  noisy = [x + 0.2 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
           for i, x in enumerate(leaves)]
  params = jax.tree.unflatten(tree, noisy)
  r = np.random.default_rng(1)
  gt = r.uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
  batch = {"lq": np.clip(gt + r.normal(0, 0.15, gt.shape), 0, 1).astype(np.float32), "gt": gt,
           "index": np.arange(4), "clip_lq": r.normal(0, 1, (4, 32, 32, 3)).astype(np.float32)}
  other = dict(batch, clip_lq=-batch["clip_lq"])  # another degradation embedding, same images
  loss = jax.jit(lambda b: stage.loss_fn(nnx.merge(graphdef, params, state["rest"]), b,
                                         loop.step_key(3), stage.aux)[0])
  a, b = float(loss(batch)), float(loss(other))
  assert seen and seen[0] == (True, False)  # it asked DA-CLIP for the degradation embedding
  # Measured 6.4e-3 (noise 0.05: 4e-5, the blocks' conditioning starts at zero); a stage that
  # drops the embedding gives bit-equal losses.
  assert abs(a - b) > 1e-3, (a, b)


def _luma(rgb):
  import skimage.color

  return skimage.color.rgb2ycbcr(rgb)[..., 0] / 255.0


def test_luma_psnr_and_ssim_drop_the_border_like_scikit_image():
  """`uir-jax eval`'s SSIM-Y / PSNR-Y with the reference's 4-pixel crop, against scikit-image on
  the cropped luma. The pair differs mostly in its border, so ignoring the crop is far off."""
  import skimage.data
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity

  gt = skimage.data.astronaut()[100:164, 150:230].astype(np.float32) / 255.0
  lq = gt + np.random.default_rng(0).normal(0, 0.01, gt.shape).astype(np.float32)
  lq[:4] = lq[-4:] = 0.0  # a wrecked frame: inside the 4-px border only
  lq[:, :4] = 1.0
  lq = np.clip(lq, 0, 1)
  y_lq, y_gt = _luma(lq[4:-4, 4:-4]), _luma(gt[4:-4, 4:-4])
  want_ssim = structural_similarity(y_lq * 255, y_gt * 255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
  want_psnr = peak_signal_noise_ratio(y_gt, y_lq, data_range=1.0)
  np.testing.assert_allclose(ssim(lq, gt, crop_border=4, y_channel=True), [want_ssim], atol=1e-5)
  np.testing.assert_allclose(psnr(lq, gt, crop_border=4, y_channel=True), [want_psnr], atol=1e-3)
  # The frame matters: uncropped, both scores are far lower.
  assert ssim(lq, gt, y_channel=True)[0] < want_ssim - 0.05  # 0.915 vs 0.988
  assert psnr(lq, gt, y_channel=True)[0] < want_psnr - 10


def test_each_epoch_draws_a_new_crop_and_degradation_of_an_image(tmp_path):
  """One image: each training example is a new epoch, so four examples must be four different
  crops (flips off, so only the crop can differ) and four different degradations."""
  pipelines = pytest.importorskip("input_pipeline.pipelines")
  import ml_collections

  root = tmp_path / "one"
  root.mkdir()
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(root / "only.png")
  cfg = ml_collections.ConfigDict({"source": "folder", "root": str(root), "patch_size": 16,
                                   "gray_prob": 0.0, "use_flip": False, "use_rot": False,
                                   # noise only: the wild chain costs seconds to trace
                                   "chain": [{"op": "gaussian_noise", "sigma_range": [5.0, 30.0],
                                              "gray_prob": 0.0}]})
  stream = pipelines.from_config(cfg, batch_size=1, seed=3, train=True)
  assert stream.source.num_items == 1
  batches = [b for _, b in zip(range(4), iter(stream), strict=False)]
  gts = [b["gt"][0] for b in batches]
  noise = [b["lq"][0] - b["gt"][0] for b in batches]
  for i in range(4):
    # Each crop is a window of the image.
    assert any(np.array_equal(np.round(gts[i] * 255).astype(np.uint8), rgb[y:y + 16, x:x + 16])
               for y in range(49) for x in range(49))
    for j in range(i):
      assert not np.array_equal(gts[i], gts[j]), (i, j)
      assert not np.allclose(noise[i], noise[j]), (i, j)


def test_fsdp_tie_break_takes_the_last_axis():
  """Documented: among equally long divisible axes, the last one is split."""
  fsdp = ("fsdp",)
  assert parallel.fsdp_spec((64, 64), 4, 1) == jax.sharding.PartitionSpec(None, *fsdp)
  assert parallel.fsdp_spec((3, 3, 64, 64), 8, 1) == jax.sharding.PartitionSpec(
      None, None, None, *fsdp)
  assert parallel.fsdp_spec((128, 64, 128), 8, 1) == jax.sharding.PartitionSpec(None, None,
                                                                                 *fsdp)


@pytest.mark.torch
def test_fid_is_float64_where_float32_is_far_off():
  """Features with a large common offset and an ill-conditioned covariance: FID (~26) is a small
  difference of large traces. Measured: float32 statistics miss pytorch-fid by ~1500x the 1e-6
  tolerance, a float32 distance by ~4000x; float64 is within it."""
  fid_score = pytest.importorskip("pytorch_fid.fid_score")
  from uir_jax.metrics.fid import feature_statistics, fid_from_features, frechet_distance

  rng = np.random.default_rng(300)
  base = rng.normal(size=(64, 64)) / 8 * np.logspace(0, -2, 64)[:, None]
  a = 1e4 + 10 * rng.normal(size=(300, 64)) @ base
  b = 1e4 + 10 * rng.normal(size=(250, 64)) @ base + 0.05
  mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
  mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
  ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert 10 < ref < 50
  np.testing.assert_allclose(fid_from_features(a, b), ref, rtol=1e-6)
  np.testing.assert_allclose(frechet_distance(*feature_statistics(a), *feature_statistics(b)),
                             ref, rtol=1e-6)



def test_every_library_module_imports_without_tensorflow_and_torch():
  """README: `uir_jax/` never imports TensorFlow (accelerator images without it run inference),
  and torch only inside the functions that read .pt/.bin files. Every module, imported in a
  process where both imports fail."""
  import subprocess
  import sys

  code = ("import sys, pkgutil, importlib\n"
          "sys.modules['tensorflow'] = None; sys.modules['torch'] = None\n"
          "import uir_jax\n"
          "names = [m.name for m in pkgutil.walk_packages(uir_jax.__path__, 'uir_jax.')]\n"
          "for n in names: importlib.import_module(n)\n"
          "print(len(names))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout.split()[-1]) > 30  # the walk found the package's modules

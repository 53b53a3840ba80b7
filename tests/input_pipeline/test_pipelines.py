"""Tests for input_pipeline.pipelines: determinism, resumption, host shards, augmentation, eval
padding, bad files, the CLIP branch and the quickstart source (all data made in tmp_path)."""

from __future__ import annotations

import itertools
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from input_pipeline import degradations, pipelines, readers  # noqa: E402
from tests.input_pipeline.test_readers import make_bad_folder, make_universal_tree  # noqa: E402


def _cfg(**kw):
  base = {"source": "universal", "patch_size": 16, "gray_prob": 0.0}
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _take(stream, n):
  return list(itertools.islice(iter(stream), n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def universal_root(tmp_path, rng):
  make_universal_tree(str(tmp_path / "universal"), rng)
  return str(tmp_path / "universal")


def test_train_stream_deterministic_and_resumable(universal_root):
  cfg = _cfg(root=universal_root)
  fresh = _take(pipelines.from_config(cfg, batch_size=3, seed=7, train=True), 6)
  again = _take(pipelines.from_config(cfg, batch_size=3, seed=7, train=True), 6)
  _assert_batches_equal(fresh, again)
  resumed = _take(pipelines.from_config(cfg, batch_size=3, seed=7, train=True, start_step=4), 2)
  _assert_batches_equal(fresh[4:], resumed)
  np.testing.assert_array_equal(resumed[0]["index"], [12, 13, 14])
  other = _take(pipelines.from_config(cfg, batch_size=3, seed=8, train=True), 2)
  assert not np.array_equal(other[0]["gt"], fresh[0]["gt"])
  b = fresh[0]
  assert b["lq"].dtype == b["gt"].dtype == np.float32 and b["gt"].shape == (3, 16, 16, 3)
  assert b["words"].shape == (3, 4) and b["words"].dtype == bool and not b["words"].any()


def test_host_shards_disjoint_covering_and_consistent(universal_root):
  cfg = _cfg(root=universal_root)
  hosts = [_take(pipelines.from_config(cfg, batch_size=2, seed=3, train=True, process_index=h,
                                       process_count=3), 3) for h in range(3)]
  single = _take(pipelines.from_config(cfg, batch_size=6, seed=3, train=True), 3)
  seen = np.concatenate([b["index"] for host in hosts for b in host])
  assert sorted(seen.tolist()) == list(range(18))  # disjoint and covering
  for step in range(3):
    # The hosts' batches side by side are the single-host global batch: same examples.
    for k in ("index", "gt", "lq", "label"):
      np.testing.assert_array_equal(
          np.concatenate([hosts[h][step][k] for h in range(3)]), single[step][k], err_msg=k)


def _dihedral(x):
  for t in (False, True):
    y = x.transpose(1, 0, 2) if t else x
    for v in (False, True):
      for h in (False, True):
        yield (t, v, h), y[::-1 if v else 1, ::-1 if h else 1]


def test_crops_and_flips_identical_for_lq_and_gt(universal_root):
  stream = pipelines.from_config(_cfg(root=universal_root), batch_size=8, seed=0, train=True)
  batches = _take(stream, 6)
  transforms, labels = set(), set()
  for b in batches:
    # LQ = GT + 1/255 in red, equal elsewhere: the pair got the same crop and the same flips.
    np.testing.assert_allclose(b["lq"][..., 0] - b["gt"][..., 0], 1 / 255, atol=1e-6)
    np.testing.assert_array_equal(b["lq"][..., 1:], b["gt"][..., 1:])
    for gt, label in zip(b["gt"], b["label"], strict=True):
      code = int(round(gt[0, 0, 0] * 255))
      deg = readers.DEGRADATIONS[code // 10]
      assert label == code // 10
      path = os.path.join(universal_root, "train", deg, "GT", f"{code % 10:03d}.png")
      src = np.asarray(Image.open(path), np.float32) / 255
      found = None
      for key, view in _dihedral(src):
        for y, x in itertools.product(range(view.shape[0] - 15), range(view.shape[1] - 15)):
          if np.array_equal(view[y:y + 16, x:x + 16], gt):
            found = key
            break
        if found:
          break
      assert found is not None, "crop is not a flipped/transposed window of its GT"
      transforms.add(found)
      labels.add(int(label))
  assert len(transforms) >= 6  # the 8 dihedral transforms all occur
  assert labels == {readers.DEGRADATIONS.index(d) for d in ("noisy", "hazy", "snowy")}


def test_eval_padding_and_mask(universal_root):
  cfg = _cfg(root=universal_root)  # val split: 6 pairs, classes interleaved
  stream = pipelines.from_config(cfg, batch_size=4, seed=0, train=False)
  batches = list(stream)
  assert len(stream) == len(batches) == 2
  np.testing.assert_array_equal(batches[1]["mask"], [True, True, False, False])
  assert [d.decode() for d in np.concatenate([b["degradation"] for b in batches])][:6] == [
      "hazy", "noisy", "snowy", "noisy", "snowy", "noisy"]
  # Centre crops, no flips: equal to the file's centre window.
  src = np.asarray(Image.open(os.path.join(universal_root, "val", "hazy", "GT", "000.png")),
                   np.float32) / 255
  np.testing.assert_allclose(batches[0]["gt"][0], src[12:28, 16:32], atol=1e-6)
  # Two hosts: same number of batches each; the real examples cover the set exactly once.
  real = []
  for h in range(2):
    host = list(pipelines.from_config(cfg, batch_size=2, seed=0, train=False, process_index=h,
                                      process_count=2))
    assert len(host) == 2
    real += [i for b in host for i, m in zip(b["index"], b["mask"], strict=True) if m]
  assert sorted(real) == list(range(6))


def test_csv_source_pipeline(universal_root, tmp_path):
  csv_path = tmp_path / "val.csv"
  csv_path.write_text("filepath\ttitle\n"
                      "universal/val/noisy/LQ/001.png\ta clock that reads: ten past two: noisy\n")
  cfg = _cfg(source="csv", csv_path=str(csv_path), patch_size=8)
  (b,) = list(pipelines.from_config(cfg, batch_size=2, seed=0, train=False))
  assert b["caption"][0].decode() == "a clock that reads: ten past two"
  assert b["degradation"][0].decode() == "noisy" and b["mask"].tolist() == [True, False]
  np.testing.assert_allclose(b["lq"][0, ..., 0] - b["gt"][0, ..., 0], 1 / 255, atol=1e-6)


def test_folder_with_bad_files_runs(tmp_path, rng):
  root = str(tmp_path / "photos")
  _, expected = make_bad_folder(root, rng)
  cfg = _cfg(source="folder", root=root, patch_size=32, gray_prob=1.0)
  stream = pipelines.from_config(cfg, batch_size=4, seed=1, train=True)
  assert {k: stream.source.counts[k] for k in expected} == expected
  batches = _take(stream, 2)  # one epoch: each of the 8 good images (incl. the small one) once
  for b in batches:
    assert b["lq"].shape == b["gt"].shape == (4, 32, 32, 3)
    assert np.isfinite(b["lq"]).all() and 0 <= b["lq"].min() and b["lq"].max() <= 1
    # gray_prob = 1: every GT went gray before degradation.
    np.testing.assert_allclose(b["gt"][..., 0], b["gt"][..., 2], atol=1e-6)
    for words, text in zip(b["words"], b["degradation"], strict=True):
      names = [w for w, on in zip(degradations.DEGRADATION_WORDS, words, strict=True) if on]
      assert text.decode() == ", ".join(names)
  assert any(b["words"].any() for b in batches)
  assert not np.array_equal(batches[0]["lq"], batches[0]["gt"])


@pytest.mark.slow
def test_degraded_stream_resumes_exactly(tmp_path, rng):
  root = str(tmp_path / "photos")
  make_bad_folder(root, rng)
  cfg = _cfg(source="folder", root=root, patch_size=32, gray_prob=0.5)
  fresh = _take(pipelines.from_config(cfg, batch_size=4, seed=1, train=True), 3)
  resumed = _take(pipelines.from_config(cfg, batch_size=4, seed=1, train=True, start_step=1), 2)
  _assert_batches_equal(fresh[1:], resumed)


def test_quickstart_batches_with_clip_branch():
  from configs import irsde_quickstart

  cfg = irsde_quickstart.get_config("tiny").data
  cfg.clip_lq = True
  cfg.clip_size = 224  # the released CLIPs' size (the tiny configs use their CLIP's 32)
  (b,) = _take(pipelines.from_config(cfg, batch_size=2, seed=0, train=True), 1)
  p = cfg.patch_size
  assert b["lq"].shape == b["gt"].shape == (2, p, p, 3)
  assert all(len(c.split()) >= 5 for c in b["caption"])
  assert b["clip_lq"].shape == (2, cfg.clip_size, cfg.clip_size, 3)
  # The CLIP branch is the normalised bicubic resize of the LQ crop.
  ref = pipelines.clip_image(tf.constant(b["lq"][1]), cfg.clip_size).numpy()
  np.testing.assert_allclose(b["clip_lq"][1], ref, atol=1e-5)
  unnorm = b["clip_lq"] * np.float32(pipelines.OPENAI_STD) + np.float32(pipelines.OPENAI_MEAN)
  assert -1e-5 < unnorm.min() and unnorm.max() < 1 + 1e-5



def test_crop_clip_view_is_the_full_resolution_centre_of_the_lq():
  from configs import quickstart

  cfg = quickstart.get_config().stage1.data
  cfg.clip_view, cfg.patch_size, cfg.clip_size = "crop", 48, 32
  (b,) = _take(pipelines.from_config(cfg, batch_size=3, seed=0, train=True), 1)
  p, c = cfg.patch_size, cfg.clip_size
  lo = (p - c) // 2
  unnorm = b["clip_lq"] * np.float32(pipelines.OPENAI_STD) + np.float32(pipelines.OPENAI_MEAN)
  # The 8-bit levels of the LQ's centre, unresized: the degradation's own pixels.
  np.testing.assert_allclose(unnorm, np.round(b["lq"][:, lo:lo + c, lo:lo + c] * 255) / 255,
                             atol=1e-6)
  cfg.patch_size = c - 1
  with pytest.raises(ValueError, match="patch_size >= clip_size"):
    pipelines.from_config(cfg, batch_size=3, seed=0, train=True)
  cfg.patch_size, cfg.clip_view = p, "zoom"
  with pytest.raises(ValueError, match="clip_view must be one of"):
    pipelines.from_config(cfg, batch_size=3, seed=0, train=True)


def _pil_clip(lq_u8):
  """The reference's clip_transform on an 8-bit image, in [0, 1] (before mean/std)."""
  h, w = lq_u8.shape[:2]
  new_h, new_w = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
  img = Image.fromarray(lq_u8).resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
  return np.asarray(img, np.float32)[top:top + 224, left:left + 224] / 255


def test_clip_image_matches_pil_bicubic():
  import skimage.data

  photo = skimage.data.astronaut()
  small = np.asarray(Image.fromarray(photo).resize((64, 64), Image.BILINEAR))
  unnorm = lambda x: x * np.float32(pipelines.OPENAI_STD) + np.float32(pipelines.OPENAI_MEAN)
  dynamic = tf.function(pipelines.clip_image,
                        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
  # Up- and downscaling, square and not (shortest side to 224, centre crop).
  for lq in (photo[100:164, 200:264], photo[:300, :300], small, photo[:256, :384],
             photo[:333, :250]):
    pil = _pil_clip(lq)
    ours = unnorm(pipelines.clip_image(tf.constant(lq / 255, tf.float32)).numpy())
    assert ours.shape == (224, 224, 3)
    # Pillow's fixed-point weights and per-pass 8-bit rounding: equal up to float32 rounding at
    # exact half levels.
    diff = np.abs(ours - pil) * 255
    assert diff.max() <= 1.01 and np.mean(diff > 0.5) < 1e-3, (lq.shape, diff.max())
    if lq.shape[0] == lq.shape[1]:
      # Unknown static shape: tf.image.resize's antialiased Keys cubic without PIL's rounding
      # between passes, so a few pixels differ by a few levels.
      ours = unnorm(dynamic(tf.constant(lq / 255, tf.float32)).numpy())
      diff = np.abs(ours - pil) * 255
      assert diff.mean() < 0.3 and np.percentile(diff, 99.9) <= 1.01 and diff.max() <= 8.01


def test_bad_arguments(universal_root):
  cfg = _cfg(root=universal_root)
  with pytest.raises(ValueError, match="process_index"):
    pipelines.from_config(cfg, batch_size=2, seed=0, train=True, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="start_step"):
    pipelines.from_config(cfg, batch_size=2, seed=0, train=True, start_step=-1)

"""Guided restoration's data: LQ, GT and guidance crops line up (images whose pixel values encode
their photo coordinates, so a misplaced box or a flip applied to one image only shows), crops stay
inside the region the guidance covers, and a photo without guidance is skipped and counted."""

import logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import guidance, pipelines

H, W, P = 64, 96, 32  # a landscape photo; crops of 32


def _coords(h, w, top=0.0, left=0.0, scale=1.0, ident=0.5):
  """Pixels whose R, G hold the photo x / W, y / H of their centre (a guidance of h x w pixels
  covering the photo region at (top, left) with `scale` guidance pixels per photo pixel), B an id
  of the photo."""
  y = top + (np.arange(h) + 0.5) / scale
  x = left + (np.arange(w) + 0.5) / scale
  yy, xx = np.meshgrid(y, x, indexing="ij")
  return np.stack([xx / W, yy / H, np.full_like(xx, ident)], -1).astype(np.float32)


def test_guidance_crop_is_the_photo_crops_region():
  photo = _coords(H, W)
  # Same size as the photo: the plain same-box crop, bit for bit.
  for seed in range(4):
    y, x = guidance.crop_offsets((H, W), (H, W), P, seed=tf.constant([seed, 0]))
    y, x = int(y), int(x)
    crop = guidance.sample_region(photo, (H, W), y, x, P).numpy()
    np.testing.assert_array_equal(crop, photo[y:y + P, x:x + P])
  # A square guidance covers the centre square (x in [16, 80)); at 1.25x the bilinear samples of
  # the linear coordinate ramps are exact, at 3x (downsized first) within a pixel.
  for side, tol in ((80, 1e-5), (192, 1.0 / W)):
    g = _coords(side, side, left=(W - H) / 2, scale=side / H)
    xs = []
    for seed in range(8):
      y, x = guidance.crop_offsets((H, W), (side, side), P, seed=tf.constant([seed, 1]))
      y, x = int(y), int(x)
      xs.append(x)
      crop = guidance.sample_region(g, (H, W), y, x, P).numpy()
      np.testing.assert_allclose(crop, photo[y:y + P, x:x + P], atol=tol, err_msg=f"{side}")
    assert 16 <= min(xs) and max(xs) + P <= 80 and len(set(xs)) > 1
  y, x = guidance.crop_offsets((H, W), (80, 80), P)  # evaluation: the centre
  assert (int(y), int(x)) == ((H - P) // 2, (W - P) // 2)


def _png16(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = tf.io.encode_png(tf.constant(np.round(image * 65535).astype(np.uint16)))
  tf.io.write_file(path, data)


@pytest.fixture(scope="module")
def guided_root(tmp_path_factory):
  """root/train/{LQ,GT}/{a,b,c}.png; guidance/train: a (square, 80²), b (the photo's size, as
  .jpg-free 16-bit PNG), none for c."""
  root = str(tmp_path_factory.mktemp("guided"))
  for name, ident in (("a", 0.25), ("b", 0.75), ("c", 0.5)):
    for folder in ("LQ", "GT"):
      _png16(os.path.join(root, "train", folder, f"{name}.png"), _coords(H, W, ident=ident))
  g = os.path.join(root, "guidance", "train")
  _png16(os.path.join(g, "a.png"), _coords(80, 80, left=(W - H) / 2, scale=80 / H, ident=0.25))
  _png16(os.path.join(g, "b.png"), _coords(H, W, ident=0.75))
  return root


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


def _stream(root, train):
  cfg = _cfg(source="paired", root=root, split="train", val_split="train", patch_size=P,
             guidance_root=os.path.join(root, "guidance"), use_flip=True, use_rot=True)
  return pipelines.from_config(cfg, batch_size=4, seed=3, train=train)


def test_lq_gt_and_guidance_crops_line_up_with_the_same_flips(guided_root, caplog):
  with caplog.at_level(logging.WARNING):
    stream = _stream(guided_root, train=True)
  assert stream.source.counts["no_guidance"] == 1 and stream.source.num_items == 2
  skipped = [r.getMessage() for r in caplog.records if "without a (decodable) guidance" in
             r.getMessage()]
  assert len(skipped) == 1 and "skipped 1 of 3" in skipped[0], skipped
  it = iter(stream)
  seen = set()
  for _ in range(4):
    batch = next(it)
    assert batch["guidance"].shape == (4, P, P, 3)
    np.testing.assert_array_equal(batch["lq"], batch["gt"])
    for gt, g in zip(batch["gt"], batch["guidance"], strict=True):
      ident = round(float(gt[0, 0, 2]), 2)
      seen.add(ident)
      assert ident in (0.25, 0.75)  # never the photo without guidance
      np.testing.assert_allclose(g, gt, atol=3e-5)
      if ident == 0.25:  # square guidance: crops inside the centre square
        assert gt[..., 0].min() * W > 16 and gt[..., 0].max() * W < 80
  assert seen == {0.25, 0.75}
  # A flip or transpose shows in the coordinates: some crops are not in the plain orientation.
  assert any(gt[0, 0, 0] > gt[0, -1, 0] or gt[0, 0, 1] > gt[-1, 0, 1] for gt in batch["gt"])
  ev = next(iter(_stream(guided_root, train=False)))
  np.testing.assert_allclose(ev["guidance"], ev["gt"], atol=3e-5)
  assert ev["mask"].tolist() == [True, True, False, False]


def test_bad_guidance_folders_are_one_line_errors(guided_root, tmp_path):
  with pytest.raises(ValueError, match="guidance folder .*nowhere.* does not exist"):
    pipelines.from_config(_cfg(source="paired", root=guided_root, patch_size=P,
                               guidance_root=str(tmp_path / "nowhere")),
                          batch_size=2, seed=0, train=True)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="none of its 3 photo"):
    pipelines.from_config(_cfg(source="paired", root=guided_root, patch_size=P,
                               guidance_root=str(empty)), batch_size=2, seed=0, train=True)

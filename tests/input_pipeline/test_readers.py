"""Tests for input_pipeline.image_io and input_pipeline.readers (files made in tmp_path)."""

from __future__ import annotations

import collections
import logging
import os

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from input_pipeline import image_io, readers  # noqa: E402

# --- Helpers (test_pipelines.py imports these). ---------------------------------------------------


def save(path, array, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kw)
  return path


def random_rgb(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_bad_folder(root, rng):
  """A folder with 3 good RGB images, 2 corrupt files and one of each odd kind.

  Returns {name: path} and the expected scan counts for min_size=32.
  """
  p = {}
  for i in range(3):
    p[f"good{i}"] = save(os.path.join(root, "sub" if i else "", f"good{i}.png"),
                         random_rgb(rng, 40, 48))
  jpg = save(os.path.join(root, "good_jpg.jpg"), random_rgb(rng, 40, 40), quality=95)
  p["jpg"] = jpg
  data = open(jpg, "rb").read()
  p["truncated"] = os.path.join(root, "truncated.jpg")
  open(p["truncated"], "wb").write(data[: len(data) // 2])
  p["garbage"] = os.path.join(root, "garbage.png")
  open(p["garbage"], "wb").write(b"not an image at all")
  p["gray"] = save(os.path.join(root, "gray.png"), rng.integers(0, 256, (36, 40), dtype=np.uint8))
  rgba = np.dstack([random_rgb(rng, 40, 40), rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)])
  p["rgba"] = save(os.path.join(root, "rgba.png"), rgba)
  g16 = rng.integers(0, 65536, (40, 44), dtype=np.uint16)
  p["16bit"] = save(os.path.join(root, "deep.png"), g16)
  p["small"] = save(os.path.join(root, "small.png"), random_rgb(rng, 20, 50))
  open(os.path.join(root, "notes.txt"), "w").write("ignored: not an image extension")
  expected = {"ok": 8, "corrupt": 2, "gray": 2, "rgba": 1, "16bit": 1, "small": 1}
  return p, expected


def make_universal_tree(root, rng, sizes=None, hw=(40, 48)):
  """`root/{train,val}/<deg>/{LQ,GT}/k.png`; GT pixels are constant-coded so pairs are checkable.

  GT of (degradation d, image k) has every red pixel = 10*d + k; its LQ is GT + 1 in red.
  """
  sizes = sizes or {"noisy": 3, "hazy": 1, "snowy": 2}
  for split in ("train", "val"):
    for deg, n in sizes.items():
      d = readers.DEGRADATIONS.index(deg) if deg in readers.DEGRADATIONS else 20
      for k in range(n):
        gt = random_rgb(rng, *hw)
        gt[..., 0] = 10 * d + k
        lq = gt.copy()
        lq[..., 0] += 1
        save(os.path.join(root, split, deg, "GT", f"{k:03d}.png"), gt)
        save(os.path.join(root, split, deg, "LQ", f"{k:03d}.png"), lq)
  return sizes


def _item(source, item):
  return {k: (v.numpy() if hasattr(v, "numpy") else v)
          for k, v in source.load(tf.constant(item, tf.int64)).items()}


# --- image_io. ------------------------------------------------------------------------------------


def test_scan_counts_and_skips_bad_files(tmp_path, rng, caplog):
  paths, expected = make_bad_folder(str(tmp_path), rng)
  listed = image_io.list_images(str(tmp_path))
  assert len(listed) == 10 and all(not p.endswith(".txt") for p in listed)
  assert paths["good1"] in listed  # recursive
  with caplog.at_level(logging.INFO):
    scan = image_io.scan_images(listed, min_size=32, name="planted")
  assert {k: scan.counts[k] for k in expected} == expected
  assert sorted(scan.bad_paths) == sorted([paths["truncated"], paths["garbage"]])
  assert len(scan.good_paths) == 8
  # The summary is logged, naming the skipped files.
  text = caplog.text
  assert "planted" in text and "'corrupt': 2" in text and "truncated.jpg" in text


def test_decode_conversions(tmp_path, rng):
  paths, _ = make_bad_folder(str(tmp_path), rng)
  gray = image_io.read_image_numpy(paths["gray"])
  src = np.asarray(Image.open(paths["gray"]), np.float32) / 255
  assert gray.shape == (36, 40, 3)
  np.testing.assert_allclose(gray, np.repeat(src[..., None], 3, -1), atol=1e-6)

  rgba = image_io.read_image_numpy(paths["rgba"])
  src = np.asarray(Image.open(paths["rgba"]), np.float32)[..., :3] / 255
  np.testing.assert_allclose(rgba, src, atol=1e-6)

  deep = image_io.read_image_numpy(paths["16bit"])
  src = np.asarray(Image.open(paths["16bit"])).astype(np.float64) / 65535
  assert deep.dtype == np.float32 and deep.max() <= 1.0
  np.testing.assert_allclose(deep[..., 1], src, atol=1e-6)  # full 16-bit precision
  assert np.abs(deep[..., 1] - np.round(src * 255) / 255).max() > 1e-4  # not 8-bit

  rgb = image_io.read_image_numpy(paths["good0"])
  np.testing.assert_allclose(rgb, np.asarray(Image.open(paths["good0"]), np.float32) / 255,
                             atol=1e-6)


@pytest.mark.parametrize("fmt", ["bmp", "webp", "gif"])
def test_decode_other_formats(tmp_path, rng, fmt):
  a = random_rgb(rng, 12, 17)
  kw = {"lossless": True} if fmt == "webp" else {}
  path = save(str(tmp_path / f"x.{fmt}"), a, **kw)
  out = image_io.read_image_numpy(path)
  assert out.shape == (12, 17, 3)
  expected = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
  np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("h,w,size", [(5, 7, 9), (3, 2, 11), (1, 4, 6), (8, 8, 8)])
def test_pad_to_min_size_is_reflect_101(h, w, size, rng):
  x = rng.random((h, w, 2)).astype(np.float32)
  out = image_io.pad_to_min_size(tf.constant(x), size).numpy()
  assert out.shape == (max(h, size), max(w, size), 2)

  def ref_index(n, m):  # Mirror back and forth, edge pixels not repeated (cv2 BORDER_REFLECT_101).
    seq = list(range(n)) + list(range(n - 2, 0, -1)) if n > 1 else [0]
    return [seq[i % len(seq)] for i in range(m)]

  expected = x[ref_index(h, max(h, size))][:, ref_index(w, max(w, size))]
  np.testing.assert_array_equal(out, expected)
  if h > 1 and size - h < h:  # Within one period it is numpy's 'reflect'.
    np.testing.assert_array_equal(out[:, :w], np.pad(x, ((0, size - h), (0, 0), (0, 0)), "reflect"))


def test_pad_pair_identically(rng):
  a, b = rng.random((4, 6, 3)), rng.random((4, 6, 3))
  pa, pb = image_io.pad_to_min_size([tf.constant(a), tf.constant(b)], 10)
  assert pa.shape == pb.shape == (10, 10, 3)
  # Same mirror geometry for both: padding a - b gives pa - pb.
  np.testing.assert_allclose(image_io.pad_to_min_size(tf.constant(a - b), 10).numpy(),
                             pa.numpy() - pb.numpy(), atol=1e-12)
  np.testing.assert_array_equal(pa.numpy()[:4, :6], a)
  np.testing.assert_array_equal(pb.numpy()[5, 7], b[1, 3])  # rows 0123210..., cols 012345432...


# --- Samplers. ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_epoch_sampler_visits_each_item_once_per_epoch(n):
  sample = readers.epoch_sampler(n)
  seed = tf.constant([5, 9])
  items = [int(sample(tf.constant(i, tf.int64), seed)) for i in range(3 * n)]
  for e in range(3):
    assert sorted(items[e * n:(e + 1) * n]) == list(range(n))
  if n >= 7:
    assert items[:n] != items[n:2 * n]  # a fresh order each epoch
    other = [int(sample(tf.constant(i, tf.int64), tf.constant([6, 9]))) for i in range(n)]
    assert other != items[:n]
    assert items[:n] != list(range(n))


def test_balanced_sampler_balances_classes():
  sizes = [1, 0, 6, 20]
  sample = readers.balanced_sampler(sizes)
  offsets = np.cumsum([0] + sizes)
  items = np.array([int(sample(tf.constant(i), tf.constant([3, i]))) for i in range(1500)])
  cls = np.searchsorted(offsets, items, side="right") - 1
  freq = np.bincount(cls, minlength=4) / len(items)
  assert freq[1] == 0
  np.testing.assert_allclose(freq[[0, 2, 3]], 1 / 3, atol=0.05)
  assert len(set(items[cls == 3])) > 15  # Items within a class are all reached.


def test_interleave_classes():
  np.testing.assert_array_equal(readers.interleave_classes([2, 0, 3, 1]), [0, 2, 5, 1, 3, 4])


# --- (a) Ten-task layout. -------------------------------------------------------------------------


def test_universal_pairs_and_labels(tmp_path, rng):
  sizes = make_universal_tree(str(tmp_path), rng)
  pairs = readers.list_universal_pairs(str(tmp_path / "train"))
  assert list(pairs) == sorted(sizes)
  assert {d: len(v) for d, v in pairs.items()} == sizes
  source = readers.universal_source(str(tmp_path), "train", min_size=32)
  assert source.num_items == 6 and source.paired
  seen = collections.Counter()
  for item in range(source.num_items):
    ex = _item(source, item)
    d = int(ex["label"])
    assert readers.DEGRADATIONS[d] == ex["degradation"].decode()
    code = int(round(ex["gt"][0, 0, 0] * 255))
    assert code // 10 == d and code % 10 < sizes[ex["degradation"].decode()]
    np.testing.assert_allclose(ex["lq"][..., 0] - ex["gt"][..., 0], 1 / 255, atol=1e-6)
    np.testing.assert_array_equal(ex["lq"][..., 1:], ex["gt"][..., 1:])
    seen[code] += 1
  assert len(seen) == 6  # every pair once
  # Evaluation interleaves the classes: hazy, noisy, snowy, noisy, snowy, noisy.
  degs = [_item(source, i)["degradation"].decode() for i in source.eval_items]
  assert degs == ["hazy", "noisy", "snowy", "noisy", "snowy", "noisy"]
  val = readers.universal_source(str(tmp_path), "val")
  assert val.num_items == 6


def test_universal_name_mismatch_error(tmp_path, rng):
  make_universal_tree(str(tmp_path), rng)
  folder = tmp_path / "train" / "noisy"
  os.rename(folder / "GT" / "001.png", folder / "GT" / "001b.png")
  with pytest.raises(ValueError, match=r"noisy.*LQ/001\.png vs GT/001b\.png"):
    readers.list_universal_pairs(str(tmp_path / "train"))
  # Pairing by order only (the reference's behaviour) accepts it.
  pairs = readers.list_universal_pairs(str(tmp_path / "train"), match_names=False)
  assert pairs["noisy"][1][1].endswith("001b.png")
  os.remove(folder / "GT" / "002.png")
  with pytest.raises(ValueError, match=r"noisy: 3 LQ images but 2 GT"):
    readers.list_universal_pairs(str(tmp_path / "train"), match_names=False)


def test_universal_skips_bad_pairs(tmp_path, rng, caplog):
  make_universal_tree(str(tmp_path), rng)
  folder = tmp_path / "train" / "noisy"
  open(folder / "GT" / "000.png", "wb").write(b"\x89PNG broken")
  save(str(folder / "LQ" / "001.png"), random_rgb(rng, 30, 30))  # LQ size != GT size
  with caplog.at_level(logging.INFO):
    source = readers.universal_source(str(tmp_path), "train")
  assert source.num_items == 4
  assert source.counts["corrupt"] == 1 and source.counts["size_mismatch"] == 1
  assert source.counts["pairs"] == 4
  assert "size_mismatch" in caplog.text


# --- (b) CSV. -------------------------------------------------------------------------------------


def test_csv_caption_with_colon(tmp_path, rng):
  make_universal_tree(str(tmp_path), rng)
  lines = ["filepath\ttitle",
           "train/noisy/LQ/000.png\ta sign that reads: stop here: noisy",
           f"{tmp_path}/train/hazy/LQ/000.png\ta foggy street at dawn: hazy",
           "train/snowy/LQ/000.png\tno degradation part",
           "train/snowy/LQ/999.png\tmissing file: snowy"]
  csv_path = tmp_path / "daclip_train.csv"
  csv_path.write_text("\n".join(lines) + "\n")
  rows, counts = readers.read_caption_csv(str(csv_path))
  assert [r["caption"] for r in rows] == ["a sign that reads: stop here", "a foggy street at dawn"]
  assert [r["degradation"] for r in rows] == ["noisy", "hazy"]
  assert counts["bad_title"] == 1 and counts["missing"] == 1 and counts["no_gt"] == 0
  assert rows[0]["gt"] == os.path.join(str(tmp_path), "train", "noisy", "GT", "000.png")

  source = readers.csv_source(str(csv_path))
  ex = _item(source, 0)
  assert ex["caption"].decode() == "a sign that reads: stop here"
  assert int(ex["label"]) == readers.DEGRADATIONS.index("noisy")
  np.testing.assert_allclose(ex["lq"][..., 0] - ex["gt"][..., 0], 1 / 255, atol=1e-6)


def test_csv_bad_header(tmp_path):
  p = tmp_path / "x.csv"
  p.write_text("path,caption\na.png,b\n")
  with pytest.raises(ValueError, match="missing column"):
    readers.read_caption_csv(str(p))


# --- (c) folder, (e) quickstart. ------------------------------------------------------------------


def test_folder_source_skips_corrupt(tmp_path, rng):
  make_bad_folder(str(tmp_path), rng)
  source = readers.folder_source(str(tmp_path), min_size=32)
  assert source.num_items == 8 and not source.paired
  assert source.counts["corrupt"] == 2 and source.counts["small"] == 1
  for item in range(source.num_items):
    ex = _item(source, item)
    assert ex["gt"].ndim == 3 and ex["gt"].shape[-1] == 3
    assert 0.0 <= ex["gt"].min() and ex["gt"].max() <= 1.0


def test_quickstart_entries_offline():
  entries = readers.quickstart_entries()
  assert len(entries) >= 8
  assert all(os.path.isfile(e["path"]) and len(e["caption"].split()) >= 5 for e in entries)
  assert len({e["caption"] for e in entries}) == len(entries)
  import skimage.data

  np.testing.assert_array_equal(
      np.round(image_io.read_image_numpy(entries[0]["path"]) * 255).astype(np.uint8),
      getattr(skimage.data, entries[0]["name"])())


def test_source_from_config_errors():
  import ml_collections

  cfg = ml_collections.ConfigDict({"source": "folder", "patch_size": 32})
  with pytest.raises(ValueError, match="needs config key 'root'"):
    readers.source_from_config(cfg, train=True)
  cfg.source = "nope"
  with pytest.raises(ValueError, match="unknown data source"):
    readers.source_from_config(cfg, train=True)


# --- (d) TFDS builder. ----------------------------------------------------------------------------


def test_tfds_builder_from_manual_dir(tmp_path, rng):
  tfds = pytest.importorskip("tensorflow_datasets")
  from input_pipeline import tfds_universal

  root = tmp_path / "manual"
  sizes = make_universal_tree(str(root), rng, hw=(12, 10))
  open(root / "val" / "snowy" / "GT" / "001.png", "wb").write(b"truncated")  # skipped pair
  builder = tfds_universal.UniversalIr(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  info = builder.info
  assert info.features["degradation"].names == list(readers.DEGRADATIONS)
  assert info.splits["train"].num_examples == sum(sizes.values())
  assert info.splits["validation"].num_examples == sum(sizes.values()) - 1
  seen = set()
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    deg = readers.DEGRADATIONS[ex["degradation"]]
    name = ex["filename"].decode()
    gt = np.asarray(Image.open(root / "train" / deg / "GT" / name))
    lq = np.asarray(Image.open(root / "train" / deg / "LQ" / name))
    np.testing.assert_array_equal(ex["gt"], gt)
    np.testing.assert_array_equal(ex["lq"], lq)
    seen.add((deg, name))
  assert len(seen) == sum(sizes.values())


def test_tfds_builder_rejects_unknown_folder(tmp_path, rng):
  tfds = pytest.importorskip("tensorflow_datasets")
  from input_pipeline import tfds_universal

  root = tmp_path / "manual"
  make_universal_tree(str(root), rng, sizes={"noisy": 1, "blurry-ish": 1}, hw=(8, 8))
  builder = tfds_universal.UniversalIr(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="blurry-ish"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)))

"""Paired evaluation (`uir_jax.evaluate`, `uir-jax eval`) and the shared LQ/GT file layout."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from uir_jax import data_layout
from uir_jax.evaluate import evaluate, format_table
from uir_jax.photos import read_rgb


def _write_set(root, name, sizes, seed):
  rng = np.random.default_rng(seed)
  for sub in ("LQ", "GT"):
    os.makedirs(root / name / sub, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    gt = rng.integers(0, 256, (h, w, 3), np.uint8)
    lq = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    Image.fromarray(gt).save(root / name / "GT" / f"{i:03d}.png")
    Image.fromarray(lq).save(root / name / "LQ" / f"{i:03d}.png")


@pytest.fixture
def test_set(tmp_path):
  root = tmp_path / "val"
  _write_set(root, "noisy", [(40, 48), (36, 36)], 0)
  _write_set(root, "hazy", [(44, 40)], 1)
  (root / "hazy" / "LQ" / "001.png").write_bytes(b"not a png")  # unreadable
  Image.new("RGB", (10, 10)).save(root / "hazy" / "GT" / "001.png")
  Image.new("RGB", (30, 30)).save(root / "hazy" / "LQ" / "002.png")  # sizes differ
  Image.new("RGB", (31, 30)).save(root / "hazy" / "GT" / "002.png")
  return root


def _psnr_u8(a, b, border):
  a, b = (np.asarray(x, np.float64)[border:-border, border:-border] for x in (a, b))
  return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))


def test_evaluate_scores_like_the_reference_protocol(test_set, tmp_path):
  pairs = data_layout.list_pairs(str(test_set))
  assert list(pairs) == ["hazy", "noisy"] and len(pairs["hazy"]) == 3
  identity = lambda lq, key: lq  # "restores" nothing: the scores are those of the inputs
  out_dir = tmp_path / "out"
  report = evaluate(identity, pairs, key=jax.random.key(0), output_dir=str(out_dir),
                    log=lambda s: None)
  assert [r["set"] for r in report["per_image"]] == ["hazy", "noisy", "noisy"]
  assert len(report["skipped"]) == 2 and "sizes differ" in report["skipped"][1]["reason"]
  for row in report["per_image"]:
    lq = np.asarray(Image.open(row["lq"]))
    gt = np.asarray(Image.open(row["gt"]))
    np.testing.assert_allclose(row["psnr"], _psnr_u8(lq, gt, 4), atol=1e-3)
    ref_ssim = structural_similarity(
        lq[4:-4, 4:-4].astype(np.float64), gt[4:-4, 4:-4].astype(np.float64),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
        channel_axis=-1)
    np.testing.assert_allclose(row["ssim"], ref_ssim, atol=1e-5)
    assert row["psnr_input"] < row["psnr"] + 1.0  # whole image vs cropped: close, not equal
  noisy = [r for r in report["per_image"] if r["set"] == "noisy"]
  assert report["per_set"]["noisy"]["count"] == 2
  np.testing.assert_allclose(report["per_set"]["noisy"]["psnr"],
                             np.mean([r["psnr"] for r in noisy]))
  np.testing.assert_allclose(report["mean"]["psnr"], np.mean(
      [report["per_set"][n]["psnr"] for n in ("hazy", "noisy")]))  # sets weigh the same
  saved = json.load(open(out_dir / "results.json"))
  assert saved["mean"] == report["mean"]
  restored = np.asarray(Image.open(out_dir / "noisy" / "000.png"))
  np.testing.assert_array_equal(restored, np.asarray(Image.open(test_set / "noisy/LQ/000.png")))
  table = format_table(report)
  assert "mean over sets" in table and "skipped 2 pair(s)" in table


def test_list_pairs_layouts_and_errors(tmp_path):
  _write_set(tmp_path / "single", ".", [(20, 20)], 0)
  assert list(data_layout.list_pairs(str(tmp_path / "single"))) == ["single"]
  os.remove(tmp_path / "single" / "GT" / "000.png")
  Image.new("RGB", (20, 20)).save(tmp_path / "single" / "GT" / "other.png")
  with pytest.raises(ValueError, match="do not match"):
    data_layout.list_pairs(str(tmp_path / "single"))
  with pytest.raises(FileNotFoundError):
    data_layout.list_pairs(str(tmp_path / "nope"))
  os.makedirs(tmp_path / "bad" / "noisy" / "LQ")
  with pytest.raises(ValueError, match="LQ/ and GT/"):
    data_layout.list_pairs(str(tmp_path / "bad"))


def test_read_rgb_converts_gray_rgba_and_16_bit(tmp_path):
  Image.fromarray(np.full((4, 5), 128, np.uint8)).save(tmp_path / "g.png")
  Image.fromarray(np.full((4, 5, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
  Image.fromarray(np.full((4, 5), 65535 // 2, np.uint16)).save(tmp_path / "w.png")
  for name, value in (("g.png", 128 / 255), ("a.png", 200 / 255), ("w.png", 32767 / 65535)):
    img = read_rgb(str(tmp_path / name))
    assert img.shape == (4, 5, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, value, atol=1e-6)


@pytest.mark.slow  # a uir-jax eval process that restores
@pytest.mark.torch
def test_eval_command_end_to_end(test_set, tmp_path):
  from tests.cli.test_cli import _save_tiny_torch_unet

  unet = _save_tiny_torch_unet(tmp_path / "unet.pth")
  out_dir = tmp_path / "eval"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "uir_jax.main", "eval", f"--unet={unet}", f"--data={test_set}",
       f"--output_dir={out_dir}", "--num_steps=2", "--limit=1"],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mean over sets" in proc.stdout
  report = json.load(open(out_dir / "results.json"))
  assert {n: r["count"] for n, r in report["per_set"].items()} == {"hazy": 1, "noisy": 1}
  assert all(np.isfinite(report["mean"][k]) for k in ("psnr", "ssim", "psnr_y", "ssim_y"))
  assert (out_dir / "noisy" / "000.png").is_file()

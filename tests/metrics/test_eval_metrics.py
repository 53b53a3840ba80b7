"""`uir-jax eval`'s tables (results.md / results.csv), the score-only mode (`--restored`), the
new metric plumbing (DISTS, FID, NIQE) and its one-line errors on bad input."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from uir_jax import data_layout
from uir_jax.evaluate import (
    evaluate,
    find_restored,
    format_csv,
    format_markdown,
    score_restored,
    write_report,
)

ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _write_set(root, name, sizes, seed):
  rng = np.random.default_rng(seed)
  for sub in ("LQ", "GT"):
    os.makedirs(root / name / sub, exist_ok=True)
  for i, (h, w) in enumerate(sizes):
    # A smooth photo-like GT (NIQE's fits need structure, not white noise) and a noisy LQ.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    gt = np.stack([np.sin(7 * xx + i), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1) * 100 + 128
    gt = np.clip(gt + rng.normal(0, 4, gt.shape), 0, 255).astype(np.uint8)
    lq = np.clip(gt.astype(int) + rng.integers(-25, 26, gt.shape), 0, 255).astype(np.uint8)
    Image.fromarray(gt).save(root / name / "GT" / f"{i:03d}.png")
    Image.fromarray(lq).save(root / name / "LQ" / f"{i:03d}.png")


@pytest.fixture
def test_set(tmp_path):
  root = tmp_path / "val"
  _write_set(root, "noisy", [(40, 48), (40, 48)], 0)  # one size per set: fewer compilations
  _write_set(root, "hazy", [(200, 210), (200, 210)], 1)  # big enough for NIQE
  return root


def _restored_copy(test_set, dest, blur=False):
  """A "method" whose results are the LQ images (or a blur of them), saved as <set>/<name>.png."""
  from scipy import ndimage

  for name in ("noisy", "hazy"):
    os.makedirs(dest / name, exist_ok=True)
    for path in sorted((test_set / name / "LQ").iterdir()):
      img = np.asarray(Image.open(path))
      if blur:
        img = ndimage.uniform_filter(img, (3, 3, 1))
      Image.fromarray(img).save(dest / name / path.name)
  return dest


def _psnr_u8(a, b, border):
  a, b = (np.asarray(x, np.float64)[border:-border, border:-border] for x in (a, b))
  return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))


def _fake_fid(images):
  """Stand-in Inception: 8 fixed random projections of a 4x4 average (same for every size)."""
  x = np.asarray(images, np.float64)
  h, w = x.shape[1] // 4 * 4, x.shape[2] // 4 * 4
  pooled = x[:, :h, :w].reshape(len(x), 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(len(x), -1)
  return pooled @ np.random.default_rng(0).normal(size=(48, 8))


def test_score_restored_matches_evaluate_and_writes_tables(test_set, tmp_path):
  from uir_jax.metrics.fid import fid_from_features
  from uir_jax.metrics.niqe import NIQE

  pairs = data_layout.list_pairs(str(test_set))
  niqe = NIQE()
  dists = lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).mean(axis=(1, 2, 3))  # stand-in
  metrics = dict(dists=dists, fid=_fake_fid, niqe=niqe)
  # 1. Restore with the identity "model": the outputs are the LQ images.
  out = tmp_path / "eval"
  restored = evaluate(lambda lq, key: lq, pairs, key=jax.random.key(0), output_dir=str(out),
                      log=lambda s: None, **metrics)
  # 2. Score those PNGs again without restoring: the same numbers.
  scored = score_restored(str(out), pairs, log=lambda s: None, **metrics)
  assert not scored["skipped"] and len(scored["per_image"]) == 4
  for a, b in zip(restored["per_image"], scored["per_image"], strict=True):
    assert b["restored"].endswith(os.path.basename(a["lq"]))
    for k in ("psnr", "ssim", "psnr_y", "ssim_y", "dists"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6)
  assert scored["mean"] == pytest.approx(restored["mean"])
  for row in scored["per_image"]:
    lq, gt = np.asarray(Image.open(row["lq"])), np.asarray(Image.open(row["gt"]))
    np.testing.assert_allclose(row["psnr"], _psnr_u8(lq, gt, 4), atol=1e-3)
  # NIQE only where the images are large enough; FID per set from its images' features.
  assert [r["niqe"] is None for r in scored["per_image"]] == [False, False, True, True]
  np.testing.assert_allclose(scored["per_image"][0]["niqe"], niqe(
      np.asarray(Image.open(scored["per_image"][0]["lq"]), np.float32)[None] / 255.0)[0])
  hazy = [r for r in scored["per_image"] if r["set"] == "hazy"]
  feats = [np.concatenate([_fake_fid(np.asarray(Image.open(r[k]), np.float32)[None] / 255.0)
                           for r in hazy]) for k in ("lq", "gt")]
  np.testing.assert_allclose(scored["per_set"]["hazy"]["fid"], fid_from_features(*feats))
  assert scored["per_set"]["noisy"]["niqe"] is None
  np.testing.assert_allclose(scored["mean"]["niqe"], scored["per_set"]["hazy"]["niqe"])

  # The tables: one row per degradation and the mean, every metric with its arrow.
  paths = write_report(scored, str(tmp_path / "tables"))
  md = open(paths["md"], encoding="utf-8").read().splitlines()
  assert md[0] == ("| set | n | PSNR ↑ | SSIM ↑ | PSNR-Y ↑ | SSIM-Y ↑ | DISTS ↓ | FID ↓ | NIQE ↓ "
                   "| input PSNR ↑ |")
  assert [line.split("|")[1].strip() for line in md[2:]] == ["hazy", "noisy",
                                                             "**mean over sets**"]
  assert md[3].split("|")[9].strip() == "–"  # noisy: images too small for NIQE
  assert f"{scored['per_set']['hazy']['psnr']:.2f}" == md[2].split("|")[3].strip()
  with open(paths["csv"], encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["set"] for r in rows] == ["hazy", "noisy", "mean over sets"]
  assert float(rows[0]["FID ↓"]) == scored["per_set"]["hazy"]["fid"]  # full precision
  assert rows[1]["NIQE ↓"] == "" and int(rows[2]["count"]) == 4
  assert json.load(open(paths["json"]))["mean"] == pytest.approx(scored["mean"])
  assert format_markdown(scored) == open(paths["md"], encoding="utf-8").read()
  assert format_csv(scored) == open(paths["csv"], encoding="utf-8").read()


def test_score_restored_skips_missing_and_mismatched_images(test_set, tmp_path):
  pairs = data_layout.list_pairs(str(test_set))
  restored = _restored_copy(test_set, tmp_path / "other_method", blur=True)
  os.remove(restored / "noisy" / "001.png")
  Image.new("RGB", (10, 10)).save(restored / "hazy" / "001.png")  # wrong size
  report = score_restored(str(restored), pairs, log=lambda s: None)
  reasons = [s["reason"] for s in report["skipped"]]
  assert len(reasons) == 2 and "sizes differ" in reasons[0] and "no restored image" in reasons[1]
  assert {n: r["count"] for n, r in report["per_set"].items()} == {"hazy": 1, "noisy": 1}
  # A one-set layout (<data>/{LQ,GT}) finds the restored images directly in the folder.
  flat = tmp_path / "flat"
  shutil.copytree(restored / "hazy", flat)
  one = data_layout.list_pairs(str(test_set / "hazy"))
  assert list(find_restored(str(flat), one)) == ["hazy"]
  assert score_restored(str(flat), one, log=lambda s: None)["per_set"]["hazy"]["count"] == 1
  with pytest.raises(ValueError, match="no images"):
    os.makedirs(tmp_path / "empty")
    find_restored(str(tmp_path / "empty"), pairs)
  with pytest.raises(FileNotFoundError):
    find_restored(str(tmp_path / "nope"), pairs)


def _eval_cli(*args):
  return subprocess.run([sys.executable, "-m", "uir_jax.main", "eval", *args],
                        capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.slow  # a uir-jax process
def test_eval_command_scores_a_folder(test_set, tmp_path):
  restored = _restored_copy(test_set, tmp_path / "method")
  out = tmp_path / "out"
  proc = _eval_cli(f"--restored={restored}", f"--data={test_set}", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mean over sets" in proc.stdout and "results.md" in proc.stdout
  md = (out / "results.md").read_text(encoding="utf-8")
  assert "| set | n | PSNR ↑ | SSIM ↑ |" in md and "| hazy | 2 |" in md
  report = json.load(open(out / "results.json"))
  # The "method" returned the inputs: its scores are the inputs' (whole image vs 4-px border).
  for row in report["per_image"]:
    assert abs(row["psnr"] - row["psnr_input"]) < 1.0
  assert (out / "results.csv").read_text(encoding="utf-8").startswith("set,count,PSNR ↑")


@pytest.mark.slow  # six uir-jax processes
def test_eval_command_bad_input_gives_one_line(test_set, tmp_path):
  os.makedirs(tmp_path / "empty")
  (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
  np.savez(tmp_path / "niqe.npz", mu=np.zeros(3))
  cases = [
      ([f"--restored={tmp_path / 'empty'}", f"--data={test_set}"], "no images"),
      ([f"--restored={tmp_path / 'method'}", f"--data={tmp_path / 'nope'}"], "is not a directory"),
      ([f"--restored={tmp_path / 'empty'}", f"--data={test_set}", "--fid=missing.pth"],
       "file(s) not found: missing.pth"),
      ([f"--restored={tmp_path / 'empty'}", f"--data={test_set}",
        f"--dists={tmp_path / 'garbage.pth'}"], "cannot load --dists"),
      ([f"--restored={tmp_path / 'empty'}", f"--data={test_set}",
        f"--niqe_params={tmp_path / 'niqe.npz'}"], "no ['cov'] in the NIQE parameter file"),
      ([f"--data={test_set}"], "needs --unet"),
  ]
  for args, message in cases:
    proc = _eval_cli(*args)
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
    assert lines[0].startswith("uir-jax eval: ")

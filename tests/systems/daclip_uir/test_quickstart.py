"""The quickstart (README command 1) end to end on its :tiny variant: both stages, the report's
structure, its figures recomputed from its own image grids, and resuming without redoing a
finished stage. The first run is the training notebook (`colabs/train_quickstart.ipynb`, executed
headlessly), which trains through the CLI. Its quality figures are measured by the full run
(README, benchmarks/RESULTS.md), not asserted here."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import common, quickstart
from uir_jax.metrics.image import psnr, ssim
from uir_jax.systems.daclip_uir import quickstart as qs

NAMES = [name for name, _ in common.SYNTHETIC_TASKS]
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, os.pardir)


def _run_notebook(name, cwd, env):
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(os.path.join(REPO, "colabs", name), as_version=4)
  os.environ.update(env)
  try:
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
  finally:
    for k in env:
      os.environ.pop(k)
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))


@pytest.mark.slow
def assert_report_matches_its_grids(config, workdir, monkeypatch):
  """The report's PSNR / SSIM columns (the README's headline figures) are those of its own
  images: each type's LQ | restored | GT grid, every crop in it (`grid_rows` raised), 8-bit, gives
  the same means within the 8-bit rounding. The tiny run's restorer is still ~ the identity
  (LQ and restored columns nearly equal), so the check is repeated with its parameters moved by
  noise, where a restored figure computed on the wrong images is off by decibels."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.report.grid_rows = config.report.num_crops
  trained = json.load(open(os.path.join(workdir, "report.json")))["per_type"]
  load = qs.load_restorer

  def noisy_restorer(path):
    net = load(path)
    params = nnx.state(net, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    nnx.update(net, jax.tree.unflatten(tree, [
        x + 0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
        for i, x in enumerate(leaves)]))
    return net

  p = config.report.patch_size
  for moved in (False, True):
    if moved:
      monkeypatch.setattr(qs, "load_restorer", noisy_restorer)
    report = qs.report(config, workdir)
    gaps = []
    for name, row in report["per_type"].items():
      if not moved:  # the same computation as the run's own report
        assert row == pytest.approx(trained[name], rel=1e-6), name
      grid = np.asarray(Image.open(os.path.join(workdir, f"grid_{name}.png")), np.float32) / 255
      assert grid.shape[0] == row["crops"] * p
      crops = grid.reshape(row["crops"], p, 3, p, 3).transpose(2, 0, 1, 3, 4)  # lq, restored, gt
      lq, restored, gt = crops
      for key, got in (("psnr_lq", psnr(lq, gt)), ("psnr_restored", psnr(restored, gt))):
        # 8-bit rounding of both images moves a crop's PSNR by < 0.05 dB at these levels.
        assert float(np.mean(got)) == pytest.approx(row[key], abs=0.05), (name, key)
      for key, got in (("ssim_lq", ssim(lq, gt)), ("ssim_restored", ssim(restored, gt))):
        assert float(np.mean(got)) == pytest.approx(row[key], abs=2e-3), (name, key)
      gaps.append(abs(row["psnr_restored"] - row["psnr_lq"]))
    if moved:
      assert min(gaps) > 0.5, gaps  # LQ and restored columns far apart: the check can tell


def test_quickstart_tiny_runs_both_stages_reports_and_resumes(tmp_path, capsys, one_device,
                                                                 monkeypatch):
  workdir = str(tmp_path / "q")
  # The notebook's run, as if interrupted after stage 2's first checkpoint.
  text = _run_notebook("train_quickstart.ipynb", tmp_path, {
      "UIR_JAX_REPO": REPO, "UIR_JAX_CONFIG": "configs/quickstart.py:tiny",
      "UIR_JAX_WORKDIR": workdir, "UIR_JAX_OVERRIDES": "--config.stage2.total_steps=1",
      "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  first = json.load(open(os.path.join(workdir, "report.json")))
  assert first["steps"] == {"daclip": 2, "restorer": 1}
  # The notebook showed the report: its summary line and every type's grid.
  mean = first["mean_over_types"]
  assert f"mean PSNR {mean['psnr_lq']:.2f} -> {mean['psnr_restored']:.2f} dB" in text
  assert first["per_type"] and all(f"\n{name}\n" in "\n" + text for name in first["per_type"])

  config = quickstart.get_config("tiny")  # the same command again
  result = qs.train_and_evaluate(config, workdir)
  daclip_run, restorer_run = result["stages"]["daclip"], result["stages"]["restorer"]
  # Stage 1 was finished: restored, not trained again (no step ran, so no evaluation either).
  assert daclip_run["step"] == 2 and "eval/degradation_accuracy" not in daclip_run
  # Stage 2 resumed from its checkpoint at step 1 and ran step 2 only.
  assert restorer_run["step"] == 2 and "eval/psnr_restored" in restorer_run
  out = capsys.readouterr().out
  assert "resumed from step 1" in out and "resumed from step 2" in out
  # The notebook started stage 2 with total_steps=1: the resume names that change, and only it.
  warnings = [line for line in out.splitlines() if "warning: resuming" in line]
  assert len(warnings) == 1 and warnings[0].startswith("[nafnet] "), warnings
  assert warnings[0].endswith("started with: total_steps: 1 -> 2"), warnings

  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["types"] == NAMES and report["chance"] == pytest.approx(1 / len(NAMES))
  assert report["crops"] + report["flat_crops_left_out"] == config.report.num_crops
  confusion = np.asarray(report["confusion"])
  assert confusion.shape == (len(NAMES), len(NAMES)) and confusion.sum() == report["crops"]
  assert sum(row["crops"] for row in report["per_type"].values()) == report["crops"]
  for name, row in report["per_type"].items():
    assert name in NAMES
    assert set(row) == {"crops", "psnr_lq", "psnr_restored", "ssim_lq", "ssim_restored",
                        "degradation_accuracy"}
    assert all(np.isfinite(v) for v in row.values())
    grid = np.asarray(Image.open(os.path.join(workdir, f"grid_{name}.png")))
    p = config.report.patch_size
    assert grid.shape[1] == 3 * p and grid.shape[0] % p == 0  # rows of LQ | restored | GT
  assert os.path.isfile(os.path.join(workdir, "degradation_confusion.png"))
  md = open(os.path.join(workdir, "report.md")).read()
  assert "| **mean** |" in md and "random" in md  # the table and what a random CLIP means
  assert qs.format_table(report) in out  # the same table on the console
  assert_report_matches_its_grids(config, workdir, monkeypatch)
  _restore_a_photo_with_the_run(workdir, tmp_path, capsys)


def _restore_a_photo_with_the_run(workdir, tmp_path, capsys):
  """The user story after training: `uir-jax restore --run WQ` on a photo of one's own (one the
  quickstart held out) writes it and prints DA-CLIP's degradation; `uir-jax export --workdir
  WQ/2_restorer` + `uir-jax restore --model` write the same image to 8-bit rounding."""
  from skimage import data

  from tests.export.test_export_model import _cli

  photo = tmp_path / "photo.jpg"
  Image.fromarray(data.chelsea()[::4, ::4]).save(photo)  # 75 x 113
  out, exported, out2 = tmp_path / "out", tmp_path / "e", tmp_path / "out2"
  assert _cli("restore", f"--run={workdir}", f"--output_dir={out}", str(photo)) in (None, 0)
  printed = capsys.readouterr().out
  restored = np.asarray(Image.open(out / "photo.png"))
  assert restored.shape == np.asarray(Image.open(photo)).shape
  sidecar = json.load(open(out / "photo.json"))
  assert sidecar["degradation"] in NAMES and set(sidecar["probabilities"]) == set(NAMES)
  assert f"degradation: {sidecar['degradation']} (" in printed
  assert _cli("export", f"--workdir={os.path.join(workdir, '2_restorer')}", f"--out={exported}",
              "--platforms=cpu") in (None, 0)
  assert _cli("restore", f"--model={exported}", f"--output_dir={out2}", str(photo)) in (None, 0)
  again = np.asarray(Image.open(out2 / "photo.png"))
  assert np.abs(again.astype(int) - restored.astype(int)).max() <= 1
  assert json.load(open(out2 / "photo.json"))["degradation"] == sidecar["degradation"]

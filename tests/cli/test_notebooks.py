"""The Colab notebooks run headlessly (nbclient, a real IPython kernel) on tiny random checkpoints,
so a notebook that the package's changes break fails the suite."""

import os

import numpy as np
import pytest
from export_fixtures import save_daclip, save_photo, save_torch_unet
from PIL import Image

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
# A notebook in a fresh IPython kernel: imports, conversion and a restoration.
pytestmark = pytest.mark.slow

NOTEBOOKS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "colabs")


def _run(name, tmp_path):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails
  return nb


def _text(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))


@pytest.mark.torch
def test_restore_your_photo(tmp_path, monkeypatch):
  from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS

  photo = save_photo(tmp_path / "photo.png", 14, 18, mode="RGBA")  # converted to RGB
  save_daclip(tmp_path / "daclip.safetensors")
  monkeypatch.setenv("UIR_JAX_DACLIP", str(tmp_path / "daclip.safetensors"))
  monkeypatch.setenv("UIR_JAX_UNET", str(save_torch_unet(tmp_path / "unet.safetensors",
                                                         conditioned=True, safetensors=True)))
  monkeypatch.setenv("UIR_JAX_PHOTO", str(photo))
  monkeypatch.setenv("UIR_JAX_STEPS", "2")
  monkeypatch.setenv("UIR_JAX_TILE", "0")
  monkeypatch.setenv("UIR_JAX_OUTPUT", str(tmp_path / "before_after.png"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = _run("restore_your_photo.ipynb", tmp_path)
  text = _text(nb)
  out = Image.open(tmp_path / "before_after.png")
  assert out.size == (2 * 18, 14) and out.mode == "RGB"
  before = np.asarray(out)[:, :18]
  np.testing.assert_array_equal(before, np.asarray(Image.open(photo).convert("RGB")))
  # The zero-shot readout lists every degradation word with a probability; they sum to 1.
  rows = [line.split() for line in text.splitlines() if line.split()[:1] and
          line.split()[0] in DEGRADATION_WORDS]
  assert sorted(r[0] for r in rows) == sorted(DEGRADATION_WORDS)
  assert abs(sum(float(r[1]) for r in rows) - 1.0) < 0.01

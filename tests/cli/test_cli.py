"""`uir-jax restore` end to end in a subprocess: a PyTorch U-Net file, good and bad images."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

# Each test runs uir-jax in several processes (JAX start-up and compilation in each).
pytestmark = pytest.mark.slow


def _save_tiny_torch_unet(path):
  """A random unconditional U-Net state_dict written by PyTorch (our spec-built reference)."""
  torch = pytest.importorskip("torch")
  torch_unet = pytest.importorskip("torch_unet")
  model = torch_unet.ConditionalUNet(nf=16, ch_mult=(1, 2), context_dim=0,
                                     use_degra_context=False, use_image_context=False)
  torch.save(torch_unet.randomize_(model).state_dict(), path)
  return path


@pytest.mark.torch
def test_restore_command_writes_images_and_counts_bad_files(tmp_path):
  unet_path = _save_tiny_torch_unet(tmp_path / "unet.pth")
  rng = np.random.default_rng(0)
  good = []
  for name, size in (("a.png", (21, 30)), ("b.jpg", (16, 16))):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    good.append(str(tmp_path / name))
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  out_dir = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "uir_jax.main", "restore", f"--unet={unet_path}",
       f"--output_dir={out_dir}", "--num_steps=2", "--tile=16", "--tile_overlap=4", *good,
       str(bad)],  # a.png (21 x 30) runs on tiles, b.jpg (16 x 16) fits in one
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode != 0  # one file could not be read ...
  assert "1 of 3 image(s) could not be read" in proc.stderr
  for path in good:  # ... and the others were restored anyway, at their own size
    out = Image.open(out_dir / (os.path.splitext(os.path.basename(path))[0] + ".png"))
    assert out.size == Image.open(path).size and out.mode == "RGB"
  missing = subprocess.run(
      [sys.executable, "-m", "uir_jax.main", "restore", f"--unet={tmp_path / 'nope.pth'}",
       good[0]], capture_output=True, text=True, env=env, timeout=600)
  assert missing.returncode != 0 and "not found" in missing.stderr
  overlap = subprocess.run(
      [sys.executable, "-m", "uir_jax.main", "restore", f"--unet={unet_path}", "--tile=8",
       "--tile_overlap=8", good[0]], capture_output=True, text=True, env=env, timeout=600)
  assert overlap.returncode != 0 and "must be smaller than --tile" in overlap.stderr


@pytest.mark.torch
def test_convert_then_restore_without_torch(tmp_path):
  pth = _save_tiny_torch_unet(tmp_path / "unet.pth")
  st = tmp_path / "unet.safetensors"
  photo = tmp_path / "p.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), np.uint8)).save(photo)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  conv = subprocess.run([sys.executable, "-m", "uir_jax.main", "convert", str(pth), str(st)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert conv.returncode == 0, conv.stderr[-2000:]
  assert "denoiser" in conv.stdout and st.is_file()
  # The converted file restores in a process where importing torch fails.
  no_torch = "import sys; sys.modules['torch'] = None; from uir_jax.main import run; run(sys.argv)"
  out_dir = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-c", no_torch, "restore", f"--unet={st}", f"--output_dir={out_dir}",
       "--num_steps=2", "--pad_multiple=16", str(photo)], capture_output=True, text=True, env=env,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert Image.open(out_dir / "p.png").size == (24, 20)

"""The README's `uir-jax eval`, `export` and `restore --model` commands, run verbatim.

The command lines are read from README.md's bash blocks (continuation lines joined, `# comments`
dropped) and run unchanged, as subprocesses, in a temporary directory that holds every file and
folder they name: small random-weight checkpoints in the released layouts under exactly the
README's file names, a tiny paired test set, another method's restored images and a training run.
A flag renamed in main.py or in the README, or a command dropped from the README, fails here.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SETS = {"noisy": 2, "hazy": 2}  # degradation -> pairs: FID needs 2 images per set


def readme_commands(text: str | None = None) -> list[list[str]]:
  """The eval / export / restore --model command lines of the README's bash blocks, as argv."""
  text = README.read_text(encoding="utf-8") if text is None else text
  commands = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
    for line in re.sub(r"\\\n", " ", block).splitlines():
      argv = shlex.split(line, comments=True)
      if len(argv) < 2 or argv[0] != "uir-jax" or "..." in argv:  # `export ... --sizes`: a sketch
        continue
      if argv[1] in ("eval", "export") or (argv[1] == "restore" and "--model" in argv):
        commands.append(argv)
  return commands


def _flag(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg == f"--{name}":
      return argv[i + 1]
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def _kind(argv: list[str]) -> str:
  """A name for what a command does: eval/restore, eval/score, export/daclip, ..., and tdr/eval,
  tdr/export, tdr/restore for TextualDegRemoval's guided restoration."""
  if any(a.startswith("--guidance") for a in argv):
    return f"tdr/{argv[1]}"
  if argv[1] == "eval":
    return "eval/score" if _flag(argv, "restored") else "eval/restore"
  if argv[1] == "export":
    return "export/run" if _flag(argv, "workdir") else (
        "export/daclip" if _flag(argv, "daclip") else "export/plain")
  return "restore/model"


def test_readme_has_the_eval_and_export_commands():
  commands = readme_commands()
  assert sorted(_kind(c) for c in commands) == [
      "eval/restore", "eval/score", "export/daclip", "export/plain", "export/run",
      "restore/model", "tdr/eval", "tdr/export", "tdr/restore"], [shlex.join(c) for c in commands]


def test_extraction_joins_continuations_and_drops_comments():
  text = ("```bash\n# uir-jax eval --in-a-comment\n"
          "uir-jax eval --unet u.pth \\\n    --data 'd d' --niqe   # trailing\n"
          "uir-jax export ... --sizes 8x8\nuir-jax restore --unet u.pth p.png\n"
          "uir-jax restore --model m --output_dir o p/\n```\n```python\nuir-jax export --x\n```\n")
  assert readme_commands(text) == [
      ["uir-jax", "eval", "--unet", "u.pth", "--data", "d d", "--niqe"],
      ["uir-jax", "restore", "--model", "m", "--output_dir", "o", "p/"]]


# --- the files the commands name -------------------------------------------------------------


def _torch_save_numpy(state_dict, path):
  import torch

  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


@functools.cache
def _daclip_state_dict():
  from export_fixtures import daclip_state_dict, tiny_daclip

  return daclip_state_dict(tiny_daclip())


def _write_daclip_pt(path):
  """A random tiny DA-CLIP state_dict, torch.save'd as the released `.pt` is read."""
  _torch_save_numpy(_daclip_state_dict(), path)


def _write_lpips(path):
  """The `lpips` package's LPIPS(alex) state_dict (random trunk, its shipped lin heads)."""
  import lpips
  import torch

  torch.manual_seed(0)
  torch.save(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).state_dict(), path)


def _write_vgg16(path):
  """A random torchvision VGG16's `features.*` (the DISTS trunk; the classifier is ignored)."""
  import torch
  import torchvision

  torch.manual_seed(0)
  vgg = torchvision.models.vgg16(weights=None)
  torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, path)


def _write_inception(path):
  import torch

  from tests.metrics.test_fid import _random_fid_state_dict

  torch.save(_random_fid_state_dict(0), path)


def _write_test_set(root, size):
  from tests.metrics.test_evaluate import _write_set

  for seed, (name, n) in enumerate(SETS.items()):
    _write_set(root, name, [(size, size)] * n, seed)


def _write_other_method(root, data):
  """`<dir>/<degradation>/<name>.png`: the LQ images, as a do-nothing method's output."""
  for name in SETS:
    os.makedirs(root / name, exist_ok=True)
    for lq in sorted((data / name / "LQ").iterdir()):
      Image.open(lq).save(root / name / lq.name)


def _run(argv, cwd):
  """A README command, with `uir-jax` as this Python's `-m uir_jax.main`, in `cwd`."""
  assert argv[0] == "uir-jax"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "uir_jax.main", *argv[1:]], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (f"{shlex.join(argv)} -> exit {proc.returncode}\n"
                                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


INPUT_FLAGS = ("daclip", "unet", "data", "lpips", "dists", "fid", "restored", "workdir", "model",
               "checkpoint", "guidance")


def _inputs_exist(argv, cwd):
  """Every input the command names (files, folders; restore's photos) is in `cwd`."""
  values = [_flag(argv, name) for name in INPUT_FLAGS]
  if argv[1] == "restore":  # the positional arguments: photos, folders
    values += [a for i, a in enumerate(argv[2:], 2)
               if not a.startswith("--") and not argv[i - 1].startswith("--")]
  for value in filter(None, values):
    assert (cwd / value).exists(), f"{shlex.join(argv)}: {value} missing from the fixture"


def _commands(kind_prefix):
  return [c for c in readme_commands() if _kind(c).startswith(kind_prefix)]


def test_a_broken_command_fails_the_run(tmp_path):
  """The harness notices what the tests below guard against: a README flag main.py lacks."""
  (argv,) = [c for c in readme_commands() if _kind(c) == "eval/restore"]
  renamed = ["--output_folder" if a == "--output_dir" else a for a in argv]
  assert renamed != argv
  with pytest.raises(AssertionError, match="output_folder"):
    _run(renamed, tmp_path)


# Image sides: the restoring command runs a tiny U-Net's default 100 steps, ~1 s per 32 x 32 image
# (at 200 x 200 its bottom attention makes it minutes); scoring restored images needs no sampler,
# so that test set is large enough for NIQE (at least 194 pixels a side; smaller gives n/a).
EVAL_SIZE = {"eval/restore": 32, "eval/score": 200}


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(EVAL_SIZE))
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # pytorch-fid
def test_readme_eval_command_runs(tmp_path, kind):
  from export_fixtures import save_torch_unet

  (argv,) = [c for c in readme_commands() if _kind(c) == kind]
  data = tmp_path / _flag(argv, "data")
  _write_test_set(data, EVAL_SIZE[kind])
  if kind == "eval/restore":
    _write_daclip_pt(tmp_path / "daclip_ViT-B-32.pt")
    save_torch_unet(tmp_path / "universal-ir.pth", conditioned=True)
  else:
    _write_other_method(tmp_path / "other_method", data)
  writers = {"lpips_alex.pth": _write_lpips, "vgg16-397923af.pth": _write_vgg16,
             "pt_inception-2015-12-05-6726825d.pth": _write_inception}
  for name, write in writers.items():
    if name in argv:
      write(tmp_path / name)
  _inputs_exist(argv, tmp_path)
  _run(argv, tmp_path)
  out = tmp_path / _flag(argv, "output_dir")
  for ext in ("json", "md", "csv"):
    assert (out / f"results.{ext}").is_file(), ext
  report = json.loads((out / "results.json").read_text())
  assert sorted(report["per_set"]) == sorted(SETS) and not report["skipped"]
  metrics = ["psnr", "ssim", "psnr_y", "ssim_y"] + [
      m for m in ("lpips", "dists", "fid", "niqe") if f"--{m}" in argv]
  for name, n in SETS.items():
    scores = report["per_set"][name]
    assert scores["count"] == n
    finite = {m for m in metrics if scores.get(m) is not None and np.isfinite(scores[m])}
    if kind == "eval/restore":  # NIQE is n/a on 32 x 32 images
      finite.add("niqe")
    assert finite == set(metrics), (name, scores)
    if kind == "eval/restore":  # the restored PNGs, per set
      assert sorted(p.name for p in (out / name).glob("*.png")) == sorted(
          p.name for p in (data / name / "LQ").iterdir())


@pytest.mark.torch
@pytest.mark.slow
def test_readme_export_commands_run(tmp_path):
  from export_fixtures import save_photo, save_torch_unet

  from tests.export.test_export_model import _training_run

  commands = _commands("export/") + _commands("restore/")
  assert [_kind(c) for c in commands][-1] == "restore/model" and len(commands) == 4
  _write_daclip_pt(tmp_path / "daclip_ViT-B-32.pt")
  save_torch_unet(tmp_path / "universal-ir.pth", conditioned=True)
  save_torch_unet(tmp_path / "irsde.safetensors", conditioned=False, safetensors=True)
  _training_run(tmp_path / "runs/universal-ir")
  os.makedirs(tmp_path / "photos")
  photos = ["a.png", "b.jpg"]
  for i, name in enumerate(photos):
    save_photo(tmp_path / "photos" / name, 24 + 4 * i, 32, seed=i)
  for argv in commands:  # in the README's order: the exports, then restoring from one
    _inputs_exist(argv, tmp_path)
    _run(argv, tmp_path)
    if argv[1] == "export":
      manifest = json.loads((tmp_path / _flag(argv, "out") / "manifest.json").read_text())
      assert bool(manifest["daclip"]) == (_kind(argv) != "export/plain"), argv
    else:
      out = tmp_path / _flag(argv, "output_dir")
      for name in photos:
        stem = os.path.splitext(name)[0]
        restored = Image.open(out / f"{stem}.png")
        assert restored.size == Image.open(tmp_path / "photos" / name).size
        assert (out / f"{stem}.json").is_file()  # DA-CLIP's predicted degradation


@pytest.mark.torch
@pytest.mark.slow
def test_readme_tdr_commands_run(tmp_path):
  """TextualDegRemoval's export, restore --model and eval, in the README's order, on a random tiny
  NAFNetRefFusion .pth of the official layout under the README's file name."""
  import torch
  import torch_nafnet
  import torch_tdr

  from tests.systems.textual_deg_removal.test_restore_cli import TINY

  commands = _commands("tdr/")
  assert [_kind(c) for c in commands] == ["tdr/export", "tdr/restore", "tdr/eval"]
  torch.manual_seed(0)
  model = torch_nafnet.perturb_(torch_tdr.TorchNAFNetRefFusion(**TINY))
  torch.save({"params": model.state_dict()}, tmp_path / "tdr_nafnet.pth")
  rng = np.random.default_rng(0)

  def png(path, h, w):
    os.makedirs(path.parent, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

  photos = {"a.png": (40, 56), "b.jpg": (48, 32)}
  for name, (h, w) in photos.items():
    png(tmp_path / "photos" / name, h, w)
    png(tmp_path / "guidance" / f"{os.path.splitext(name)[0]}.png", w + 8, h)
  data = tmp_path / _flag(commands[2], "data")
  for sub in ("LQ", "GT"):
    for name in ("a.png", "b.png"):
      png(data / sub / name, 40, 56)
  for argv in commands:
    _inputs_exist(argv, tmp_path)
    proc = _run(argv, tmp_path)
    if argv[1] == "export":
      manifest = json.loads((tmp_path / _flag(argv, "out") / "manifest.json").read_text())
      assert [(f["height"], f["width"], f["guidance_height"], f["guidance_width"])
              for f in manifest["functions"]["restore"]] == [(768, 1280, 512, 512)], manifest
    elif argv[1] == "restore":
      out = tmp_path / _flag(argv, "output_dir")
      for name in photos:
        restored = Image.open(out / f"{os.path.splitext(name)[0]}.png")
        assert restored.size == Image.open(tmp_path / "photos" / name).size
    else:  # scored into the default --output_dir
      report = json.loads((tmp_path / "restored" / "results.json").read_text())
      assert len(report["per_image"]) == 2 and not report["skipped"], proc.stdout[-2000:]

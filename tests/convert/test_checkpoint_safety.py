"""Loading a checkpoint never runs code from it: PyTorch files are read as data only (tensors,
numpy scalars / arrays / dtypes, OrderedDict); a pickle that asks for more is refused with one line
naming what it asked for, from every command and every loader, unless --trust_checkpoint /
trust=True. Broken files (empty, truncated, text, a zip of something else, a directory) are one
line too. Real layouts (official state_dicts, DA-CLIP training checkpoints with numpy scalars,
the weights shipped in the lpips / DISTS packages) still load without the opt-in.

The crafted files are real `torch.save` zips whose pickle would create a marker file when loaded
with plain pickle: `open(marker, "w")` (global io.open) or `os.system("touch marker")`
(posix.system).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
from export_fixtures import daclip_state_dict, save_photo, save_torch_unet, tiny_daclip

from uir_jax.convert import common
from uir_jax.convert.common import CheckpointError, ConversionError, UntrustedCheckpointError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


class _Open:
  """Unpickles as `open(path, "w")`: creates the marker file."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return open, (self.path, "w")


class _System:
  """Unpickles as `os.system("touch path")`: creates the marker file."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return os.system, (f"touch '{self.path}'",)


PAYLOADS = {"open": (_Open, "io.open"), "system": (_System, "posix.system")}


def save_crafted(path, state_dict, marker, payload="open"):
  """A training-checkpoint-shaped file ({"state_dict", "extra"}) whose "extra" runs code."""
  cls, _ = PAYLOADS[payload]
  torch.save({"state_dict": dict(state_dict), "extra": cls(marker)}, str(path))
  return str(path)


def _torch_sd(sd):
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def daclip_training_checkpoint(state_dict, path, numpy1=False):
  """A DA-CLIP-style training checkpoint: numpy scalars in the optimizer state and epoch (as
  open_clip's training loop saves them); `numpy1`: its globals renamed as numpy 1.x pickles them
  (numpy.core.* instead of numpy._core.*)."""
  torch.save({"epoch": np.int64(2), "name": "daclip_tiny",
              "state_dict": _torch_sd(state_dict),
              "optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                          "exp_avg": torch.zeros(2)}},
                            "param_groups": [{"lr": np.float64(2.5e-5), "step": np.float64(3),
                                              "betas": (0.9, 0.98), "params": [0]}]},
              "scaler": {"scale": np.float32(65536.0), "counts": np.arange(3)}}, str(path))
  if numpy1:
    with zipfile.ZipFile(path) as z:
      members = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
      for info, data in members:
        if info.filename.endswith("data.pkl"):
          assert b"numpy._core.multiarray" in data
          data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        z.writestr(info, data)
  return str(path)


# ---- Shared files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpts")
  plain = str(save_torch_unet(d / "plain.pth", conditioned=False, seed=1))
  photo = str(save_photo(d / "p.png", 8, 8))
  data = d / "set"
  for sub in ("LQ", "GT"):
    os.makedirs(data / sub)
    save_photo(data / sub / "a.png", 8, 8)
  marker = d / "MARKER"
  bad = {
      "open": save_crafted(d / "crafted_open.pth", torch.load(plain), marker, "open"),
      "system": save_crafted(d / "crafted_system.pt", torch.load(plain), marker, "system"),
      "empty": d / "empty.pth",
      "truncated": d / "truncated.pth",
      "zip": d / "other.zip.pth",
      "text": d / "notes.pth",
      "directory": d / "a_directory",
      "list": d / "list.pth",
      "wrong_kind": d / "wrong_kind.pth",
  }
  bad["empty"].write_bytes(b"")
  blob = open(plain, "rb").read()
  bad["truncated"].write_bytes(blob[: len(blob) // 2])
  with zipfile.ZipFile(bad["zip"], "w") as z:
    z.writestr("photos/readme.txt", "a zip of something else")
  bad["text"].write_text("these are not the weights you are looking for\n")
  os.makedirs(bad["directory"])
  torch.save([torch.zeros(2)], str(bad["list"]))
  torch.save({"foo.weight": torch.zeros(2, 2)}, str(bad["wrong_kind"]))
  return dict(dir=d, plain=plain, photo=photo, data=str(data), marker=marker,
              bad={k: str(v) for k, v in bad.items()})


@pytest.fixture(scope="module")
def daclip():
  """A random tiny DA-CLIP and its PyTorch-layout state_dict."""
  model = tiny_daclip(3)
  return model, daclip_state_dict(model)


def _cli(*args):
  """`uir-jax ARGS` in this process; returns the SystemExit code (None or 0: success)."""
  from uir_jax import main

  main.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exc:
    main.run(["uir-jax", *map(str, args)])
  return exc.value.code


@pytest.fixture(scope="module")
def restore_absl_logging():
  """`uir-jax train` sends absl's log to files in its workdir; give the other tests stderr back."""
  import sys

  from absl import logging

  yield
  handler = logging.get_absl_handler().python_handler
  if handler.stream is not sys.stderr:
    handler.stream.close()
    handler.stream = sys.stderr


# `--config.init_from=` overrides are flags that ml_collections defines from sys.argv when
# uir_jax.main is imported, so an in-process run cannot add them; this config file takes init_from
# as its argument instead (`--config=FILE:PATH`), the same field through the same command.
INIT_FROM_CONFIG = """
from configs import nafnet


def get_config(init_from):
  c = nafnet.get_config("tiny")
  c.init_from = init_from
  return c
"""


def _train_args(files, path):
  config = files["dir"] / "init_from_config.py"
  if not config.exists():
    config.write_text(INIT_FROM_CONFIG)
  wd = files["dir"] / f"wd_{os.path.basename(path)}"
  return ["train", f"--config={config}:{path}", f"--workdir={wd}"]


# Each command that reads a checkpoint, with the file under test in the place named.
ENTRY_POINTS = {
    "convert": lambda f, p: ["convert", p, f["dir"] / "out.safetensors"],
    "restore --unet": lambda f, p: ["restore", f"--unet={p}", f"--output_dir={f['dir'] / 'out'}",
                                     f["photo"]],
    "restore --daclip": lambda f, p: ["restore", f"--unet={f['plain']}", f"--daclip={p}",
                                      f"--output_dir={f['dir'] / 'out'}", f["photo"]],
    "export --unet": lambda f, p: ["export", f"--unet={p}", f"--out={f['dir'] / 'export'}"],
    "export --daclip": lambda f, p: ["export", f"--unet={f['plain']}", f"--daclip={p}",
                                     f"--out={f['dir'] / 'export'}"],
    "eval --unet": lambda f, p: ["eval", f"--unet={p}", f"--data={f['data']}",
                                 f"--output_dir={f['dir'] / 'eval'}"],
    "eval --lpips": lambda f, p: ["eval", f"--restored={f['data']}/LQ", f"--data={f['data']}",
                                  f"--lpips={p}", f"--output_dir={f['dir'] / 'eval'}"],
    "train init_from": _train_args,
}

# What each kind of bad file must be called in the one line (besides its path).
EXPECTED = {
    "open": "io.open", "system": "posix.system", "empty": "empty file",
    "truncated": "truncated", "zip": "not a PyTorch checkpoint", "text": "not a PyTorch checkpoint",
    "directory": "", "list": "not a state_dict", "wrong_kind": "",
}


# (A wrong-kind --lpips builds the LPIPS network before it finds out: 7 s; the others are cheap.)
CASES = [(entry, kind) for entry in ENTRY_POINTS for kind in EXPECTED
         if (entry, kind) != ("eval --lpips", "wrong_kind")]


@pytest.mark.parametrize(("entry", "kind"), CASES)
def test_every_command_refuses_a_bad_checkpoint_in_one_line(files, restore_absl_logging, entry,
                                                            kind):
  path = files["bad"][kind]
  args = ENTRY_POINTS[entry](files, path)
  code = _cli(*args)
  assert isinstance(code, str), (args, code)  # a refusal (exit status 1), not a success
  assert "\n" not in code and code.startswith(f"uir-jax {args[0]}: "), code
  assert os.path.basename(path) in code and EXPECTED[kind] in code, code
  if kind in PAYLOADS:
    assert "--trust_checkpoint" in code and "runs code" in code, code
  assert not files["marker"].exists()  # nothing in the file ran
  assert not (files["dir"] / "export").exists() and not (files["dir"] / "out.safetensors").exists()


def _loader(module: str, name: str):
  import importlib

  return lambda path, **kw: getattr(importlib.import_module(module), name)(path, **kw)


def _from_checkpoints(path, **kw):
  from uir_jax.systems.daclip_uir.restorers import Restorer

  return Restorer.from_checkpoints(None, path, **kw)


def _export_checkpoints(path, **kw):
  from uir_jax.systems.daclip_uir.export_spec import export_checkpoints

  return export_checkpoints(path, None, path + ".export", **kw)


def _to_safetensors(path, **kw):
  from uir_jax.convert.to_safetensors import to_safetensors

  return to_safetensors(path, path + ".safetensors", **kw)


# The Python API: every function that reads a checkpoint file.
LOADERS = {
    "read_state_dict": _loader("uir_jax.convert.common", "read_state_dict"),
    "load_unet": _loader("uir_jax.convert.unet", "load_unet"),
    "load_nafnet": _loader("uir_jax.convert.nafnet", "load_nafnet"),
    "load_denoiser": _loader("uir_jax.convert.denoiser", "load_denoiser"),
    "load_clip": _loader("uir_jax.convert.clip", "load_clip"),
    "load_daclip": _loader("uir_jax.convert.clip", "load_daclip"),
    "load_lpips": _loader("uir_jax.convert.lpips", "load_lpips"),
    "load_dists": _loader("uir_jax.convert.dists", "load_dists"),
    "load_inception": _loader("uir_jax.convert.fid", "load_inception"),
    "to_safetensors": _to_safetensors,
    "Restorer.from_checkpoints": _from_checkpoints,
    "export_checkpoints": _export_checkpoints,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_refuses_code_and_broken_files(files, loader):
  for kind, path in files["bad"].items():
    if kind == "wrong_kind" and loader in ("read_state_dict", "load_lpips", "load_inception"):
      continue  # a mapping of tensors is for the loaders to judge (these two build the model first)
    error = CheckpointError if kind != "wrong_kind" else ConversionError
    with pytest.raises(error) as exc:
      LOADERS[loader](path)
    message = str(exc.value)
    if kind != "wrong_kind":  # (a converter's key list may span lines; the commands join it)
      assert "\n" not in message and path in message and EXPECTED[kind] in message, message
    if kind in PAYLOADS:
      assert isinstance(exc.value, UntrustedCheckpointError), message
      assert exc.value.globals == (PAYLOADS[kind][1],) and "trust=True" in message, message
  assert not files["marker"].exists()


def test_trust_runs_the_file_only_when_asked(files, tmp_path):
  from uir_jax.convert.unet import load_unet

  marker = tmp_path / "MARKER"
  path = save_crafted(tmp_path / "crafted.pth", torch.load(files["plain"]), marker)
  with pytest.raises(UntrustedCheckpointError, match="io.open"):
    load_unet(path)
  assert not marker.exists()
  unet = load_unet(path, trust=True)  # the payload ran, and the U-Net under "state_dict" loaded
  assert marker.exists()
  want = load_unet(files["plain"])
  from flax import nnx

  a, b = (common.flat_params(nnx.state(m, nnx.Param)) for m in (unet, want))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_whole_pickled_model_needs_trust(tmp_path):
  """`torch.save(model)` pickles the module's class: refused naming it; trusted, its state_dict."""
  torch_unet = pytest.importorskip("torch_unet")
  from uir_jax.convert.unet import load_unet

  model = torch_unet.randomize_(torch_unet.ConditionalUNet(nf=8, ch_mult=(1, 2), context_dim=0,
                                                           use_degra_context=False,
                                                           use_image_context=False))
  path = str(tmp_path / "whole.pth")
  torch.save(model, path)
  with pytest.raises(UntrustedCheckpointError, match="torch_unet.ConditionalUNet"):
    load_unet(path)
  unet = load_unet(path, trust=True)
  x = np.asarray(unet.init_conv.kernel[...])
  np.testing.assert_array_equal(x, model.init_conv.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_trust_checkpoint_flag_reaches_every_command(files, restore_absl_logging, tmp_path):
  """Given --trust_checkpoint, each command loads the crafted file (its marker appears); without
  it, none does. The payload wraps a state_dict of no known model, so every command then refuses
  it as the wrong kind (cheap: no model runs), except convert, which is given a real U-Net."""
  for i, entry in enumerate(ENTRY_POINTS):
    marker = tmp_path / f"MARKER_{i}"
    sd = torch.load(files["plain"]) if entry == "convert" else {"foo.weight": torch.zeros(2)}
    path = save_crafted(tmp_path / f"crafted_{i}.pth", sd, marker, "system")
    args = ENTRY_POINTS[entry](files, path)
    code = _cli(*args)
    assert isinstance(code, str) and "posix.system" in code and not marker.exists(), (entry, code)
    code = _cli(*args, "--trust_checkpoint")
    assert marker.exists(), (entry, code)
    if entry == "convert":
      assert code in (None, 0) and (files["dir"] / "out.safetensors").is_file()
      os.remove(files["dir"] / "out.safetensors")
    else:
      assert isinstance(code, str) and "\n" not in code and "posix.system" not in code, code


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
def test_daclip_training_checkpoint_with_numpy_scalars_loads_without_trust(daclip, tmp_path,
                                                                           numpy1):
  from flax import nnx

  from uir_jax.convert.clip import load_daclip

  path = daclip_training_checkpoint(daclip[1], tmp_path / "daclip.pt", numpy1)
  ckpt = common.read_state_dict(path)
  assert ckpt["epoch"] == 2 and ckpt["optimizer"]["param_groups"][0]["lr"] == 2.5e-5
  np.testing.assert_array_equal(ckpt["scaler"]["counts"], np.arange(3))
  assert all(np.array_equal(ckpt["state_dict"][k].numpy(), v) for k, v in daclip[1].items())
  if numpy1:
    return  # (the rest does not depend on how numpy named its globals)
  model = load_daclip(path)
  a, b = (common.flat_params(nnx.state(m, nnx.Param)) for m in (model, daclip[0]))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # The command line too: converting it needs no opt-in.
  out = tmp_path / "daclip.safetensors"
  assert _cli("convert", path, out) in (None, 0) and out.is_file()


def test_real_files_from_packages_load_without_trust():
  """The PyTorch files shipped inside pip packages (lpips' heads, DISTS' alpha/beta: legacy and
  zip formats) are data only."""
  import importlib.util

  for package, name in (("lpips", "weights/v0.1/alex.pth"), ("lpips", "weights/v0.1/vgg.pth"),
                        ("DISTS_pytorch", "weights.pt")):
    spec = importlib.util.find_spec(package)
    if spec is None:
      pytest.skip(f"{package} is not installed")
    sd = common.read_state_dict(os.path.join(os.path.dirname(spec.origin), name))
    assert sd and all(hasattr(v, "shape") for v in sd.values())


def test_refused_globals_parses_torchs_messages():
  msg = ("Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL "
         "io.open was not an allowed global by default. Please use ...")
  assert common.refused_globals(msg) == ["io.open"]
  assert common.refused_globals("GLOBAL eval was not an allowed global by default.") == [
      "builtins.eval"]
  assert common.refused_globals("Trying to load unsupported GLOBAL posix.system whose module "
                                "posix is blocked.") == ["posix.system"]
  assert common.refused_globals("Can only build Tensor, Parameter, OrderedDict or types "
                                "allowlisted via `add_safe_globals`, but got <class "
                                "'foo.Bar'>") == ["foo.Bar"]
  assert common.refused_globals("Unsupported operand 223") == []



def test_training_configs_daclip_checkpoint_is_read_as_data(tmp_path):
  """`daclip.checkpoint` (the frozen DA-CLIP of a restoration run; also what `export --workdir`
  reads): refused without `trust_checkpoint`, named by its field when it is the wrong kind."""
  import ml_collections

  from uir_jax.systems.daclip_uir import conditioning as train_common

  marker = tmp_path / "MARKER"
  path = save_crafted(tmp_path / "daclip.pt", {"foo.weight": torch.zeros(2)}, marker)
  cfg = ml_collections.ConfigDict(dict(checkpoint=path, windows=False))
  with pytest.raises(UntrustedCheckpointError, match="io.open"):
    train_common.load_frozen_daclip(cfg, 0)
  assert not marker.exists()
  with pytest.raises(CheckpointError, match=r"^daclip.checkpoint .*daclip.pt: cannot infer"):
    train_common.load_frozen_daclip(cfg, 0, trust=True)
  assert marker.exists()

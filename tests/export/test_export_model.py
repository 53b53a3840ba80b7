"""`uir-jax export` and `uir-jax restore` for people: the serialized restore function against the
Flax model, a training run's export restored without torch or the model code, fixed-size exports,
and every bad input ending in one line."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from export_fixtures import (
  save_daclip,
  save_photo,
  save_torch_unet,
)
from PIL import Image

from uir_jax import export as export_api
from uir_jax.diffusion.irsde import IRSDE
from uir_jax.export import reader as export_reader
from uir_jax.systems.daclip_uir import export_spec as export
from uir_jax.systems.daclip_uir.restorers import Restorer

THREEFRY = "threefry2x32"
# x̂_0 divides by m_T = 0.005 at the first posterior step, so float32 rounding differences of
# the denoiser between two compilations (~1e-7) show up ~200x larger in the restored image.
TOL = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Random tiny checkpoints: a DA-CLIP, a conditioned and an unconditioned U-Net."""
  d = tmp_path_factory.mktemp("checkpoints")
  daclip = save_daclip(d / "daclip.safetensors", seed=3)
  return dict(dir=d, daclip_model=daclip, daclip=str(d / "daclip.safetensors"),
              cond=str(save_torch_unet(d / "cond.safetensors", conditioned=True,
                                       safetensors=True)),
              plain=str(save_torch_unet(d / "plain.pth", conditioned=False, seed=1)))


@pytest.fixture(scope="module")
def cond_export(files):
  out = str(files["dir"] / "cond_export")
  export.export_checkpoints(files["cond"], files["daclip"], out, num_steps=2, platforms=["cpu"])
  return out


@pytest.fixture(scope="module")
def plain_export(files):
  out = str(files["dir"] / "plain_export")
  export.export_checkpoints(files["plain"], None, out, num_steps=2, platforms=["cpu"])
  return out


def _cli(*args):
  """Runs `uir-jax ARGS` in this process; returns the SystemExit code (None or 0: success)."""
  from uir_jax import main

  main.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exc:
    main.run(["uir-jax", *map(str, args)])
  return exc.value.code


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.torch
def test_serialized_function_equals_the_flax_model(files, cond_export):
  from flax import nnx

  from uir_jax.convert.clip import load_daclip
  from uir_jax.convert.common import flat_params
  from uir_jax.convert.denoiser import load_denoiser
  from uir_jax.preprocess import clip_preprocess
  from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS, classify_degradation

  manifest = json.load(open(os.path.join(cond_export, "manifest.json")))
  assert manifest["denoiser"]["options"]["context_dim"] == 64
  assert manifest["denoiser"]["options"]["ch_mult"] == [2, 2]
  assert manifest["sde"] == {"max_sigma": 50.0, "T": 100, "schedule": "cosine", "eps": 0.005}
  assert manifest["sampler"] == {"mode": "posterior", "num_steps": 2, "clip_x0": False}
  assert manifest["contexts"] == ["degradation", "content"]
  assert manifest["sources"]["denoiser"]["sha256"] == _sha(files["cond"])
  assert manifest["sources"]["daclip"]["sha256"] == _sha(files["daclip"])
  assert manifest["functions"]["restore"][0]["multiple"] == 4
  assert manifest["versions"]["uir_jax"] and manifest["prng_impl"] == THREEFRY
  for name, entry in manifest["files"].items():
    assert _sha(os.path.join(cond_export, name)) == entry["sha256"]

  model = export_api.load_export(cond_export)
  lq = np.random.default_rng(0).random((1, 18, 21, 3), np.float32)  # not a multiple of 4
  key = jax.random.key(7, impl=THREEFRY)
  out = np.asarray(model(lq, key))
  daclip, unet = load_daclip(files["daclip"]), load_denoiser(files["cond"])
  flax = Restorer(unet, daclip, IRSDE(), num_steps=2, pad_multiple=4)
  want = np.asarray(flax(lq, key))
  err = float(np.abs(out - want).max())
  print(f"serialized vs Flax restore: max |diff| {err:.2e}")
  assert out.shape == lq.shape and err <= TOL
  # The comparison can fail: another key, or other weights, give another image.
  assert float(np.abs(out - np.asarray(model(lq, jax.random.key(8, impl=THREEFRY)))).max()) > 0.01
  # The zero-shot readout of the serialized DA-CLIP is `classify_degradation`'s.
  probs = np.asarray(model.embed(lq)["probabilities"])
  ref = np.asarray(classify_degradation(daclip, clip_preprocess(lq, 32)))
  np.testing.assert_allclose(probs, ref, atol=1e-5)
  assert model.words == list(DEGRADATION_WORDS)
  # The orbax copy rebuilds the same Flax models (load_flax), weight for weight.
  unet2, daclip2, sde2, sampler = export.load_flax(cond_export)
  for a, b in ((unet, unet2), (daclip, daclip2)):
    fa, fb = flat_params(nnx.state(a)), flat_params(nnx.state(b))
    assert set(fa) == set(fb)
    for k in fa:
      np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
  assert (sde2.T, sampler["num_steps"]) == (100, 2)
  # One function for any batch and size: two photos of another size.
  two = np.asarray(model(np.random.default_rng(1).random((2, 8, 8, 3), np.float32), 3))
  assert two.shape == (2, 8, 8, 3) and 0 <= two.min() and two.max() <= 1


def _copy(src, dest):
  shutil.copytree(src, dest)
  return str(dest)


@pytest.mark.torch
def test_broken_or_mixed_exports_fail_with_one_line(tmp_path, cond_export, plain_export,
                                                    monkeypatch):
  def error(directory):
    with pytest.raises(export_api.ExportError) as exc:
      export_api.load_export(str(directory))
    message = str(exc.value)
    assert "\n" not in message
    return message

  bad = _copy(cond_export, tmp_path / "truncated")
  path = os.path.join(bad, "denoiser.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-100])
  assert "denoiser.safetensors is truncated" in error(bad)

  bad = _copy(cond_export, tmp_path / "cut_function")
  os.remove(os.path.join(bad, "restore.jaxexport"))
  assert "restore.jaxexport is missing" in error(bad)

  bad = _copy(cond_export, tmp_path / "cut_orbax")  # the copy the restore path does not read
  orbax_file = next(n for n in json.load(open(os.path.join(bad, "manifest.json")))["files"]
                    if n.startswith("orbax/") and "ocdbt.process_0/d/" in n)
  open(os.path.join(bad, orbax_file), "wb").write(b"")
  assert orbax_file in error(bad) and "truncated" in error(bad)

  bad = _copy(cond_export, tmp_path / "flipped")  # same size, other bytes
  data = bytearray(open(os.path.join(cond_export, "denoiser.safetensors"), "rb").read())
  data[-5] ^= 0xFF
  open(os.path.join(bad, "denoiser.safetensors"), "wb").write(bytes(data))
  assert "sha256 differs" in error(bad)

  bad = _copy(cond_export, tmp_path / "mixed")  # another model's weights dropped in
  shutil.copy(os.path.join(plain_export, "denoiser.safetensors"), bad)
  assert "belongs to another model" in error(bad)

  bad = _copy(cond_export, tmp_path / "mixed_function")
  shutil.copy(os.path.join(plain_export, "restore.jaxexport"), bad)
  assert "restore.jaxexport" in error(bad)

  bad = _copy(cond_export, tmp_path / "other_manifest")  # the other export's manifest
  shutil.copy(os.path.join(plain_export, "manifest.json"), bad)
  assert "belongs to another model" in error(bad)

  bad = _copy(cond_export, tmp_path / "garbled")
  open(os.path.join(bad, "manifest.json"), "w").write("{not json")
  assert "unreadable manifest" in error(bad)

  bad = _copy(cond_export, tmp_path / "future")
  manifest = json.load(open(os.path.join(bad, "manifest.json")))
  manifest["format_version"] = export_api.FORMAT_VERSION + 1
  json.dump(manifest, open(os.path.join(bad, "manifest.json"), "w"))
  assert "newer" in error(bad)

  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "config.json").write_text("{}")
  assert "not a uir-jax export" in error(tmp_path / "run")
  assert "no such export" in error(tmp_path / "nowhere")

  monkeypatch.setattr(export_reader, "_platform", lambda: "tpu")
  assert "exported for cpu, not tpu" in error(cond_export)


def _training_run(workdir):
  """A `configs/irsde_quickstart.py:tiny` run's workdir after one step, made by the trainer's own
  pieces (config writer, state layout, Checkpointer) without running the data pipeline and the
  step (which take ~1 min on 2 CPU cores). The EMA is made to differ from the parameters, so an
  export of the wrong ones is caught."""
  from export_fixtures import write_one_step_run

  from configs import irsde_quickstart
  from uir_jax.systems.daclip_uir import irsde

  config = irsde_quickstart.get_config("tiny")
  # Conditioned on a random tiny DA-CLIP, as the smoke configs are (embeddings of width 64).
  config.model.update(context_dim=64, use_degra_context=True, use_image_context=True)
  config.daclip.checkpoint, config.data.clip_lq = "random:tiny", True
  return write_one_step_run(config, irsde.make_stage, workdir)


def printed_words(stdout, name):
  """The degradation word printed on the line of photo `name`."""
  line = next(ln for ln in stdout.splitlines() if f"{os.sep}{name}.png ->" in ln)
  return line.rsplit("degradation: ", 1)[1].split()[0]


@pytest.mark.slow  # trains a tiny run, then restores in a process
def test_training_run_exports_and_restores_without_torch(tmp_path, capsys):
  from safetensors.numpy import load_file

  from uir_jax.convert.common import flat_params

  workdir, out = tmp_path / "run", tmp_path / "export"
  state, frozen = _training_run(workdir)
  assert _cli("export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu") in (None, 0)
  printed = capsys.readouterr().out
  assert "any size" in printed and "3 steps" in printed
  code = _cli("export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--step=7")
  assert code == f"uir-jax export: {workdir}: no checkpoint of step 7 (it has [1])"
  # A run whose DA-CLIP read another CLIP view than the exported resize is refused, not exported
  # with the wrong view.
  for key, value, view in (("data", ("clip_view", "crop"), "crop"),
                           ("daclip", ("windows", True), "windows")):
    other = tmp_path / f"run_{view}"
    shutil.copytree(workdir, other)
    config = json.load(open(other / "config.json"))
    config[key][value[0]] = value[1]
    json.dump(config, open(other / "config.json", "w"))
    code = _cli("export", f"--workdir={other}", f"--out={tmp_path / view}")
    assert code == (f"uir-jax export: {other}: its DA-CLIP read the {view!r} CLIP view; exports "
                    f"embed the photo resized to the CLIP's size (clip_view 'resize') only")
  manifest = json.load(open(out / "manifest.json"))
  assert manifest["sources"]["step"] == 1 and manifest["sources"]["weights"] == "ema"
  assert manifest["sampler"] == {"mode": "posterior", "num_steps": 3, "clip_x0": True}
  assert manifest["contexts"] == ["degradation", "content"]
  assert manifest["sources"]["daclip"] == {"checkpoint": "random:tiny", "seed": 0,
                                           "random_weights": True}
  weights = load_file(str(out / "denoiser.safetensors"))
  ema = flat_params(state["ema"])
  assert set(weights) == set(ema)
  for k in ema:
    np.testing.assert_array_equal(weights[k], np.asarray(ema[k]))
  # The random DA-CLIP is the one the trainer drew (same seed), not another draw.
  daclip = load_file(str(out / "daclip.safetensors"))
  for k, v in flat_params(frozen).items():
    np.testing.assert_array_equal(daclip[k], np.asarray(v))

  photos = tmp_path / "photos"
  os.makedirs(photos)
  save_photo(photos / "rgb.png", 15, 11, seed=1)
  save_photo(photos / "gray.png", 9, 13, seed=2, mode="L")
  save_photo(photos / "rgba.png", 16, 16, seed=3, mode="RGBA")
  save_photo(photos / "deep.png", 12, 10, seed=4, mode="I;16")
  save_photo(photos / "dot.png", 1, 1, seed=5)
  (photos / "broken.jpg").write_bytes(b"not an image at all")
  (photos / "notes.txt").write_text("not a photo, not listed")
  # A process where importing torch, flax or the model code fails.
  blocked = ("import sys\nfor m in ('torch', 'flax', 'uir_jax.models'): sys.modules[m] = None\n"
             "from uir_jax.main import run; run(sys.argv)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  results = tmp_path / "restored"
  proc = subprocess.run([sys.executable, "-c", blocked, "restore", f"--model={out}",
                         f"--output_dir={results}", "--pad_multiple=16", str(photos)],
                        capture_output=True, text=True, env=env, timeout=600)
  print(proc.stdout[-3000:], proc.stderr[-3000:])
  assert proc.returncode == 1  # the broken file ...
  assert proc.stderr.strip().splitlines()[-1] == (
      "uir-jax restore: 1 of 6 image(s) could not be read or restored")
  assert "Traceback" not in proc.stderr
  assert "5 image(s) restored, 1 failed" in proc.stdout
  for name, size in (("rgb", (11, 15)), ("gray", (13, 9)), ("rgba", (16, 16)), ("deep", (10, 12)),
                     ("dot", (1, 1))):  # ... and the others restored, RGB at their own size
    image = Image.open(results / f"{name}.png")
    assert image.size == size and image.mode == "RGB"
    sidecar = json.load(open(results / f"{name}.json"))  # DA-CLIP's predicted degradation
    assert sidecar["degradation"] in printed_words(proc.stdout, name)
    assert abs(sum(sidecar["probabilities"].values()) - 1) < 1e-4
  # (That the serialized function restores what the Flax model does is
  # test_serialized_function_equals_the_flax_model's job; here the photos are not just copied.)
  rgb = np.asarray(Image.open(photos / "rgb.png").convert("RGB"), np.float32)
  assert np.abs(np.asarray(Image.open(results / "rgb.png"), np.float32) - rgb).mean() > 1


@pytest.mark.torch
def test_restore_cli_reports_the_degradation(tmp_path, files, capsys):
  from uir_jax.preprocess import clip_preprocess
  from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS, classify_degradation

  for folder in ("a", "b"):
    os.makedirs(tmp_path / folder)
  save_photo(tmp_path / "a" / "x.png", 12, 16, seed=1)
  save_photo(tmp_path / "b" / "x.jpg", 12, 16, seed=2)  # the same name from another folder
  save_photo(tmp_path / "b" / "y.png", 12, 16, seed=3)
  out = tmp_path / "out"
  code = _cli("restore", f"--unet={files['cond']}", f"--daclip={files['daclip']}",
              "--num_steps=2", f"--output_dir={out}", tmp_path / "a", tmp_path / "b" / "*.jpg",
              tmp_path / "b" / "y.png")
  printed = capsys.readouterr().out
  assert code in (None, 0), printed
  assert "3 image(s) restored, 0 failed" in printed
  assert sorted(os.listdir(out)) == ["x.json", "x.png", "x_2.json", "x_2.png", "y.json", "y.png"]
  sidecar = json.load(open(out / "x.json"))
  probs = np.array([sidecar["probabilities"][w] for w in DEGRADATION_WORDS])
  photo = np.asarray(Image.open(tmp_path / "a" / "x.png"), np.float32)[None] / 255
  want = np.asarray(classify_degradation(files["daclip_model"], clip_preprocess(photo, 32)))[0]
  np.testing.assert_allclose(probs, want, atol=1e-5)
  assert sidecar["degradation"] == DEGRADATION_WORDS[int(np.argmax(want))]
  assert f"degradation: {sidecar['degradation']}" in printed


@pytest.mark.torch
def test_fixed_size_exports_tile_and_pick_the_smallest_size(tmp_path, files):
  from uir_jax.convert.denoiser import load_denoiser

  out = str(tmp_path / "sized")
  manifest = export.export_checkpoints(files["plain"], None, out, num_steps=2,
                                       sizes=[(16, 16), (24, 32)], tile=16, tile_overlap=4,
                                       platforms=["cpu"])
  specs = {(f["height"], f["width"]): f for f in manifest["functions"]["restore"]}
  assert specs[(16, 16)]["tile"] is None and specs[(24, 32)]["tile"] == 16
  model = export_api.load_export(out)
  # A photo goes to the smallest size that holds it (padded), one larger than all fails.
  assert [model._fit(h, w)[2:] for h, w in ((10, 12), (16, 17), (20, 30))] == [
      (16, 16), (24, 32), (24, 32)]
  lq = np.random.default_rng(2).random((1, 20, 30, 3), np.float32)
  key = jax.random.key(1, impl=THREEFRY)
  got = np.asarray(model(lq, key))  # -> the 24 x 32 function, on 16 x 16 tiles
  padded = np.pad(lq, ((0, 0), (0, 4), (0, 2), (0, 0)), mode="reflect")
  flax = Restorer(load_denoiser(files["plain"]), None, IRSDE(), num_steps=2, tile=16,
                  tile_overlap=4)
  want = np.asarray(flax(padded, key))[:, :20, :30]
  assert got.shape == lq.shape and float(np.abs(got - want).max()) <= TOL
  with pytest.raises(export_api.ExportError, match="larger than every size"):
    model(np.zeros((1, 30, 40, 3), np.float32), key)


@pytest.mark.torch
def test_bad_input_gives_one_line(tmp_path, files, cond_export, capsys):
  photo = save_photo(tmp_path / "p.png", 8, 8)
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "readme.txt").write_text("no photos here")
  truncated = _copy(cond_export, tmp_path / "truncated")
  with open(os.path.join(truncated, "daclip.safetensors"), "r+b") as f:
    f.truncate(1000)
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "keep.txt").write_text("someone's files")
  unet, daclip = f"--unet={files['cond']}", f"--daclip={files['daclip']}"
  cases = [
      (["restore", unet, daclip, tmp_path / "missing.png"], "not found: "),
      (["restore", unet, daclip, tmp_path / "empty"], "no photos"),
      (["restore", unet, daclip, tmp_path / "*.webp"], "no file matches"),
      (["restore", unet, daclip], "give the photos"),
      (["restore", photo], "needs --unet"),
      (["restore", f"--unet={tmp_path / 'nope.pth'}", photo], "not found"),
      (["restore", f"--unet={photo}", photo], "cannot load the checkpoints"),
      (["restore", unet, photo], "give its --daclip"),
      (["restore", f"--model={cond_export}", unet, photo], "not both"),
      (["restore", f"--model={tmp_path / 'empty'}", photo], "not a uir-jax export"),
      (["restore", f"--model={truncated}", photo], "daclip.safetensors is truncated"),
      (["restore", f"--model={cond_export}", "--num_steps=5", photo], "part of the export"),
      (["restore", unet, daclip, "--tile=8", "--tile_overlap=8", photo],
       "must be smaller than --tile"),
      (["export", unet, daclip], "needs --out"),
      (["export", unet, f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}"], "either --unet"),
      (["export", f"--unet={tmp_path / 'nope.pth'}", f"--out={tmp_path / 'x'}"], "not found"),
      (["export", unet, daclip, f"--out={tmp_path / 'x'}", "--sizes=256"], "--sizes"),
      (["export", unet, daclip, f"--out={tmp_path / 'x'}", "--tile=64"], "--tile needs --sizes"),
      (["export", unet, daclip, f"--out={tmp_path / 'x'}", "--platforms=gpu"], "--platforms"),
      (["export", unet, f"--out={tmp_path / 'x'}"], "give its DA-CLIP"),
      (["export", f"--unet={photo}", f"--out={tmp_path / 'x'}"], "Error"),
      (["export", f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'x'}"],
       "not a training run"),
      (["export", unet, daclip, f"--out={tmp_path / 'full'}"], "not an export"),
  ]
  for args, expected in cases:
    code = _cli(*args)
    assert isinstance(code, str) and "\n" not in code, (args, code)
    assert code.startswith(f"uir-jax {args[0]}: ") and expected in code, (args, code)
  assert os.listdir(tmp_path / "full") == ["keep.txt"]  # refused, untouched
  assert not os.path.exists(tmp_path / "x")

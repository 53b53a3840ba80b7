"""Restoring with a training run of ours (`restorers.load_run`, `uir-jax restore --run`), and
exporting direct NAFNet regression runs (with or without DA-CLIP, whatever CLIP view they read):
the export restores what the run's Flax restorer does, and DA-CLIP runs once per photo."""

import json
import os

import jax
import numpy as np
import pytest
from export_fixtures import save_photo
from PIL import Image

from uir_jax import export as export_api
from uir_jax.systems.daclip_uir import conditioning, export_spec, restorers

TOL = 1e-4  # float restorations of the same weights by Flax and by the serialized function


def _nafnet_run(workdir, view: str | None):
  """A `configs/quickstart.py:tiny` stage-2 (NAFNet + DA-CLIP) run's workdir after one step, made
  with the trainer's own pieces (config writer, state layout, Checkpointer) without the data
  pipeline; `view`: the DA-CLIP's view ("windows", "crop", "resize"), None: no DA-CLIP. The EMA
  differs from the parameters, so restoring with the wrong ones is caught."""
  from configs import quickstart
  from uir_jax.systems.daclip_uir import nafnet
  from uir_jax.train import loop

  config = quickstart.get_config("tiny").stage2
  config.total_steps, config.checkpoint_every = 1, 1
  if view is None:
    config.model.update(use_degra_context=False, use_image_context=False)
    config.daclip.checkpoint, config.daclip.windows, config.data.clip_lq = "", False, False
  else:
    config.daclip.checkpoint = "random:tiny-p4"
    config.daclip.windows = view == "windows"
    if view != "windows":
      config.data.clip_view = view
  loop.write_config(config, str(workdir))
  stage = nafnet.make_stage(config)
  _, init = loop.init_state_fn(stage)
  state = jax.jit(init)()
  state = dict(state, step=state["step"] + 1,
               ema=jax.tree.map(lambda p: p * 0.5 + 0.01, state["params"]))
  ckpt = loop.Checkpointer(str(workdir), save_every=1, total_steps=1, async_save=False)
  assert ckpt.maybe_save(1, state)
  ckpt.close()
  return config, state, stage.aux


def _photo(seed=0, h=40, w=52):
  return jax.random.uniform(jax.random.key(seed), (1, h, w, 3))


@pytest.mark.slow
@pytest.mark.parametrize("view", ["windows", "crop", None])
def test_regression_run_restores_and_exports(tmp_path, view):
  from flax import nnx

  from uir_jax.convert.common import flat_params

  workdir, out = tmp_path / "run", tmp_path / "export"
  config, state, frozen = _nafnet_run(workdir, view)
  restorer = restorers.load_run(str(workdir))
  assert isinstance(restorer, restorers.RegressionRestorer)
  for k, v in flat_params(nnx.state(restorer.net, nnx.Param)).items():  # the EMA weights
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_params(state["ema"])[k]))
  lq = _photo()
  emb = restorer.embed(lq)
  restored = np.asarray(restorer(lq, None, emb))
  assert restored.shape == lq.shape and 0 <= restored.min() and restored.max() <= 1
  if view is None:
    assert emb == {} and restorer.words == []
  else:
    # The run's words, and the embeddings of the view it trained on: what the trainer computes
    # from the same view (the pipeline's crop / the LQ's windows) with its frozen DA-CLIP.
    assert restorer.words == [name for name, _ in config.data.tasks]
    model = nnx.merge(nnx.graphdef(restorer.daclip), frozen)
    if view == "windows":
      content, degra = conditioning.daclip_embed(model, None, lq, windows=True)
    else:
      from uir_jax.preprocess import crop_view

      content, degra = conditioning.daclip_embed(model, crop_view(lq, 32))
    np.testing.assert_allclose(np.asarray(emb["content"]), np.asarray(content), atol=1e-5)
    np.testing.assert_allclose(np.asarray(emb["degradation"]), np.asarray(degra), atol=1e-5)
    direct = restorer.net(lq, text_context=degra, image_context=content)
    np.testing.assert_allclose(restored, np.clip(np.asarray(direct), 0, 1), atol=1e-5)

  manifest = export_spec.export_training_run(str(workdir), str(out), platforms=["cpu"])
  assert manifest["restorer"] == "regression" and manifest["sde"] is None
  assert manifest["sources"]["weights"] == "ema"
  model = export_api.load_export(str(out))
  got = np.asarray(model(np.asarray(lq), 0))
  np.testing.assert_allclose(got, restored, atol=TOL)
  if view is not None:
    assert manifest["functions"]["embed"]["view"] == view and model.words == restorer.words
    exported = model.embed(np.asarray(lq))
    for k in ("content", "degradation", "probabilities"):
      np.testing.assert_allclose(np.asarray(exported[k]), np.asarray(emb[k]), atol=TOL)


@pytest.mark.slow
def test_restore_run_runs_daclip_once_per_photo(tmp_path, monkeypatch, capsys):
  """`uir-jax restore --run` and `--model`: one DA-CLIP embedding per photo feeds both the
  restorer and the printed degradation."""
  from tests.export.test_export_model import _cli

  workdir = tmp_path / "run"
  _nafnet_run(workdir, "windows")
  photos = tmp_path / "photos"
  os.makedirs(photos)
  for i in range(3):
    save_photo(photos / f"p{i}.png", 36 + 4 * i, 40, seed=i)
  calls = []
  embed = conditioning.Conditioning.embed
  monkeypatch.setattr(conditioning.Conditioning, "embed",
                      lambda self, images: calls.append(images.shape) or embed(self, images))
  assert _cli("restore", f"--run={workdir}", f"--output_dir={tmp_path / 'out'}",
              str(photos)) in (None, 0)
  assert len(calls) == 3
  printed = capsys.readouterr().out
  for i in range(3):
    sidecar = json.load(open(tmp_path / "out" / f"p{i}.json"))
    assert f"degradation: {sidecar['degradation']} (" in printed
  # The same with an export of the run: its embed function once per photo.
  from uir_jax.export.reader import ExportedModel

  assert _cli("export", f"--workdir={workdir}", f"--out={tmp_path / 'e'}",
              "--platforms=cpu") in (None, 0)
  assert "direct regression" in capsys.readouterr().out
  exported_calls = []
  exported_embed = ExportedModel.embed
  monkeypatch.setattr(ExportedModel, "embed", lambda self, images: exported_calls.append(1)
                      or exported_embed(self, images))
  assert _cli("restore", f"--model={tmp_path / 'e'}", f"--output_dir={tmp_path / 'out2'}",
              str(photos)) in (None, 0)
  assert len(exported_calls) == 3
  for i in range(3):  # the export restores what the run does, to 8-bit rounding
    a = np.asarray(Image.open(tmp_path / "out" / f"p{i}.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "out2" / f"p{i}.png"), np.int16)
    assert np.abs(a - b).max() <= 1


def test_restore_run_refuses_what_holds_no_restorer(tmp_path):
  from tests.export.test_export_model import _cli

  (tmp_path / "daclip_run").mkdir()
  json.dump({"trainer": "daclip", "data": {}, "daclip": {}},
            open(tmp_path / "daclip_run" / "config.json", "w"))
  photo = save_photo(tmp_path / "p.png", 8, 8)
  code = _cli("restore", f"--run={tmp_path / 'nowhere'}", str(photo))
  assert code == f"uir-jax restore: file(s) not found: {tmp_path / 'nowhere'}"
  code = _cli("restore", f"--run={tmp_path / 'daclip_run'}", str(photo))
  assert isinstance(code, str) and code.startswith("uir-jax restore: ") and "\n" not in code
  assert "holds no restorer" in code or "checkpoint" in code, code
  code = _cli("restore", f"--run={tmp_path / 'daclip_run'}", f"--model={tmp_path}", str(photo))
  assert "give one of --model" in code

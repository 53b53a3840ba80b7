"""`uir-jax export`: write a self-describing model directory (manifest.json, weights as
.safetensors and orbax, serialized restore functions that run without torch or the model code).

  uir-jax export --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --out EXPORT_DIR
                 [--num_steps 20] [--sizes 256x256,512x384] [--platforms cpu,cuda,tpu]
  uir-jax export --workdir RUN --out EXPORT_DIR [--step N]
  uir-jax export --checkpoint NAFNetRefFusion.pth --out EXPORT_DIR --sizes 720x1280
                 [--guidance_sizes 512x512]     (TextualDegRemoval's guided restoration)
"""

from __future__ import annotations

import os

from absl import flags, logging

from uir_jax.cli.common import FLAGS, check_tiling, failer

flags.DEFINE_string("out", None, "export: the directory to write (an earlier export there is "
                    "replaced; any other non-empty directory is refused).")
flags.DEFINE_string("sizes", None, "export: HxW sizes (e.g. 256x256,512x384) to export fixed-size "
                    "restore functions for (tiled with --tile); default: one function for any "
                    "size (whole images, padded to the model's multiple).")
flags.DEFINE_string("guidance_sizes", "512x512", "export --checkpoint (TextualDegRemoval): "
                    "guidance HxW sizes; one function per (photo size, guidance size) pair, each "
                    "rounded up to the network's multiple (128).")
flags.DEFINE_string("platforms", "cpu,cuda,tpu", "export: platforms the functions are lowered "
                    "for (cpu, cuda, rocm, tpu).")


def main(argv):
  fail = failer("export")
  if len(argv) > 1:
    fail(f"takes no positional arguments, got {argv[1:]}")
  if not FLAGS.out:
    fail("needs --out DIR (the export directory to write)")
  if FLAGS.checkpoint:
    _export_guided(fail)
    return
  if bool(FLAGS.workdir) == bool(FLAGS.unet):
    fail("give either --unet [--daclip] (checkpoints) or --workdir (a training run of ours)")
  if FLAGS.workdir and FLAGS.daclip:
    fail("--workdir exports the run's own DA-CLIP (its config's daclip.checkpoint); drop --daclip")
  missing = [p for p in [FLAGS.unet, FLAGS.daclip, FLAGS.workdir] if p and not os.path.exists(p)]
  if missing:
    fail(f"not found: {', '.join(missing)}")
  from uir_jax.export import ExportError, parse_sizes
  from uir_jax.systems.daclip_uir.export_spec import export_checkpoints, export_training_run

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
  check_tiling(fail)
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
  print(summary(FLAGS.out, manifest))


def summary(out: str, manifest: dict) -> str:
  """One line saying what an export holds."""
  size = sum(f["bytes"] for f in manifest["files"].values())
  shapes = ", ".join("any size" if f["height"] is None else f"{f['height']}x{f['width']}"
                     for f in manifest["functions"]["restore"])
  daclip = "with DA-CLIP" if manifest["daclip"] else "no DA-CLIP"
  sampler = manifest["sampler"]
  if manifest.get("sde"):
    how = f"{sampler['mode']} sampler, {sampler['num_steps'] or manifest['sde']['T']} steps"
  else:
    how = "direct regression"
  return (f"{out}: {manifest['denoiser']['class']} ({daclip}), {how}, restore function for "
          f"{shapes} on {', '.join(manifest['platforms'])}; {size / 2**20:.1f} MiB, model "
          f"{manifest['model_id'][:12]}")


def _export_guided(fail) -> None:
  """`--checkpoint`: an official guided (TextualDegRemoval) checkpoint, for listed sizes."""
  if FLAGS.unet or FLAGS.daclip or FLAGS.workdir:
    fail("--checkpoint exports a guided checkpoint alone: drop --unet / --daclip / --workdir")
  if not os.path.exists(FLAGS.checkpoint):
    fail(f"not found: {FLAGS.checkpoint}")
  if not FLAGS.sizes:
    fail("a guided export needs --sizes (photo HxW sizes): its matcher takes no symbolic sizes")
  from uir_jax.export import ExportError, parse_sizes
  from uir_jax.systems.textual_deg_removal.export_spec import export_checkpoint

  try:
    sizes = parse_sizes(FLAGS.sizes)
    guidance_sizes = parse_sizes(FLAGS.guidance_sizes)
  except ValueError as e:
    fail(f"--sizes / --guidance_sizes: {e}")
  platforms = [p.strip() for p in FLAGS.platforms.split(",") if p.strip()]
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    manifest = export_checkpoint(FLAGS.checkpoint, FLAGS.out, sizes=sizes,
                                 guidance_sizes=guidance_sizes, platforms=platforms,
                                 trust=FLAGS.trust_checkpoint)
  except ExportError as e:
    fail(e)
  except Exception as e:  # noqa: BLE001 - a wrong or corrupt checkpoint: say which
    fail(f"{type(e).__name__}: {e}")
  finally:
    logging.set_verbosity(verbosity)
  shapes = ", ".join(f"{f['height']}x{f['width']} (guidance {f['guidance_height']}x"
                     f"{f['guidance_width']})" for f in manifest["functions"]["restore"])
  print(f"{FLAGS.out}: {manifest['denoiser']['class']}, guided restore function for {shapes} "
        f"on {', '.join(manifest['platforms'])}; model {manifest['model_id'][:12]}")

"""Flags more than one command reads, and the one-line failure every command ends with."""

from __future__ import annotations

import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for summaries, checkpoints and images.")
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
flags.DEFINE_integer("step", None, "export --workdir / restore --run: the checkpoint step "
                     "(default: the latest).")
flags.DEFINE_integer("tile", 512, "Run the denoiser on tiles of at most this many pixels per side, "
                     "blended over --tile_overlap pixels at every step: bounded memory for any "
                     "image size; smaller images are unaffected. 0: whole images.", lower_bound=0)
flags.DEFINE_integer("tile_overlap", 64, "Pixels shared by neighbouring tiles.", lower_bound=0)
flags.DEFINE_integer("pad_multiple", 1, "Reflect-pad each photo to a multiple of this (e.g. 64) "
                     "and crop back: photos of many sizes then share compiled samplers instead of "
                     "compiling once per size; 1: exact sizes.", lower_bound=1)
flags.DEFINE_bool("trust_checkpoint", False, "Load PyTorch checkpoints whose pickle needs more "
                  "than data (tensors, numpy scalars) with plain pickle: this RUNS CODE FROM THE "
                  "FILE; only for files whose source you trust. Default: such files are refused. "
                  "train: sets --config.trust_checkpoint.")
flags.DEFINE_string("guidance", None, "restore / eval (TextualDegRemoval): the folder of guidance "
                    "images, one per photo with its file name (any extension; eval: also "
                    "<guidance>/<set>/). Any size: used whole at its own resolution, zero-padded "
                    "to the network's multiple (128). A photo without one is skipped and counted.")
flags.DEFINE_string("checkpoint", None, "restore / eval / export (TextualDegRemoval): an official "
                    "guided-restoration checkpoint (NAFNetRefFusion .pth, or its .safetensors); "
                    "needs --guidance.")
flags.DEFINE_integer("tile_batch", 1, "Tiles per denoiser call (faster on an accelerator, more "
                     "memory).", lower_bound=1)


def failer(command: str):
  """fail(message): bad input ends with one line on stderr (exit status 1), never a traceback
  or a usage dump; multi-line messages (a converter's list of mismatched keys) are joined."""
  def fail(message):
    from uir_jax.photos import one_line

    sys.exit(f"uir-jax {command}: " + one_line(message))

  return fail


def check_tiling(fail) -> None:
  if FLAGS.tile and FLAGS.tile_overlap >= FLAGS.tile:
    fail(f"--tile_overlap ({FLAGS.tile_overlap}) must be smaller than --tile ({FLAGS.tile})")


def checkpoint_restorer():
  """The diffusion restorer the --unet / --daclip / sampler / tiling flags describe."""
  from uir_jax.systems.daclip_uir.restorers import DiffusionRestorer

  return DiffusionRestorer.from_checkpoints(
      FLAGS.daclip, FLAGS.unet, mode=FLAGS.mode, num_steps=FLAGS.num_steps,
      tile=FLAGS.tile or None, tile_overlap=FLAGS.tile_overlap, tile_batch=FLAGS.tile_batch,
      pad_multiple=FLAGS.pad_multiple, trust=FLAGS.trust_checkpoint)


def guided_source(fail, *, run: str | None = None, model: str | None = None) -> bool:
  """Whether the model the flags name is a guided (TextualDegRemoval) one: --checkpoint, a
  trainer "tdr" run, or an export of that system (its manifest's `system`)."""
  if FLAGS.checkpoint:
    return True
  if run:
    from uir_jax.systems.textual_deg_removal.restore import TRAINER, run_trainer

    return run_trainer(run) == TRAINER
  if model:
    from uir_jax.export import ExportError, read_manifest

    try:
      return read_manifest(model).get("system") == GUIDED_SYSTEM
    except ExportError as e:
      fail(e)
  return False


GUIDED_SYSTEM = "textual_deg_removal"


def guidance_index(fail) -> dict[str, str]:
  """The --guidance folder's {stem: path}; a missing / empty folder ends with one line."""
  from uir_jax.photos import index_guidance

  try:
    return index_guidance(FLAGS.guidance)
  except ValueError as e:
    fail(e)

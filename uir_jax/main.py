r"""The `uir-jax` command.

  uir-jax train --config configs/irsde_quickstart.py[:variant] --workdir DIR [--config.k=v ...]

Commands:
  train   train the model described by an ml_collections config (see configs/*.py docstrings).
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


def _train(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("train needs --config and --workdir")
  _hide_accelerators_from_tf()
  from uir_jax.train import restoration

  metrics = restoration.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("final metrics: %s", metrics)
  print({k: round(v, 3) for k, v in metrics.items()})


def _hide_accelerators_from_tf():
  """tf.data must not grab GPU memory that JAX needs (big_vision does the same)."""
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass


COMMANDS = {"train": _train}


def run(argv: list[str] | None = None) -> None:
  """Console entry point: `uir-jax <command> [flags]`."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help", "help") else 2)
  command = argv.pop(1)
  app.run(COMMANDS[command], argv=argv)


if __name__ == "__main__":
  run()

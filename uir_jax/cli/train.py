"""`uir-jax train --config configs/X.py[:variant] --workdir DIR [--config.k=v ...]`."""

from __future__ import annotations

import os
import sys

from absl import app, logging
from ml_collections import config_flags

from uir_jax.cli.common import FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/irsde_quickstart.py or ...py:tiny.",
    lock_config=True)


def main(argv):
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

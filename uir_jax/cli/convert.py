"""`uir-jax convert CHECKPOINT.pt[h] OUT.safetensors [--kind daclip|clip|denoiser|lpips]`."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from uir_jax.cli.common import FLAGS

flags.DEFINE_enum("kind", None, ["daclip", "clip", "denoiser", "lpips"],
                  "convert: the model in the checkpoint (default: told from its keys).")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("convert needs CHECKPOINT and OUT.safetensors")
  from uir_jax.convert.common import one_line
  from uir_jax.convert.to_safetensors import to_safetensors

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

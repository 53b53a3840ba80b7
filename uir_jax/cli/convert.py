"""`uir-jax convert CHECKPOINT.pt[h] OUT.safetensors [--kind daclip|clip|denoiser|lpips]`."""

from __future__ import annotations

import os

from absl import app, flags

from uir_jax.cli.common import FLAGS

flags.DEFINE_enum("kind", None, ["daclip", "clip", "denoiser", "lpips"],
                  "convert: the model in the checkpoint (default: told from its keys).")


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("convert needs CHECKPOINT and OUT.safetensors")
  from uir_jax.convert.to_safetensors import to_safetensors

  src, dest = argv[1], argv[2]
  if not os.path.isfile(src):
    raise app.UsageError(f"file not found: {src}")
  if not dest.endswith(".safetensors"):
    raise app.UsageError(f"the output must end in .safetensors, got {dest}")
  kind = to_safetensors(src, dest, FLAGS.kind)
  print(f"{src} -> {dest} ({kind}, {os.path.getsize(dest) / 2**20:.1f} MiB)")

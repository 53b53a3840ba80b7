"""The export format: file names, the manifest, checks shared by the writer and the reader.

An export directory holds:

  manifest.json          what the export is: architecture options, the restorer kind (diffusion
                         with its SDE and sampler, or regression), the preprocessing (the CLIP view
                         the DA-CLIP reads), the sources (paths and sha256), versions, and every
                         file of the directory with its size and sha256
  denoiser.safetensors   the restoring network's variables, flat "a.b.0.kernel" names (Flax layout)
  daclip.safetensors     the DA-CLIP's variables, when the model is DA-CLIP-conditioned
  orbax/                 the same variables as an orbax checkpoint {"denoiser", "daclip"}, for
                         reloading into Flax or fine-tuning
  restore*.jaxexport     the serialized (`jax.export`, StableHLO) restore function:
                         (network variables, lq, key data, contexts) -> restored
  embed.jaxexport        DA-CLIP's part: its view(s) of the photo -> content, degradation and the
                         zero-shot probabilities over the degradation words

numpy, jax and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "uir-jax export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENOISER_FILE = "denoiser.safetensors"
DACLIP_FILE = "daclip.safetensors"
EMBED_FILE = "embed.jaxexport"
ORBAX_DIR = "orbax"
PRNG_IMPL = "threefry2x32"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
  """An export directory that cannot be used: names the file and the problem, in one line."""


# ----------------------------------------------------------------------------------------------
# Small helpers shared by writing and reading.
# ----------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _params_id(flat: Mapping[str, np.ndarray]) -> str:
  """A content hash of a set of named arrays (names, dtypes, shapes and bytes, in name order)."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _one_line(message: Any) -> str:
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def parse_sizes(text: str) -> list[tuple[int, int]]:
  """"256x256,512x384" -> [(256, 256), (512, 384)] as (height, width)."""
  sizes = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    h, sep, w = item.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
      raise ValueError(f"sizes must look like 256x256,512x384 (height x width), got {item!r}")
    sizes.append((int(h), int(w)))
  if not sizes:
    raise ValueError("no size given")
  return sizes


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of an export directory, checked for format and version."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise ExportError(f"{directory}: no such export directory")
  if not os.path.isfile(path):
    hint = (" (a training run: export it with `uir-jax export --workdir`)"
            if os.path.isfile(os.path.join(directory, "config.json")) else "")
    raise ExportError(f"{directory}: not a uir-jax export (no {MANIFEST}){hint}")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{path}: unreadable manifest ({_one_line(e)})") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{path}: not a uir-jax export manifest")
  version = manifest.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ExportError(f"{directory}: export format {version} is newer than this uir-jax reads "
                      f"({FORMAT_VERSION}): update uir-jax")
  return manifest


def _check_file(directory: str, manifest: dict, name: str, *, hash_it: bool) -> str:
  entry = manifest.get("files", {}).get(name)
  path = os.path.join(directory, name)
  if entry is None:
    raise ExportError(f"{directory}: the manifest lists no {name}")
  if not os.path.isfile(path):
    raise ExportError(f"{directory}: {name} is missing (incomplete copy?)")
  size = os.path.getsize(path)
  if size != entry["bytes"]:
    raise ExportError(f"{directory}: {name} is truncated or altered ({size} bytes, the manifest "
                      f"says {entry['bytes']})")
  if hash_it and _sha256(path) != entry["sha256"]:
    raise ExportError(f"{directory}: {name} does not match the manifest (sha256 differs): it is "
                      f"from another export or was modified")
  return path


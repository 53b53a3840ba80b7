"""Writing an export, for every system: the system builds its manifest fields and serialized
functions (`jax.export`) and hands them here with its parts' weights; this writes the
`.safetensors` files, the orbax copy and the manifest, atomically (see `manifest.py` for the
layout).

    write_export(out_dir, manifest, parts={"denoiser": flat, "daclip": flat2},
                 functions={"restore.jaxexport": exported, ...})
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from uir_jax.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ORBAX_DIR,
    PRNG_IMPL,
    ExportError,
    _sha256,
)

Array = jax.Array


def _flat_numpy(state: Any) -> dict[str, np.ndarray]:
  from uir_jax.convert.common import flat_params

  return {k: np.array(v, order="C") for k, v in flat_params(state).items()}


def _state_from_flat(template: Any, flat: Mapping[str, Array]) -> Any:
  """An nnx.State shaped like `template` holding the arrays of `flat` (traceable)."""
  from flax import nnx

  from uir_jax.convert.common import unflatten

  state = jax.tree.map(lambda x: x, template)  # a fresh tree: the template is never modified
  nnx.replace_by_pure_dict(state, unflatten(dict(flat)))
  return state


def export_jitted(fn: Any, platforms: Any, *args: Any) -> jax.export.Exported:
  """`jax.export` of `jax.jit(fn)` for `platforms` on abstract `args`, traced with the original
  formulations (`layers.formulation_override(False)`): an export runs anywhere, and the CPU-only
  formulations only speed up training's backward pass."""
  from uir_jax.models.layers import formulation_override

  with formulation_override(False):
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def _set_attention_impl(model: Any, impl: str) -> None:
  """Every attention of `model` uses `impl` (symbolic shapes cannot pick one by size)."""
  from flax import nnx

  from uir_jax.models.layers import CrossAttention

  for _, module in nnx.iter_modules(model):
    if isinstance(module, CrossAttention):
      module.impl = impl


def _nested(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{"a.b.0.kernel": x} -> {"a": {"b": {"0": {"kernel": x}}}} (string keys, as orbax wants)."""
  root: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = root
    *parents, last = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return root


def _abstract(flat: Mapping[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}


def _check_out_dir(out_dir: str) -> None:
  """An existing export may be replaced; any other non-empty path is refused (never clobbered)."""
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise ExportError(f"{out_dir} exists and is not a directory")
  if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
    raise ExportError(f"{out_dir} exists, is not empty and is not an export: choose another "
                      f"--out (nothing was written)")


def _file_entries(directory: str) -> dict[str, dict[str, Any]]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory).replace(os.sep, "/")
      if rel != MANIFEST:
        out[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
  return dict(sorted(out.items()))


def _source_file(path: str) -> dict[str, Any]:
  return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, np.generic):
    return tree.item()
  return tree



def write_export(out_dir: str, manifest: dict[str, Any], parts: Mapping[str, dict[str, Any]],
                 functions: Mapping[str, Any]) -> dict[str, Any]:
  """Writes an export to `out_dir` (an earlier export there is replaced; any other non-empty
  directory is refused); returns the manifest as written.

  Args:
    manifest: the system's fields; the format, version, creation time, PRNG and file list are
      added here.
    parts: part name -> {"file": "<part>.safetensors", "flat": {name: array}, "model_id": ...,
      "params_id": ...}; each is saved as safetensors (with its ids as metadata) and, all together,
      as one orbax tree {part: nested arrays}.
    functions: file name -> `jax.export.Exported`, serialized next to the weights.
  """
  import uir_jax

  _check_out_dir(out_dir)
  manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "versions": {"uir_jax": uir_jax.__version__, "jax": jax.__version__},
              "prng_impl": PRNG_IMPL, **manifest}
  # Everything is written next to the destination and moved in at the end, so an interrupted
  # export never leaves a half-written directory under the final name.
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.abspath(out_dir) + ".tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    from safetensors.numpy import save_file

    from uir_jax.checkpoint import save_tree

    tree = {}
    for part, spec in parts.items():
      meta = {"format": FORMAT, "model_id": manifest["model_id"], "part": part,
              "params_id": spec["params_id"]}
      save_file(spec["flat"], os.path.join(tmp, spec["file"]), metadata=meta)
      tree[part] = _nested(spec["flat"])
    save_tree(os.path.join(tmp, ORBAX_DIR), tree)
    for name, exp in functions.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(exp.serialize())
    manifest["files"] = _file_entries(tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
      f.write("\n")
    if os.path.exists(out_dir):  # an earlier export (checked above): replaced whole
      old = os.path.abspath(out_dir) + ".old-export"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(out_dir, old)
      os.replace(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest

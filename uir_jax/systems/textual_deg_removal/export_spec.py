"""What an export of TextualDegRemoval's guided restoration holds (`uir_jax.export` format):
the guided network's weights and `restore(params, lq, key_data, contexts, guidance)` for listed
sizes, read back without flax by `uir_jax.export.load_export` (`model(lq, guidance=g)`).

    export_guided(net, "exports/tdr", sizes=[(256, 256)], guidance_sizes=[(512, 512)])
    export_checkpoint("NAFNetRefFusion.pth", "exports/tdr", sizes=[(720, 1280)])

Sizes are listed, not symbolic: the matcher's geometry (blocks per side, the guidance block's
diameter) is Python arithmetic on the padded sizes, so every (photo size, guidance size) pair is
its own program. Each listed size is rounded up to the network's multiple (128 for the released
configs: the network zero-pads there itself); one function is exported per pair. The reader
zero-pads a photo to the smallest exported photo size that holds it and its guidance to the
smallest exported guidance size (of that photo size) that holds it; the result is the network's
on those zero-padded inputs, cropped, which equals the network on the photo itself whenever the
exported sizes are the photo's and guidance's own sizes rounded up to the multiple.

`key_data` and `contexts` are unused (the signature of the other systems' functions, so one
reader serves all); the manifest says `"system": "textual_deg_removal"`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from uir_jax.export.manifest import DEFAULT_PLATFORMS, DENOISER_FILE, ExportError, _one_line
from uir_jax.export.writer import (
    _abstract,
    _check_out_dir,
    _flat_numpy,
    _source_file,
    _state_from_flat,
    export_jitted,
    write_export,
)

SYSTEM = "textual_deg_removal"
DEFAULT_GUIDANCE_SIZES = ((512, 512),)  # the official guidance: 512² of the photo's centre

__all__ = ["DEFAULT_GUIDANCE_SIZES", "SYSTEM", "export_checkpoint", "export_guided"]


def _round_up(size: tuple[int, int], m: int) -> tuple[int, int]:
  return (int(size[0]) + (-int(size[0]) % m), int(size[1]) + (-int(size[1]) % m))


def export_guided(net: Any, out_dir: str, *, sizes: Sequence[tuple[int, int]],
                  guidance_sizes: Sequence[tuple[int, int]] = DEFAULT_GUIDANCE_SIZES,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS, spec: dict | None = None,
                  sources: dict | None = None) -> dict[str, Any]:
  """Exports a guided network `net(lq, guidance)`; returns the manifest (see the module doc).
  `spec`: {"name", "options"} describing how to rebuild it (recorded, not needed to run)."""
  from flax import nnx

  if not sizes:
    raise ExportError("a guided export needs photo sizes (--sizes 256x256,...): its matcher "
                      "cannot take symbolic sizes")
  if not guidance_sizes:
    raise ExportError("guidance_sizes is empty")
  _check_out_dir(out_dir)
  m = int(getattr(net, "pad_multiple", 1))
  photo_sizes = sorted({_round_up(s, m) for s in sizes})
  ref_sizes = sorted({_round_up(s, m) for s in guidance_sizes})
  graphdef, state = nnx.split(net)
  flat = _flat_numpy(state)
  from uir_jax.export.manifest import _params_id

  params_id = _params_id(flat)

  def restore(params, lq, key_data, contexts, guidance):
    del key_data, contexts
    model = nnx.merge(graphdef, _state_from_flat(state, params))
    return jnp.clip(model(lq, guidance), 0.0, 1.0)

  (b,) = jax.export.symbolic_shape("b")
  exported, specs = {}, []
  key_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
  for h, w in photo_sizes:
    for hg, wg in ref_sizes:
      name = f"restore_{h}x{w}_g{hg}x{wg}.jaxexport"
      try:
        exported[name] = export_jitted(
            restore, platforms, _abstract(flat), jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
            key_spec, {}, jax.ShapeDtypeStruct((b, hg, wg, 3), jnp.float32))
      except Exception as e:  # noqa: BLE001 - say which pair failed
        raise ExportError(f"cannot export the guided restore function for a {h}x{w} photo and "
                          f"a {hg}x{wg} guidance: {type(e).__name__}: "
                          f"{_one_line(e)[:500]}") from e
      specs.append({"file": name, "height": h, "width": w, "guidance_height": hg,
                    "guidance_width": wg, "multiple": None, "tile": None, "takes_size": False,
                    "takes_guidance": True, "denoiser_id": params_id})
  options = dict((spec or {}).get("options", {}))
  manifest = {
      "system": SYSTEM,
      "platforms": list(platforms),
      "model_id": hashlib.sha256(f"{SYSTEM}|{params_id}".encode()).hexdigest(),
      "restorer": "guided regression",
      "denoiser": {"name": (spec or {}).get("name", type(net).__name__), "options": options,
                   "class": type(net).__name__, "params_id": params_id, "file": DENOISER_FILE,
                   "pad_multiple": m},
      "daclip": None,
      "contexts": [],
      "sde": None,
      "sampler": {"mode": "regression", "num_steps": None, "clip_x0": False},
      "preprocessing": {
          "input": "float32 RGB [B, H, W, 3] in [0, 1] (8-bit photos / 255), and the guidance "
                   "[B, Hg, Wg, 3] likewise (any size; used whole at its own resolution)",
          "pad": {"mode": "zeros", "sides": "bottom and right",
                  "to": "the smallest exported size that holds the photo (and, of that photo "
                        "size, the guidance)"},
          "output": "float32 [B, H, W, 3] clipped to [0, 1], cropped to the input size",
          "clip_view": None,
      },
      "functions": {"restore": specs, "embed": None},
      "sources": dict(sources or {}),
  }
  parts = {"denoiser": {"file": DENOISER_FILE, "flat": flat, "params_id": params_id}}
  return write_export(out_dir, manifest, parts, exported)


def export_checkpoint(path: str, out_dir: str, *, trust: bool = False, **kwargs
                      ) -> dict[str, Any]:
  """Exports an official guided checkpoint (`NAFNetRefFusion`); `kwargs` as `export_guided`."""
  from uir_jax.convert.common import checkpoint_errors, read_state_dict
  from uir_jax.systems.textual_deg_removal.convert import infer_options, load_guided_nafnet

  with checkpoint_errors(path):
    sd = read_state_dict(path, trust=trust)
    net = load_guided_nafnet(sd)
    from uir_jax.convert.common import unwrap_network

    options = infer_options(unwrap_network(sd, ("params", "params_ema", "state_dict")))
  spec = {"name": "guided_nafnet", "options": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in options.items()}}
  return export_guided(net, out_dir, spec=spec, sources={"checkpoint": _source_file(path)},
                       **kwargs)

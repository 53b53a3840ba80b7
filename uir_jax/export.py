"""Self-describing model exports: a restore function that runs without torch or the model code.

    export_checkpoints("universal-ir.pth", "daclip_ViT-B-32.pt", "exports/universal-ir")
    export_training_run("runs/universal-ir", "exports/mine")         # its EMA weights + config
    model = load_export("exports/universal-ir")    # numpy + jax (+ safetensors) only
    restored = model(lq, jax.random.key(0, impl="threefry2x32"))   # [B, H, W, 3] in [0, 1]
    probs = model.embed(lq)["probabilities"]      # zero-shot degradation readout (DA-CLIP only)

An export directory holds:

  manifest.json          what the export is: architecture options, SDE and sampler settings, the
                         preprocessing, the sources (paths and sha256), versions, and every file
                         of the directory with its size and sha256
  denoiser.safetensors   the denoiser's variables, flat "a.b.0.kernel" names (Flax layout)
  daclip.safetensors     the DA-CLIP's variables, when the model is DA-CLIP-conditioned
  orbax/                 the same variables as an orbax checkpoint {"denoiser", "daclip"}, for
                         reloading into Flax (`load_flax`) or fine-tuning
  restore*.jaxexport     the serialized (`jax.export`, StableHLO) restore function:
                         (denoiser variables, lq, key data, contexts) -> restored
  embed.jaxexport        DA-CLIP's part: CLIP view [B, S, S, 3] -> content, degradation and the
                         zero-shot probabilities over the degradation words

The restore function is shape-polymorphic in batch, height and width, for heights and widths that
are multiples of the denoiser's padding multiple (2^levels); the loader reflect-pads each photo on
the bottom/right to that multiple and crops the result back (as `Restorer(pad_multiple=...)`).
Polymorphic shapes rule out the pieces that need static sizes, so such exports run whole images
(no tiling) with plain attention. With `sizes=[(h, w), ...]` one function per size is exported
instead (batch still polymorphic), with tiling and the model's size-dependent attention; photos
are padded to the smallest exported size that holds them.

The weights are arguments of the serialized functions, not constants in them, so the functions
stay small and the same `.safetensors` files serve both the functions and `load_flax`. The PRNG is
threefry2x32 whatever the process default, so a seed gives the same restoration on every platform.
Loading checks the manifest against the files (missing, truncated, modified, or belonging to
another export) and the parameters against the functions' signatures, and raises `ExportError`
with a one-line message naming the problem.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
# Which DA-CLIP embedding feeds which denoiser input (the models' use_* flags select).
CONTEXTS = (("degradation", "text_context", "use_degra_context"),
            ("content", "image_context", "use_image_context"))

Array = jax.Array


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


def _platform() -> str:
  """The current backend as `jax.export` names platforms (gpu -> cuda or rocm)."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


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


# ----------------------------------------------------------------------------------------------
# Writing an export (needs the model code).
# ----------------------------------------------------------------------------------------------


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


def _set_attention_impl(model: Any, impl: str) -> None:
  """Every attention of `model` uses `impl` (symbolic shapes cannot pick one by size)."""
  from flax import nnx

  from uir_jax.models.layers import CrossAttention

  for _, module in nnx.iter_modules(model):
    if isinstance(module, CrossAttention):
      module.impl = impl


def _context_names(denoiser: Any) -> list[str]:
  return [name for name, _, flag in CONTEXTS if getattr(denoiser, flag, False)]


def _restore_function(graphdef: Any, template: Any, sde: Any, *, mode: str,
                      num_steps: int | None, clip_x0: bool, tile: int | None, tile_overlap: int,
                      tile_batch: int):
  """restore(params, lq, key_data, contexts) -> clipped restoration, as `Restorer.__call__` does
  it on an already padded batch (the sampler's denoiser is `denoiser.denoiser_eps_fn`)."""
  from uir_jax.denoiser import denoiser_eps_fn
  from uir_jax.diffusion.tiling import tiled_eps_fn

  eps_fn = denoiser_eps_fn(graphdef)
  if tile is not None:
    eps_fn = tiled_eps_fn(eps_fn, tile, tile_overlap, tile_batch)

  def restore(params, lq, key_data, contexts):
    state = _state_from_flat(template, params)
    key = jax.random.wrap_key_data(key_data, impl=PRNG_IMPL)
    eps_args = (state, contexts.get("degradation"), contexts.get("content"))
    out = sde.sample(eps_fn, lq, key, mode, num_steps, eps_args=eps_args, clip_x0=clip_x0)
    return jnp.clip(out, 0.0, 1.0)

  return restore


def _embed_function(graphdef: Any, template: Any, text_features: np.ndarray):
  """embed(params, clip_images) -> {content, degradation, probabilities} (`zero_shot`'s formula:
  softmax(100 * norm(degradation) . norm(text)^T) against the words' precomputed features)."""
  from flax import nnx

  from uir_jax.models.clip import l2_normalize

  def embed(params, clip_images):
    model = nnx.merge(graphdef, _state_from_flat(template, params))
    content, degradation = model.encode_image(clip_images, control=True)
    probs = jax.nn.softmax(100.0 * l2_normalize(degradation) @ jnp.asarray(text_features).T,
                           axis=-1)
    return {"content": content.astype(jnp.float32),
            "degradation": degradation.astype(jnp.float32), "probabilities": probs}

  return embed


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


def _clip_config_dict(config: Any) -> dict[str, Any]:
  import dataclasses

  return dataclasses.asdict(config)


def export_models(denoiser: Any, daclip: Any | None, out_dir: str, *, sde: Any,
                  denoiser_spec: Mapping[str, Any], mode: str = "posterior",
                  num_steps: int | None = None, clip_x0: bool = False,
                  sizes: Sequence[tuple[int, int]] | None = None, tile: int | None = None,
                  tile_overlap: int = 64, tile_batch: int = 1,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS,
                  sources: Mapping[str, Any] | None = None,
                  words: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the export of a (denoiser, DA-CLIP) pair to `out_dir`; returns its manifest.

  Args:
    denoiser: a `ConditionalUNet` or `ConditionalNAFNet` holding the weights to export.
    daclip: its `DaCLIP` (None for unconditioned models).
    sde: the `IRSDE` it samples with.
    denoiser_spec: {"name": "unet" | "cnafnet", "options": constructor options} (rebuilds it).
    mode, num_steps, clip_x0: the sampler (`IRSDE.sample`), baked into the function.
    sizes: None for a shape-polymorphic function, else the (height, width) sizes to export.
    tile, tile_overlap, tile_batch: with `sizes`, run the denoiser on tiles (`tiled_eps_fn`).
    platforms: `jax.export` lowering platforms.
    sources: what the weights came from (recorded in the manifest).
    words: the zero-shot degradation words (default `zero_shot.DEGRADATION_WORDS`).
  """
  import copy

  from flax import nnx

  import uir_jax

  contexts = _context_names(denoiser)
  if contexts and daclip is None:
    raise ExportError(f"this denoiser is DA-CLIP-conditioned ({', '.join(contexts)} embedding): "
                      f"give its DA-CLIP (--daclip)")
  if not contexts and daclip is not None:
    daclip = None  # nothing reads its embeddings; the manifest says why there is none
    sources = dict(sources or {}, daclip_ignored="the denoiser takes no DA-CLIP conditioning")
  sde.timesteps(num_steps)  # a bad num_steps fails before anything is traced
  if sizes is not None and not sizes:
    raise ExportError("sizes is empty")
  if sizes is None and tile is not None:
    raise ExportError("tiling needs fixed sizes (symbolic shapes cannot be tiled): give sizes, "
                      "or no tile")
  _check_out_dir(out_dir)
  platforms = tuple(platforms)
  multiple = int(getattr(denoiser, "pad_multiple", 1))

  denoiser = copy.deepcopy(denoiser)  # attention is set for export below; the caller's is kept
  if sizes is None:
    _set_attention_impl(denoiser, "naive")
  graphdef, state = nnx.split(denoiser)
  flat = _flat_numpy(state)
  denoiser_id = _params_id(flat)
  function_specs = []
  exported = {}
  symbolic = jax.export.symbolic_shape
  ctx_dim = int(getattr(denoiser, "context_dim", 0))
  key_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
  for size in ([None] if sizes is None else list(sizes)):
    if size is None:
      b, h, w = symbolic(f"b, {multiple}*h, {multiple}*w")
      name, use_tile = "restore.jaxexport", None
    else:
      (b,), (h, w) = symbolic("b"), size
      name = f"restore_{h}x{w}.jaxexport"
      use_tile = tile if tile and (h > tile or w > tile) else None
    fn = _restore_function(graphdef, state, sde, mode=mode, num_steps=num_steps,
                           clip_x0=clip_x0, tile=use_tile, tile_overlap=tile_overlap,
                           tile_batch=tile_batch)
    args = (_abstract(flat), jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), key_spec,
            {c: jax.ShapeDtypeStruct((b, ctx_dim), jnp.float32) for c in contexts})
    try:
      exported[name] = jax.export.export(jax.jit(fn), platforms=platforms)(*args)
    except Exception as e:  # noqa: BLE001 - say which export failed and how to get another
      symbolic_trouble = size is None and ("Inconclusive" in type(e).__name__
                                           or "symbolic" in str(e).lower())
      hint = ("; this model does not allow symbolic sizes: export fixed ones (--sizes 256x256)"
              if symbolic_trouble else "")
      raise ExportError(f"cannot export the restore function for "
                        f"{'any size' if size is None else f'{size[0]}x{size[1]}'}: "
                        f"{type(e).__name__}: {_one_line(e)[:500]}{hint}") from e
    function_specs.append({"file": name, "height": None if size is None else size[0],
                           "width": None if size is None else size[1],
                           "multiple": multiple if size is None else None,
                           "tile": use_tile, "tile_overlap": tile_overlap if use_tile else None,
                           "tile_batch": tile_batch if use_tile else None,
                           "denoiser_id": denoiser_id})

  daclip_flat, daclip_id, embed_spec, daclip_info = None, None, None, None
  if daclip is not None:
    from uir_jax.models.clip import l2_normalize
    from uir_jax.tokenizer import tokenize
    from uir_jax.zero_shot import DEGRADATION_WORDS

    words = list(DEGRADATION_WORDS if words is None else words)
    dgraph, dstate = nnx.split(daclip)
    daclip_flat = _flat_numpy(dstate)
    daclip_id = _params_id(daclip_flat)
    text = np.asarray(l2_normalize(daclip.encode_text(jnp.asarray(tokenize(words)))), np.float32)
    size = int(daclip.config.image_size)
    (b,) = symbolic("b")
    exported[EMBED_FILE] = jax.export.export(
        jax.jit(_embed_function(dgraph, dstate, text)), platforms=platforms)(
            _abstract(daclip_flat), jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32))
    embed_spec = {"file": EMBED_FILE, "image_size": size, "daclip_id": daclip_id}
    daclip_info = {"config": _clip_config_dict(daclip.config), "words": words}

  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "versions": {"uir_jax": uir_jax.__version__, "jax": jax.__version__},
      "platforms": list(platforms),
      "prng_impl": PRNG_IMPL,
      "model_id": hashlib.sha256(f"{denoiser_id}|{daclip_id}".encode()).hexdigest(),
      "denoiser": {"name": denoiser_spec["name"], "options": dict(denoiser_spec["options"]),
                   "class": type(denoiser).__name__, "params_id": denoiser_id,
                   "attention_impl": "naive" if sizes is None else "auto",
                   "file": DENOISER_FILE},
      "daclip": None if daclip is None else {**daclip_info, "params_id": daclip_id,
                                             "file": DACLIP_FILE},
      "contexts": contexts,
      "sde": {"max_sigma": float(sde.max_sigma), "T": int(sde.T), "schedule": sde.schedule,
              "eps": float(sde.eps)},
      "sampler": {"mode": mode, "num_steps": num_steps, "clip_x0": bool(clip_x0)},
      "preprocessing": {
          "input": "float32 RGB [B, H, W, 3] in [0, 1] (8-bit photos / 255)",
          "pad": {"mode": "reflect (numpy)", "sides": "bottom and right",
                  "to": f"a multiple of {multiple}" if sizes is None
                        else "the smallest exported size that holds the photo"},
          "output": "float32 [B, H, W, 3] clipped to [0, 1], cropped to the input size",
          "clip_view": None if daclip is None else {
              "size": embed_spec["image_size"],
              "steps": "uint8 truncation, Pillow-exact bicubic resize of the shortest side, "
                       "centre crop, OpenAI mean/std (uir_jax.preprocess.clip_preprocess)",
              "of": "the photo before padding"},
      },
      "functions": {"restore": function_specs, "embed": embed_spec},
      "sources": dict(sources or {}),
  }

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

    meta = {"format": FORMAT, "model_id": manifest["model_id"]}
    save_file(flat, os.path.join(tmp, DENOISER_FILE), metadata={**meta, "part": "denoiser",
                                                                 "params_id": denoiser_id})
    tree = {"denoiser": _nested(flat)}
    if daclip_flat is not None:
      save_file(daclip_flat, os.path.join(tmp, DACLIP_FILE),
                metadata={**meta, "part": "daclip", "params_id": daclip_id})
      tree["daclip"] = _nested(daclip_flat)
    save_tree(os.path.join(tmp, ORBAX_DIR), tree)
    for name, exp in exported.items():
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


def export_checkpoints(unet_path: str, daclip_path: str | None, out_dir: str, *,
                       trust: bool = False, **kwargs) -> dict[str, Any]:
  """Exports released (or converted `.safetensors`) checkpoints: a denoiser file (U-Net or
  NAFNet, told by its keys) and, for conditioned models, its DA-CLIP file. `kwargs` as
  `export_models` (sde default: the released models' IRSDE()); `trust=True` reads PyTorch files
  with plain pickle, which runs code from them (see `convert.common.read_state_dict`)."""
  from uir_jax.convert import nafnet, unet
  from uir_jax.convert.clip import load_daclip
  from uir_jax.convert.common import checkpoint_errors, read_state_dict
  from uir_jax.convert.denoiser import load_denoiser
  from uir_jax.diffusion.irsde import IRSDE

  daclip = None
  if daclip_path:  # (first, as `Restorer.from_checkpoints`: the cheaper refusal)
    with checkpoint_errors(daclip_path):  # a refusal names the file that was refused
      daclip = load_daclip(daclip_path, trust=trust)
  with checkpoint_errors(unet_path):
    sd = read_state_dict(unet_path, trust=trust)
    keys = nafnet.unwrap_state_dict(sd)
    if "intro.weight" in keys:
      spec = {"name": "cnafnet", "options": nafnet.infer_options(keys)}
    else:
      spec = {"name": "unet", "options": unet.infer_options(unet.unwrap_state_dict(sd))}
    denoiser = load_denoiser(sd)
  sources = {"denoiser": _source_file(unet_path)}
  if daclip_path:
    sources["daclip"] = (_source_file(daclip_path) if os.path.isfile(daclip_path)
                         else {"path": os.path.abspath(daclip_path), "kind": "training run"})
  kwargs.setdefault("sde", IRSDE())
  return export_models(denoiser, daclip, out_dir, denoiser_spec=_jsonable(spec), sources=sources,
                       **kwargs)


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, np.generic):
    return tree.item()
  return tree


def export_training_run(workdir: str, out_dir: str, *, step: int | None = None,
                        trust: bool = False, **overrides) -> dict[str, Any]:
  """Exports an IR-SDE training run of ours: its config's model, SDE and evaluation sampler, the
  EMA weights of checkpoint `step` (default: the latest) and its frozen DA-CLIP.

  A "random:<config>" DA-CLIP (smoke runs) is exported with its random weights, drawn from the
  run's seed exactly as the trainer drew them, so the export restores as the run evaluated; the
  manifest marks it (`sources.daclip.random_weights`). `overrides`: `export_models` keywords
  (e.g. num_steps) that replace the config's. `trust=True` reads a PyTorch DA-CLIP file with
  plain pickle, which runs code from it.
  """
  import ml_collections
  from flax import nnx

  from uir_jax.checkpoint import model_from_run, read_training_run
  from uir_jax.diffusion.irsde import IRSDE
  from uir_jax.train import common

  steps_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(steps_dir) if s.isdigit()) \
      if os.path.isdir(steps_dir) else []
  if step is not None and step not in steps:
    raise ExportError(f"{workdir}: no checkpoint of step {step} (it has {steps or 'none'})")
  try:
    config, state = read_training_run(workdir, step)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from e
  if config.get("trainer") != "irsde":
    raise ExportError(f"{workdir}: a {config.get('trainer')!r} run; only IR-SDE runs (trainer "
                      f"'irsde') have a restore function to export")
  cfg = ml_collections.ConfigDict(config)
  view = "windows" if cfg.daclip.get("windows") else cfg.data.get("clip_view", "resize")
  if cfg.daclip.checkpoint and view != "resize":
    raise ExportError(f"{workdir}: its DA-CLIP read the {view!r} CLIP view; exports embed the "
                      f"photo resized to the CLIP's size (clip_view 'resize') only")
  model = nnx.eval_shape(lambda: common.build_model(cfg, nnx.Rngs(0)))  # no random init
  try:
    denoiser = model_from_run(model, state)
  except ValueError as e:
    raise ExportError(f"{workdir}: {e}") from e
  daclip, daclip_source = None, None
  if cfg.daclip.checkpoint:
    frozen = common.load_frozen_daclip(cfg.daclip, int(cfg.seed), trust=trust)
    daclip = nnx.merge(*frozen)
    source = str(cfg.daclip.checkpoint)
    if source.startswith(common.RANDOM_PREFIX):
      daclip_source = {"checkpoint": source, "seed": int(cfg.seed), "random_weights": True}
    elif os.path.isfile(source):
      daclip_source = _source_file(source)
    else:
      daclip_source = {"path": os.path.abspath(source), "kind": "training run"}
  sources = {"workdir": os.path.abspath(workdir), "step": step if step is not None else steps[-1],
             "config.json": _source_file(os.path.join(workdir, "config.json")),
             "weights": "ema"}
  if daclip_source:
    sources["daclip"] = daclip_source
  options = {k: v for k, v in dict(config["model"]).items() if k != "name"}
  options["dtype"] = config.get("dtype", "float32")
  kwargs = dict(mode=cfg.eval.mode, num_steps=cfg.eval.num_steps, clip_x0=bool(cfg.eval.clip_x0))
  kwargs.update(overrides)
  return export_models(denoiser, daclip, out_dir, sde=IRSDE(**cfg.sde),
                       denoiser_spec={"name": config["model"]["name"], "options": options},
                       sources=sources, **kwargs)


# ----------------------------------------------------------------------------------------------
# Reading an export (numpy + jax only: neither torch nor the model code).
# ----------------------------------------------------------------------------------------------


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


def _read_params(directory: str, manifest: dict, name: str, part: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  path = os.path.join(directory, name)
  try:  # first, whose weights these are (a whole file of another export is not "truncated")
    with safe_open(path, "np") as f:
      meta = f.metadata() or {}
  except Exception:  # noqa: BLE001 - missing or cut inside the header: said by _check_file
    meta = None
  if meta is not None and meta.get("model_id") != manifest["model_id"]:
    raise ExportError(f"{directory}: {name} belongs to another model (model id "
                      f"{str(meta.get('model_id'))[:12]}, this export is "
                      f"{manifest['model_id'][:12]})")
  _check_file(directory, manifest, name, hash_it=True)
  try:
    with safe_open(path, "np") as f:
      flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
  except ExportError:
    raise
  except Exception as e:  # noqa: BLE001 - a corrupt header: name the file, no traceback
    raise ExportError(f"{directory}: {name} is unreadable ({type(e).__name__}: "
                      f"{_one_line(e)[:200]})") from e
  if _params_id(flat) != manifest[part]["params_id"]:
    raise ExportError(f"{directory}: {name} holds other weights than this export's {part}")
  return flat


def _read_function(directory: str, manifest: dict, name: str, params: dict[str, np.ndarray],
                   what: str):
  path = _check_file(directory, manifest, name, hash_it=True)
  with open(path, "rb") as f:
    data = f.read()
  try:
    exp = jax.export.deserialize(bytearray(data))
  except Exception as e:  # noqa: BLE001
    raise ExportError(f"{directory}: {name} is not a serialized function ({type(e).__name__}: "
                      f"{_one_line(e)[:200]})") from e
  platform = _platform()
  if platform not in exp.platforms:
    raise ExportError(f"{directory}: {name} was exported for {', '.join(exp.platforms)}, not "
                      f"{platform}: export again with --platforms including {platform}")
  # The parameters must be exactly the function's first argument (names, shapes, dtypes).
  n = len(params)
  expected = jax.tree.unflatten(exp.in_tree, list(exp.in_avals))[0][0]
  if set(expected) != set(params):
    extra = sorted(set(params) - set(expected))[:3]
    missing = sorted(set(expected) - set(params))[:3]
    raise ExportError(f"{directory}: {what} weights do not fit {name} (it was made for another "
                      f"model): missing {missing}, unexpected {extra}")
  for k, aval in expected.items():
    if tuple(aval.shape) != params[k].shape or aval.dtype != params[k].dtype:
      raise ExportError(f"{directory}: {what} weight {k} is {params[k].dtype}{params[k].shape}, "
                        f"{name} expects {aval.dtype}{tuple(aval.shape)} (another model)")
  del n
  return exp


class ExportedModel:
  """A loaded export: `model(images, key)` restores, `model.embed(images)` gives DA-CLIP's
  embeddings and zero-shot degradation probabilities. Needs numpy, jax and safetensors only."""

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest = manifest = read_manifest(directory)
    try:
      self.denoiser_params = _read_params(directory, manifest, manifest["denoiser"]["file"],
                                          "denoiser")
      self.functions = []
      for spec in manifest["functions"]["restore"]:
        exp = _read_function(directory, manifest, spec["file"], self.denoiser_params,
                             "denoiser")
        self.functions.append((spec, exp))
      self.daclip_params, self._embed = None, None
      if manifest.get("daclip"):
        self.daclip_params = _read_params(directory, manifest, manifest["daclip"]["file"],
                                          "daclip")
        self._embed = _read_function(directory, manifest, manifest["functions"]["embed"]["file"],
                                     self.daclip_params, "DA-CLIP")
      for name in manifest.get("files", {}):  # the rest (orbax copy): present and whole
        _check_file(directory, manifest, name, hash_it=False)
    except (KeyError, TypeError) as e:
      raise ExportError(f"{directory}: manifest lacks or garbles {e}") from e
    if not self.functions:
      raise ExportError(f"{directory}: the manifest lists no restore function")
    self.contexts = list(manifest.get("contexts", []))
    if self.contexts and self._embed is None:
      raise ExportError(f"{directory}: the denoiser needs DA-CLIP embeddings but the export has "
                        f"no DA-CLIP")
    self._preprocess = None

  @property
  def words(self) -> list[str]:
    """The zero-shot degradation words (empty without a DA-CLIP)."""
    return list(self.manifest["daclip"]["words"]) if self.manifest.get("daclip") else []

  @property
  def has_daclip(self) -> bool:
    return self._embed is not None

  def _fit(self, h: int, w: int, pad_multiple: int = 1) -> tuple[dict, Any, int, int]:
    """(function spec, function, padded h, padded w) for a photo of h x w."""
    import math

    best = None
    for spec, exp in self.functions:
      if spec["height"] is None:
        m = math.lcm(int(spec["multiple"]), int(pad_multiple))
        return spec, exp, h + (-h % m), w + (-w % m)
      if spec["height"] >= h and spec["width"] >= w:
        area = spec["height"] * spec["width"]
        if best is None or area < best[0]:
          best = (area, spec, exp)
    if best is None:
      sizes = ", ".join(f"{s['height']}x{s['width']}" for s, _ in self.functions)
      raise ExportError(f"a {h}x{w} photo is larger than every size this export was made for "
                        f"({sizes}); export with a larger --sizes")
    _, spec, exp = best
    return spec, exp, spec["height"], spec["width"]

  def embed(self, images: Any) -> dict[str, Array]:
    """DA-CLIP of photos [B, H, W, 3] in [0, 1]: {content, degradation, probabilities}."""
    if self._embed is None:
      raise ExportError(f"{self.directory}: this export has no DA-CLIP")
    images = _check_images(images)
    if self._preprocess is None:
      from uir_jax.preprocess import clip_preprocess  # numpy/jax only, no model code

      self._preprocess = jax.jit(clip_preprocess, static_argnums=1)
    size = int(self.manifest["functions"]["embed"]["image_size"])
    return self._embed.call(self.daclip_params, self._preprocess(jnp.asarray(images), size))

  def __call__(self, images: Any, key: Any, *, contexts: Mapping[str, Any] | None = None,
               pad_multiple: int = 1) -> Array:
    """Restores photos [B, H, W, 3] (float in [0, 1]) with the sampler of the export.

    `key`: a threefry2x32 key (`jax.random.key(seed, impl="threefry2x32")`), its uint32 [2]
    data, or an int seed. `contexts`: DA-CLIP embeddings already computed by `embed` (else they
    are computed here). `pad_multiple`: with a function for any size, pad to a multiple of this
    too (as `Restorer(pad_multiple=...)`), so photos of many sizes share a few compilations.
    """
    if pad_multiple < 1:
      raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    images = _check_images(images)
    key_data = _key_data(key)
    if self.contexts and contexts is None:
      contexts = self.embed(images)
    ctx = {name: jnp.asarray(contexts[name], jnp.float32) for name in self.contexts}
    _, h, w, _ = images.shape
    _, exp, ph, pw = self._fit(h, w, pad_multiple)
    if (ph, pw) != (h, w):  # reflect on the bottom/right, as Restorer(pad_multiple) does
      images = np.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="reflect")
    out = exp.call(self.denoiser_params, jnp.asarray(images), key_data, ctx)
    return out[:, :h, :w]


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected RGB images [B, H, W, 3], got shape {images.shape}")
  return images


def _key_data(key: Any) -> Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key_data(jax.random.key(int(key), impl=PRNG_IMPL))
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(key))
    if PRNG_IMPL not in impl:
      raise ValueError(f"the export samples with {PRNG_IMPL} keys, got a {impl} key: use "
                       f"jax.random.key(seed, impl={PRNG_IMPL!r})")
    return jax.random.key_data(key)
  data = jnp.asarray(key)
  if data.shape != (2,) or data.dtype != jnp.uint32:
    raise ValueError(f"key must be a {PRNG_IMPL} key, its uint32 [2] data or an int seed; got "
                     f"{data.dtype}{data.shape}")
  return data


def load_export(directory: str) -> ExportedModel:
  """Loads and checks an export directory (see the module docstring); raises `ExportError`."""
  return ExportedModel(os.fspath(directory))


def load_flax(directory: str) -> tuple[Any, Any, Any, dict[str, Any]]:
  """(denoiser, DA-CLIP or None, IRSDE, sampler settings) rebuilt as Flax modules from an export's
  manifest and its orbax checkpoint (needs the model code; e.g. to fine-tune or inspect).

  `uir_jax.restore.Restorer(denoiser, daclip, sde, mode=..., num_steps=..., pad_multiple=...)`
  then restores like the export's polymorphic function.
  """
  import ml_collections
  from flax import nnx

  from uir_jax.checkpoint import load_tree
  from uir_jax.convert.common import unflatten
  from uir_jax.diffusion.irsde import IRSDE
  from uir_jax.train.common import build_model

  manifest = read_manifest(directory)
  for name in manifest.get("files", {}):
    _check_file(directory, manifest, name, hash_it=True)
  from uir_jax.convert.common import flat_params

  tree = {part: {k: np.asarray(v) for k, v in flat_params(sub).items()}
          for part, sub in load_tree(os.path.join(directory, ORBAX_DIR)).items()}
  spec = manifest["denoiser"]
  options = dict(spec["options"])
  dtype = options.pop("dtype", "float32")
  cfg = ml_collections.ConfigDict({"model": {"name": spec["name"], **options}, "dtype": dtype})
  denoiser = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(denoiser)
  nnx.replace_by_pure_dict(state, unflatten(tree["denoiser"]))
  denoiser = nnx.merge(graphdef, state)
  if spec.get("attention_impl") == "naive":
    _set_attention_impl(denoiser, "naive")
  daclip = None
  if manifest.get("daclip"):
    from uir_jax.models.clip import CLIPConfig
    from uir_jax.models.daclip import DaCLIP

    config = CLIPConfig(**manifest["daclip"]["config"])
    daclip = nnx.eval_shape(lambda: DaCLIP(config, rngs=nnx.Rngs(0)))
    dgraph, dstate = nnx.split(daclip)
    nnx.replace_by_pure_dict(dstate, unflatten(tree["daclip"]))
    daclip = nnx.merge(dgraph, dstate)
  return denoiser, daclip, IRSDE(**manifest["sde"]), dict(manifest["sampler"])


__all__ = ["ExportError", "ExportedModel", "export_checkpoints", "export_models",
           "export_training_run", "load_export", "load_flax", "parse_sizes", "read_manifest"]

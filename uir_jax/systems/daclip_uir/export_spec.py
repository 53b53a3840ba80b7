"""What an export of this system holds: a DA-CLIP-conditioned restorer (IR-SDE sampling of a
denoiser, or one NAFNet regression pass) as serialized functions (`uir_jax.export`).

    export_checkpoints("universal-ir.pth", "daclip_ViT-B-32.pt", "exports/universal-ir")
    export_training_run("runs/universal-ir", "exports/mine")    # its EMA weights + config
    export_training_run("workdir/quickstart/2_restorer", "e")   # a NAFNet run: regression
    model = uir_jax.export.load_export("exports/universal-ir")  # numpy + jax (+ safetensors)

The restore function is `(network variables, lq, key data, contexts) -> restored`; the key is
unused by regression exports (one interface for both). For IR-SDE exports the sampler (mode,
steps, x0 clipping) is baked in. The DA-CLIP part, `embed`, takes the view(s) of the photo the
model was trained with (`functions.embed.view`: "resize", "crop" or "windows") and returns the
content and degradation embeddings and the zero-shot probabilities over the run's words.

The restore function is shape-polymorphic in batch, height and width, for heights and widths that
are multiples of the network's padding multiple (2^levels). Polymorphic shapes rule out the pieces
that need static sizes, so such exports run whole images (no tiling) with plain attention. With
`sizes=[(h, w), ...]` one function per size is exported instead (batch still polymorphic), with
tiling (diffusion only) and the model's size-dependent attention. The weights are arguments of the
serialized functions, not constants in them. The PRNG is threefry2x32 whatever the process
default, so a seed gives the same restoration on every platform.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.export.manifest import (
    DACLIP_FILE,
    DEFAULT_PLATFORMS,
    DENOISER_FILE,
    EMBED_FILE,
    ORBAX_DIR,
    PRNG_IMPL,
    ExportError,
    _check_file,
    _one_line,
    _params_id,
    read_manifest,
)
from uir_jax.export.writer import (
    _abstract,
    _check_out_dir,
    _flat_numpy,
    _jsonable,
    _set_attention_impl,
    _source_file,
    _state_from_flat,
    export_jitted,
    write_export,
)
from uir_jax.systems.daclip_uir.conditioning import (
    ClipView,
    context_names,
    embed_views,
    zero_shot_probabilities,
)

REGRESSION = "regression"  # the sampler "mode" of a direct regression export


def _restore_function(graphdef: Any, template: Any, sde: Any, *, mode: str,
                      num_steps: int | None, clip_x0: bool, tile: int | None, tile_overlap: int,
                      tile_batch: int):
  """restore(params, lq, key_data, contexts) -> clipped restoration, as the restorers'
  `__call__` do it on an already padded batch (the sampler's denoiser is
  `denoiser.denoiser_eps_fn`; without an SDE, one regression pass)."""
  from flax import nnx

  from uir_jax.denoiser import denoiser_eps_fn
  from uir_jax.diffusion.tiling import tiled_eps_fn

  if sde is None:
    def regress(params, lq, key_data, contexts, size):
      # size: the photo's (h, w) inside the padded lq, for the mean colour of the photo alone.
      del key_data
      net = nnx.merge(graphdef, _state_from_flat(template, params))
      rows = jnp.arange(lq.shape[1])[:, None] < size[0]
      cols = jnp.arange(lq.shape[2])[None, :] < size[1]
      mask = (rows & cols).astype(jnp.float32)[None, :, :, None]
      mean = jnp.sum(lq * mask, axis=(1, 2)) / (size[0] * size[1]).astype(jnp.float32)
      out = net(lq, text_context=contexts.get("degradation"),
                image_context=contexts.get("content"), mean_color=mean)
      return jnp.clip(out, 0.0, 1.0)

    return regress

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


def _embed_function(graphdef: Any, template: Any, text_features: np.ndarray, windows: bool):
  """embed(params, views) -> {content, degradation, probabilities} (`conditioning.embed_views`
  and `zero_shot_probabilities` against the words' precomputed features). views: [B, n, S, S, 3]
  windows, or one view [B, S, S, 3]."""
  from flax import nnx

  def embed(params, views):
    model = nnx.merge(graphdef, _state_from_flat(template, params))
    content, degradation = embed_views(model, views if windows else views[:, None])
    return {"content": content, "degradation": degradation,
            "probabilities": zero_shot_probabilities(degradation, jnp.asarray(text_features))}

  return embed


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
                  words: Sequence[str] | None = None,
                  view: ClipView | None = None) -> dict[str, Any]:
  """Writes the export of a (restoring network, DA-CLIP) pair to `out_dir`; returns its manifest.

  Args:
    denoiser: the network holding the weights to export: a `ConditionalUNet` or
      `ConditionalNAFNet` (sampled with `sde`), or a `NAFNet` (sde None: regression).
    daclip: its `DaCLIP` (None for unconditioned models).
    sde: the `IRSDE` it samples with; None for a direct regression network.
    denoiser_spec: {"name": "unet" | "cnafnet" | "nafnet", "options": constructor options}.
    mode, num_steps, clip_x0: the sampler (`IRSDE.sample`), baked into the function.
    sizes: None for a shape-polymorphic function, else the (height, width) sizes to export.
    tile, tile_overlap, tile_batch: with `sizes`, run the denoiser on tiles (`tiled_eps_fn`).
    platforms: `jax.export` lowering platforms.
    sources: what the weights came from (recorded in the manifest).
    words: the zero-shot degradation words (default `zero_shot.DEGRADATION_WORDS`).
    view: the DA-CLIP's view of the photo (default: the reference's resize to its input size).
  """
  import copy

  from flax import nnx

  contexts = context_names(denoiser)
  if contexts and daclip is None:
    raise ExportError(f"this denoiser is DA-CLIP-conditioned ({', '.join(contexts)} embedding): "
                      f"give its DA-CLIP (--daclip)")
  if not contexts and daclip is not None:
    daclip = None  # nothing reads its embeddings; the manifest says why there is none
    sources = dict(sources or {}, daclip_ignored="the denoiser takes no DA-CLIP conditioning")
  if sde is None:
    mode, num_steps, clip_x0, tile = REGRESSION, None, False, None
  else:
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
  ctx_dim = int(getattr(denoiser, "context_dim", 0) or 0)
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
    if sde is None:  # the regression function also takes the photo's size (`takes_size`)
      args += (jax.ShapeDtypeStruct((2,), jnp.int32),)
    try:
      exported[name] = export_jitted(fn, platforms, *args)
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
                           "takes_size": sde is None, "denoiser_id": denoiser_id})

  daclip_flat, daclip_id, embed_spec, daclip_info = None, None, None, None
  if daclip is not None:
    from uir_jax.models.clip import l2_normalize
    from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS
    from uir_jax.tokenizer import tokenize

    words = list(DEGRADATION_WORDS if words is None else words)
    size = int(daclip.config.image_size)
    view = view or ClipView("resize", size)
    dgraph, dstate = nnx.split(daclip)
    daclip_flat = _flat_numpy(dstate)
    daclip_id = _params_id(daclip_flat)
    text = np.asarray(l2_normalize(daclip.encode_text(jnp.asarray(tokenize(words)))), np.float32)
    windows = view.view == "windows"
    (b, n) = symbolic("b, n")
    shape = (b, n, size, size, 3) if windows else (b, size, size, 3)
    exported[EMBED_FILE] = export_jitted(
        _embed_function(dgraph, dstate, text, windows), platforms,
        _abstract(daclip_flat), jax.ShapeDtypeStruct(shape, jnp.float32))
    embed_spec = {"file": EMBED_FILE, "image_size": size, "daclip_id": daclip_id,
                  "view": view.view, "clip_size": view.size}
    daclip_info = {"config": _clip_config_dict(daclip.config), "words": words}

  clip_steps = {"resize": "uint8 truncation, Pillow-exact bicubic resize of the shortest side, "
                          "centre crop, OpenAI mean/std (uir_jax.preprocess.clip_preprocess)",
                "crop": "the full-resolution centre crop, 8-bit rounded, OpenAI mean/std "
                        "(uir_jax.preprocess.crop_view)",
                "windows": "full-resolution windows tiling the photo, 8-bit rounded, OpenAI "
                           "mean/std (uir_jax.preprocess.window_views); embeddings averaged"}
  manifest = {
      "platforms": list(platforms),
      "model_id": hashlib.sha256(f"{denoiser_id}|{daclip_id}".encode()).hexdigest(),
      "restorer": "diffusion" if sde is not None else REGRESSION,
      "denoiser": {"name": denoiser_spec["name"], "options": dict(denoiser_spec["options"]),
                   "class": type(denoiser).__name__, "params_id": denoiser_id,
                   "attention_impl": "naive" if sizes is None else "auto",
                   "file": DENOISER_FILE},
      "daclip": None if daclip is None else {**daclip_info, "params_id": daclip_id,
                                             "file": DACLIP_FILE},
      "contexts": contexts,
      "sde": None if sde is None else {"max_sigma": float(sde.max_sigma), "T": int(sde.T),
                                       "schedule": sde.schedule, "eps": float(sde.eps)},
      "sampler": {"mode": mode, "num_steps": num_steps, "clip_x0": bool(clip_x0)},
      "preprocessing": {
          "input": "float32 RGB [B, H, W, 3] in [0, 1] (8-bit photos / 255)",
          # A direct NAFNet pads its input with zeros itself (as the reference): the same here.
          "pad": {"mode": "reflect (numpy)" if sde is not None else "zeros",
                  "sides": "bottom and right",
                  "to": f"a multiple of {multiple}" if sizes is None
                        else "the smallest exported size that holds the photo"},
          "output": "float32 [B, H, W, 3] clipped to [0, 1], cropped to the input size",
          "clip_view": None if daclip is None else {
              "size": embed_spec["image_size"], "view": embed_spec["view"],
              "steps": clip_steps.get(embed_spec["view"], embed_spec["view"]),
              "of": "the photo before padding"},
      },
      "functions": {"restore": function_specs, "embed": embed_spec},
      "sources": dict(sources or {}),
  }
  parts = {"denoiser": {"file": DENOISER_FILE, "flat": flat, "params_id": denoiser_id}}
  if daclip_flat is not None:
    parts["daclip"] = {"file": DACLIP_FILE, "flat": daclip_flat, "params_id": daclip_id}
  return write_export(out_dir, manifest, parts, exported)
def export_checkpoints(unet_path: str, daclip_path: str | None, out_dir: str, *,
                       trust: bool = False, **kwargs) -> dict[str, Any]:
  """Exports released (or converted `.safetensors`) checkpoints: a denoiser file (U-Net or
  NAFNet, told by its keys) and, for conditioned models, its DA-CLIP file. `kwargs` as
  `export_models` (sde default: the released models' IRSDE()); `trust=True` reads PyTorch files
  with plain pickle, which runs code from them (see `convert.common.read_state_dict`)."""
  from uir_jax.convert.clip import load_daclip
  from uir_jax.convert.common import checkpoint_errors, read_state_dict
  from uir_jax.convert.denoiser import denoiser_spec, load_denoiser
  from uir_jax.diffusion.irsde import IRSDE

  daclip = None
  if daclip_path:  # (first, as `DiffusionRestorer.from_checkpoints`: the cheaper refusal)
    with checkpoint_errors(daclip_path):  # a refusal names the file that was refused
      daclip = load_daclip(daclip_path, trust=trust)
  with checkpoint_errors(unet_path):
    sd = read_state_dict(unet_path, trust=trust)
    spec = denoiser_spec(sd)
    denoiser = load_denoiser(sd)
  sources = {"denoiser": _source_file(unet_path)}
  if daclip_path:
    sources["daclip"] = (_source_file(daclip_path) if os.path.isfile(daclip_path)
                         else {"path": os.path.abspath(daclip_path), "kind": "training run"})
  kwargs.setdefault("sde", IRSDE())
  return export_models(denoiser, daclip, out_dir, denoiser_spec=_jsonable(spec), sources=sources,
                       **kwargs)


def export_training_run(workdir: str, out_dir: str, *, step: int | None = None,
                        trust: bool = False, **overrides) -> dict[str, Any]:
  """Exports a restoration run of ours: its config's network, the EMA weights of checkpoint
  `step` (default: the latest), its frozen DA-CLIP and the CLIP view it read; an IR-SDE run
  (trainer "irsde") with its SDE and evaluation sampler, a direct NAFNet run (trainer "nafnet")
  as one regression pass. A quickstart's top workdir exports its stage-2 restorer.

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
  from uir_jax.systems.daclip_uir import conditioning
  from uir_jax.systems.daclip_uir.restorers import RESTORER_TRAINERS, restorer_dir
  from uir_jax.train import common

  workdir = restorer_dir(workdir)
  steps_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(steps_dir) if s.isdigit()) \
      if os.path.isdir(steps_dir) else []
  if step is not None and step not in steps:
    raise ExportError(f"{workdir}: no checkpoint of step {step} (it has {steps or 'none'})")
  try:
    config, state = read_training_run(workdir, step)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from e
  trainer = config.get("trainer")
  if trainer not in RESTORER_TRAINERS:
    raise ExportError(f"{workdir}: a {trainer!r} run holds no restorer to export (trainers "
                      f"{', '.join(RESTORER_TRAINERS)} and quickstart do)")
  cfg = ml_collections.ConfigDict(config)
  view = conditioning.ClipView.of_config(config)
  if trainer == "irsde" and cfg.daclip.checkpoint and view.view != "resize":
    raise ExportError(f"{workdir}: its DA-CLIP read the {view.view!r} CLIP view; exports "
                      f"embed the photo resized to the CLIP's size (clip_view 'resize') only")
  model = nnx.eval_shape(lambda: common.build_model(cfg, nnx.Rngs(0)))  # no random init
  try:
    denoiser = model_from_run(model, state)
  except ValueError as e:
    raise ExportError(f"{workdir}: {e}") from e
  daclip, daclip_source = None, None
  if cfg.daclip.checkpoint:
    frozen = conditioning.load_frozen_daclip(cfg.daclip, int(cfg.seed), trust=trust)
    daclip = nnx.merge(*frozen)
    source = str(cfg.daclip.checkpoint)
    if source.startswith(conditioning.RANDOM_PREFIX):
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
  spec = {"name": config["model"]["name"], "options": options}
  common_kwargs = dict(denoiser_spec=spec, sources=sources, view=view,
                       words=conditioning.run_words(config))
  if trainer == "nafnet":
    unknown = sorted(set(overrides) - {"sizes", "platforms", "tile_overlap", "tile_batch",
                                       "tile"})
    if unknown or overrides.get("tile"):
      raise ExportError(f"{workdir}: a direct regression run has no sampler or tiling "
                        f"({', '.join(unknown) or 'tile'})")
    overrides.pop("tile", None)
    return export_models(denoiser, daclip, out_dir, sde=None, **common_kwargs, **overrides)
  kwargs = dict(mode=cfg.eval.mode, num_steps=cfg.eval.num_steps, clip_x0=bool(cfg.eval.clip_x0))
  kwargs.update(overrides)
  return export_models(denoiser, daclip, out_dir, sde=IRSDE(**cfg.sde), **common_kwargs,
                       **kwargs)


def load_flax(directory: str) -> tuple[Any, Any, Any, dict[str, Any]]:
  """(network, DA-CLIP or None, IRSDE or None (regression), sampler settings) rebuilt as Flax
  modules from an export's manifest and its orbax checkpoint (needs the model code; e.g. to
  fine-tune or inspect).

  `restorers.DiffusionRestorer(denoiser, daclip, sde, mode=..., num_steps=...,
  pad_multiple=...)` (or `RegressionRestorer(net, daclip)`) then restores like the export's
  polymorphic function.
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
  sde = IRSDE(**manifest["sde"]) if manifest.get("sde") else None
  return denoiser, daclip, sde, dict(manifest["sampler"])


"""Reading an export: numpy, jax and safetensors only (neither torch, flax nor the model code).

    model = load_export("exports/universal-ir")
    restored = model(lq, jax.random.key(0, impl="threefry2x32"))   # [B, H, W, 3] in [0, 1]
    probs = model.embed(lq)["probabilities"]      # zero-shot degradation readout (DA-CLIP only)

The restore function of an export "for any size" is shape-polymorphic in batch, height and width,
for heights and widths that are multiples of the network's padding multiple; the loader
reflect-pads each photo on the bottom/right to that multiple and crops the result back. Exports for
fixed sizes pad photos to the smallest exported size that holds them. Loading checks the manifest
against the files (missing, truncated, modified, or belonging to another export) and the
parameters against the functions' signatures, and raises `ExportError` with a one-line message
naming the problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uir_jax.export.manifest import (
    PRNG_IMPL,
    ExportError,
    _check_file,
    _one_line,
    _params_id,
    read_manifest,
)

Array = jax.Array


def _platform() -> str:
  """The current backend as `jax.export` names platforms (gpu -> cuda or rocm)."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


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
    self.pad_multiple = 1  # the default of __call__'s pad_multiple

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
    """DA-CLIP of photos [B, H, W, 3] in [0, 1]: {content, degradation, probabilities}, of the
    view of the photo the model was trained with (the manifest's `functions.embed.view`)."""
    if self._embed is None:
      raise ExportError(f"{self.directory}: this export has no DA-CLIP")
    images = _check_images(images)
    spec = self.manifest["functions"]["embed"]
    size = int(spec["image_size"])
    view = spec.get("view", "resize")  # exports before views were recorded: the resize
    if self._preprocess is None:
      from uir_jax.preprocess import photo_views  # numpy/jax only, no model code

      self._preprocess = jax.jit(photo_views, static_argnums=(1, 2, 3))
    views = self._preprocess(jnp.asarray(images), view, int(spec.get("clip_size", size)), size)
    # The function takes [B, n, S, S, 3] windows, else the one view [B, S, S, 3].
    return self._embed.call(self.daclip_params, views if view == "windows" else views[:, 0])

  @property
  def needs_guidance(self) -> bool:
    """A guided (TextualDegRemoval) export: `model(images, guidance=...)`."""
    return any(spec.get("takes_guidance") for spec, _ in self.functions)

  def _fit_guided(self, h: int, w: int, hg: int, wg: int) -> tuple[dict, Any]:
    """The function of the smallest exported photo size holding h x w, and of those the
    smallest guidance size holding hg x wg."""
    fits = [(spec["height"] * spec["width"], spec["guidance_height"] * spec["guidance_width"],
             i) for i, (spec, _) in enumerate(self.functions)
            if spec["height"] >= h and spec["width"] >= w]
    if not fits:
      sizes = ", ".join(sorted({f"{s['height']}x{s['width']}" for s, _ in self.functions}))
      raise ExportError(f"a {h}x{w} photo is larger than every photo size this export was made "
                        f"for ({sizes}); export with a larger --sizes")
    area = min(f[0] for f in fits)
    held = [f for f in fits if f[0] == area and self.functions[f[2]][0]["guidance_height"] >= hg
            and self.functions[f[2]][0]["guidance_width"] >= wg]
    if not held:
      sizes = ", ".join(f"{self.functions[f[2]][0]['guidance_height']}x"
                        f"{self.functions[f[2]][0]['guidance_width']}" for f in fits
                        if f[0] == area)
      raise ExportError(f"a {hg}x{wg} guidance is larger than every guidance size this export "
                        f"was made for ({sizes}); export with a larger --guidance_sizes")
    return self.functions[min(held)[2]]

  def __call__(self, images: Any, key: Any = 0, embeddings: Mapping[str, Any] | None = None, *,
               contexts: Mapping[str, Any] | None = None, pad_multiple: int | None = None,
               guidance: Any = None) -> Array:
    """Restores photos [B, H, W, 3] (float in [0, 1]) with the sampler of the export.

    `key`: a threefry2x32 key (`jax.random.key(seed, impl="threefry2x32")`), its uint32 [2]
    data, or an int seed (regression exports ignore it). `embeddings` (or `contexts`): DA-CLIP
    embeddings already computed by `embed` (else they are computed here). `pad_multiple`: with
    a function for any size, pad to a multiple of this too (as `Restorer(pad_multiple=...)`),
    so photos of many sizes share a few compilations (default: `self.pad_multiple`, 1).
    `guidance` [B, Hg, Wg, 3]: the guidance images of a guided export (required there; both are
    zero-padded to the exported sizes, see `textual_deg_removal/export_spec.py`).
    """
    if self.needs_guidance:
      if guidance is None:
        raise ValueError(f"{self.directory}: a guided export: give guidance=[B, Hg, Wg, 3]")
      images, guidance = _check_images(images), _check_images(guidance)
      if guidance.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} photo(s) but {guidance.shape[0]} guidance image(s)")
      (_, h, w, _), (_, hg, wg, _) = images.shape, guidance.shape
      spec, exp = self._fit_guided(h, w, hg, wg)
      pad = lambda x, th, tw: np.pad(x, ((0, 0), (0, th - x.shape[1]), (0, tw - x.shape[2]),
                                         (0, 0)))
      out = exp.call(self.denoiser_params, jnp.asarray(pad(images, spec["height"], spec["width"])),
                     _key_data(0), {}, jnp.asarray(pad(guidance, spec["guidance_height"],
                                                       spec["guidance_width"])))
      return out[:, :h, :w]
    if guidance is not None:
      raise ValueError(f"{self.directory}: this export takes no guidance")
    pad_multiple = self.pad_multiple if pad_multiple is None else pad_multiple
    if pad_multiple < 1:
      raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    images = _check_images(images)
    key_data = _key_data(key)
    contexts = embeddings if contexts is None else contexts
    if self.contexts and contexts is None:
      contexts = self.embed(images)
    ctx = {name: jnp.asarray(contexts[name], jnp.float32) for name in self.contexts}
    _, h, w, _ = images.shape
    spec, exp, ph, pw = self._fit(h, w, pad_multiple)
    if (ph, pw) != (h, w):  # on the bottom/right: reflect, as Restorer(pad_multiple) does, or
      # zeros where the network pads so itself (NAFNet regression exports)
      zeros = str(self.manifest["preprocessing"]["pad"]["mode"]).startswith("zeros")
      images = np.pad(images, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)),
                      mode="constant" if zeros else "reflect")
    # Regression functions also take the photo's size within the padded batch.
    size = (jnp.asarray([h, w], jnp.int32),) if spec.get("takes_size") else ()
    out = exp.call(self.denoiser_params, jnp.asarray(images), key_data, ctx, *size)
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


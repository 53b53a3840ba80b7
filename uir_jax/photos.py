"""Photos in and out: any image file -> float32 RGB in [0, 1], [0, 1] floats -> uint8, and the
loop that restores a list of photos (listing, output names, sidecars, progress).

No TensorFlow and no model code, so the CLI, evaluation, trainers and notebooks share it (and a
restore from an export imports no flax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

Array = jax.Array


def to_uint8(images: Array | np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 with clamp and round (the reference's `tensor2img`)."""
  return np.asarray(jnp.round(jnp.clip(jnp.asarray(images), 0.0, 1.0) * 255.0)).astype(np.uint8)


def read_rgb(path: str) -> np.ndarray:
  """An image file as float32 RGB [H, W, 3] in [0, 1] (gray, palette, RGBA and 16-bit converted)."""
  with Image.open(path) as img:
    if img.mode.startswith("I"):  # 16-bit gray ("I;16*", or "I" holding 16-bit values)
      arr = np.asarray(img, np.float32)
      scale = 255.0 if img.mode == "I" and arr.max() <= 255 else 65535.0
      return np.repeat(np.clip(arr / scale, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


# ---- Restoring photos: the loop `uir-jax restore` and the notebooks share ---------------------

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm", ".pnm", ".jp2")


def one_line(message) -> str:
  """A (possibly multi-line) message as one line."""
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def list_photos(inputs: list[str]) -> list[str]:
  """Files, folders (the photos directly inside, by extension) and globs -> photo paths, in order
  and without repeats. Raises ValueError naming every input that names nothing."""
  import glob
  import os

  photos, problems = [], []
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().endswith(PHOTO_EXTENSIONS)
                     and os.path.isfile(os.path.join(item, f)))
      if not found:
        problems.append(f"no photos ({', '.join(PHOTO_EXTENSIONS[:3])}, ...) in folder {item}")
    elif os.path.isfile(item):
      found = [item]
    elif glob.has_magic(item):
      found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
      if not found:
        problems.append(f"no file matches {item}")
    else:
      found = []
      problems.append(f"not found: {item}")
    photos.extend(p for p in found if p not in photos)
  if problems:
    raise ValueError("; ".join(problems))
  return photos


def index_guidance(folder: str) -> dict[str, str]:
  """{file stem: path} of the guidance images directly in `folder` (a photo's guidance is the
  image with its file name, any extension). ValueError, one line naming the folder: missing, not
  a folder, no images in it, or two images with one stem."""
  import os

  if not os.path.exists(folder):
    raise ValueError(f"guidance folder not found: {folder}")
  if not os.path.isdir(folder):
    raise ValueError(f"--guidance must be a folder of guidance images, got the file {folder}")
  index: dict[str, str] = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not (name.lower().endswith(PHOTO_EXTENSIONS) and os.path.isfile(path)):
      continue
    stem = os.path.splitext(name)[0]
    if stem in index:
      raise ValueError(f"guidance folder {folder}: two images named {stem!r} "
                       f"({os.path.basename(index[stem])}, {name})")
    index[stem] = path
  if not index:
    raise ValueError(f"no guidance images ({', '.join(PHOTO_EXTENSIONS[:3])}, ...) in folder "
                     f"{folder}")
  return index


def guidance_of(path: str, index: dict[str, str]) -> str | None:
  """The guidance of photo `path` in an `index_guidance` index (by file stem), or None."""
  import os

  return index.get(os.path.splitext(os.path.basename(path))[0])


def restore_photos(restorer, photos: list[str], output_dir: str, *, seed: int = 0,
                   key_fn=None, words: list[str] | None = None, quiet: bool = False,
                   guidance: dict[str, str] | None = None) -> tuple[int, int]:
  """Restores each photo with `restorer` into `output_dir/<name>.png` and, when it has a DA-CLIP,
  `<name>.json` with the predicted degradation; prints one line per photo and a summary.

  `restorer`: anything with the restorer interface, `embed(images)` -> {content, degradation,
  probabilities} (called only when it has a DA-CLIP: non-empty `words`) and
  `restorer(images, key, embeddings)` (the Flax restorers of a system, or a loaded export).
  DA-CLIP runs once per photo: its embeddings both condition the restorer and give the printed
  degradation. Photo i is restored with
  `key_fn(seed + i)` (default `jax.random.key`). Unreadable photos and failed restorations are
  reported and skipped, never stop the batch. Returns (restored, failed).

  `guidance`: {stem: path} (`index_guidance`) for guided restorers, called as
  `restorer(images, key, None, guidance=guidance_image)`. A photo without its guidance is
  skipped with a warning and counted apart (not failed); an unreadable guidance is a failure
  naming the file.
  """
  import json
  import os
  import sys
  import time

  from tqdm import tqdm

  key_fn = jax.random.key if key_fn is None else key_fn
  words = list(words if words is not None else getattr(restorer, "words", []))
  os.makedirs(output_dir, exist_ok=True)
  failed, used, unguided = 0, set(), 0
  start = time.time()
  bar = tqdm(photos, unit="photo", file=sys.stderr, disable=True if quiet else None,
             dynamic_ncols=True)
  for i, path in enumerate(bar):
    bar.set_postfix_str(os.path.basename(path)[-30:])
    t0 = time.time()
    extra = {}
    if guidance is not None:
      g_path = guidance_of(path, guidance)
      if g_path is None:
        tqdm.write(f"skipping {path}: no guidance image named "
                   f"{os.path.splitext(os.path.basename(path))[0]}.* in the guidance folder",
                   file=sys.stderr)
        unguided += 1
        continue
      try:
        extra["guidance"] = read_rgb(g_path)[None]
      except Exception as e:  # noqa: BLE001 - one unreadable guidance must not stop the batch
        tqdm.write(f"skipping {path}: cannot read its guidance {g_path} as an image "
                   f"({type(e).__name__}: {one_line(e)[:200]})", file=sys.stderr)
        failed += 1
        continue
    try:
      image = read_rgb(path)
    except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the batch
      tqdm.write(f"skipping {path}: cannot read it as an image ({type(e).__name__}: "
                 f"{one_line(e)[:200]})", file=sys.stderr)
      failed += 1
      continue
    try:
      emb = restorer.embed(image[None]) if words else {}  # words: it has a DA-CLIP
      probs = np.asarray(emb["probabilities"])[0] if emb else None
      out = to_uint8(restorer(image[None], key_fn(seed + i), emb or None, **extra)[0])
    except Exception as e:  # noqa: BLE001 - e.g. too large for an export's sizes, or memory
      tqdm.write(f"skipping {path}: {type(e).__name__}: {one_line(e)[:300]}", file=sys.stderr)
      failed += 1
      continue
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:  # same name from two folders: keep both
      n += 1
      name = f"{stem}_{n}"
    used.add(name)
    dest = os.path.join(output_dir, name + ".png")
    Image.fromarray(out).save(dest)
    h, w = image.shape[:2]
    line = f"{path} -> {dest} ({w}x{h}, {time.time() - t0:.1f}s)"
    if probs is not None:
      best = int(np.argmax(probs))
      line += f"  degradation: {words[best]} ({probs[best]:.2f})"
      sidecar = {"input": path, "output": dest, "width": w, "height": h,
                 "degradation": words[best], "probability": float(probs[best]),
                 "probabilities": {word: float(p) for word, p in zip(words, probs, strict=True)}}
      with open(os.path.join(output_dir, name + ".json"), "w") as f:
        json.dump(sidecar, f, indent=1)
    tqdm.write(line, file=sys.stdout)
  bar.close()
  skipped = f", {unguided} skipped without guidance" if unguided else ""
  print(f"{len(photos) - failed - unguided} image(s) restored, {failed} failed{skipped}, "
        f"{time.time() - start:.1f} s (-> {output_dir})")
  return len(photos) - failed - unguided, failed

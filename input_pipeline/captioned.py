"""Image + caption streams for text-to-image training (the SD stage), in numpy and Pillow only.

Sources:
  * `folder_source(root, captions="")`: every image under `root` (recursively, sorted), its
    caption from `captions` (a JSON object {relative path: caption}) or else from the sidecar
    `<image stem>.txt` beside it ("" when neither has one: an unconditional example).
  * `SyntheticSource(n, resolution)`: image `i` is a coloured square on a coloured background
    and its caption says so ("a red square on blue"), drawn from `i` alone: the `:tiny` configs'
    data, with captions the images really depend on.

`batches(source, ...)` is the stream the training spine reads (`loop.Stage.batches`), held to the
spine's contract like `input_pipeline.pipelines`: example `g` (the global index, laid out batch by
batch, this host's contiguous block of each batch) is a pure function of (seed, g): the item is
epoch `g // n`'s permutation at `g % n`, and the crop and flip come from `(seed, g)`. So a stream
started at step N equals a fresh one from batch N, which makes a resumed run bit-identical.

Examples: "image" float32 [R, R, 3] in [0, 1] (shorter side resized to R with Lanczos, then a
random crop for training or the centre crop, random horizontal flip for training), "caption"
(str), "index" int64; "control" float32 [R, R, 3] in [0, 1] (a ControlNet's condition image) when
a control is asked for: "edges" (Sobel magnitude of the luma, normalised per image), "gray", or
a folder of condition images with the same relative paths (`control_root`). Evaluation streams
(`train=False`) make one pass in file order, centre crops, no flips, the last batch padded and
"mask" marking its real rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CONTROLS = ("none", "edges", "gray", "folder")
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9),
          "yellow": (0.95, 0.9, 0.1), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05)}


class FolderSource:
  """Images of a folder with their captions (see the module docstring)."""

  def __init__(self, root: str, paths: Sequence[str], captions: Sequence[str]):
    self.root, self.paths, self.captions = root, list(paths), list(captions)

  @property
  def num_items(self) -> int:
    return len(self.paths)

  def image(self, item: int) -> np.ndarray:
    return load_rgb(os.path.join(self.root, self.paths[item]))

  def caption(self, item: int) -> str:
    return self.captions[item]


def load_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] of any Pillow image (grayscale / palette / alpha converted to RGB)."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None


def folder_source(root: str, captions: str = "") -> FolderSource:
  """Every image under `root` with its caption (JSON file `captions`, else `<stem>.txt`)."""
  if not root or not os.path.isdir(root):
    raise FileNotFoundError(f"data.root: no such folder: {root!r}")
  paths = sorted(os.path.relpath(os.path.join(d, f), root)
                 for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"data.root {root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
  table = None
  if captions:
    with open(captions, encoding="utf-8") as f:
      table = json.load(f)
    if not isinstance(table, dict):
      raise ValueError(f"data.captions {captions}: expected a JSON object {{relative path: "
                       "caption}")
  texts = []
  for p in paths:
    if table is not None:
      texts.append(str(table.get(p, table.get(p.replace(os.sep, "/"), ""))))
      continue
    sidecar = os.path.join(root, os.path.splitext(p)[0] + ".txt")
    texts.append(open(sidecar, encoding="utf-8").read().strip()
                 if os.path.isfile(sidecar) else "")
  return FolderSource(root, paths, texts)


class SyntheticSource:
  """`n` images "a <colour> square on <colour>" of `resolution`² (see the module docstring)."""

  def __init__(self, n: int, resolution: int):
    if n < 1 or resolution < 4:
      raise ValueError(f"synthetic data: need num_items >= 1 and resolution >= 4, got {n}, "
                       f"{resolution}")
    self.n, self.resolution, self.paths = n, resolution, [f"synthetic/{i}" for i in range(n)]

  @property
  def num_items(self) -> int:
    return self.n

  def _draw(self, item: int) -> tuple[str, str, int, int, int]:
    r = np.random.default_rng([7, item])
    names = list(COLORS)
    fg, bg = r.choice(len(names), 2, replace=False)
    size = self.resolution
    side = int(r.integers(size // 3, size // 2 + 1))
    y, x = (int(v) for v in r.integers(0, size - side + 1, 2))
    return names[fg], names[bg], side, y, x

  def image(self, item: int) -> np.ndarray:
    fg, bg, side, y, x = self._draw(item)
    out = np.empty((self.resolution, self.resolution, 3), np.float32)
    out[:] = COLORS[bg]
    out[y:y + side, x:x + side] = COLORS[fg]
    return np.round(out * 255).astype(np.uint8)

  def caption(self, item: int) -> str:
    fg, bg, *_ = self._draw(item)
    return f"a {fg} square on {bg}"


def _resize(rgb: np.ndarray, res: int) -> np.ndarray:
  """Shorter side -> res (Lanczos); already that size: unchanged."""
  h, w = rgb.shape[:2]
  if min(h, w) == res:
    return rgb
  s = res / min(h, w)
  size = (max(res, round(w * s)), max(res, round(h * s)))
  return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def _crop_offset(shape: tuple[int, ...], res: int, rng: np.random.Generator | None
                 ) -> tuple[int, int]:
  """A res² window of an image of `shape`: random with `rng`, else centred."""
  h, w = shape[:2]
  if rng is None:
    return (h - res) // 2, (w - res) // 2
  return int(rng.integers(0, h - res + 1)), int(rng.integers(0, w - res + 1))


def edges(image: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude of the luma, / its maximum, as 3 channels [H, W, 3] in [0, 1]."""
  y = image @ np.asarray([0.299, 0.587, 0.114], np.float32)
  p = np.pad(y, 1, mode="edge")
  gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
  gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
  m = np.sqrt(gx * gx + gy * gy)
  m = m / max(float(m.max()), 1e-6)
  return np.repeat(m[..., None], 3, axis=-1).astype(np.float32)


class Examples:
  """Example `g` of a source under a run seed: image, caption, control (module docstring)."""

  def __init__(self, source, resolution: int, *, random_flip: bool = True, random_crop: bool = True,
               control: str = "none", control_root: str = ""):
    if control not in CONTROLS:
      raise ValueError(f"data.control must be one of {CONTROLS}, got {control!r}")
    if control == "folder" and not os.path.isdir(control_root or ""):
      raise FileNotFoundError(f"data.control_root: no such folder: {control_root!r}")
    self.source, self.resolution = source, int(resolution)
    self.random_flip, self.random_crop = random_flip, random_crop
    self.control, self.control_root = control, control_root

  def __call__(self, item: int, seed: int, gidx: int, train: bool) -> dict:
    rng = np.random.default_rng([seed, gidx]) if train else None
    res = self.resolution
    source_image = self.source.image(item)
    image = _resize(source_image, res)
    y, x = _crop_offset(image.shape, res, rng if self.random_crop else None)
    image = image[y:y + res, x:x + res]
    flip = bool(train and self.random_flip and rng.random() < 0.5)
    image = image.astype(np.float32) / 255.0
    out = {"caption": self.source.caption(item), "index": np.int64(gidx)}
    if self.control == "folder":  # the same resize, crop and flip as its image
      path = os.path.join(self.control_root, self.source.paths[item])
      cond = load_rgb(path)
      if cond.shape[:2] != source_image.shape[:2]:
        raise ValueError(f"{path}: the condition image's size {cond.shape[:2]} differs from its "
                         f"image's {source_image.shape[:2]}")
      cond = _resize(cond, res)[y:y + res, x:x + res].astype(np.float32) / 255.0
    elif self.control == "edges":
      cond = edges(image)
    elif self.control == "gray":
      cond = np.repeat((image @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None], 3, -1)
    else:
      cond = None
    if flip:
      image = image[:, ::-1]
      cond = cond[:, ::-1] if cond is not None else None
    out["image"] = np.ascontiguousarray(image)
    if cond is not None:
      out["control"] = np.ascontiguousarray(cond, dtype=np.float32)
    return out


def epoch_item(gidx: int, n: int, seed: int) -> int:
  """The item of global example `gidx`: epoch gidx // n's permutation of the n items."""
  epoch, pos = divmod(int(gidx), n)
  return int(np.random.default_rng([seed, 1, epoch]).permutation(n)[pos])


def _stack(examples: list[dict]) -> dict:
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "caption"}
  out["caption"] = np.asarray([e["caption"] for e in examples], dtype=object)
  return out


def batches(examples: Examples, *, batch_size: int, seed: int, train: bool, start_step: int = 0,
            process_index: int = 0, process_count: int = 1, split: str | None = None
            ) -> Iterator[dict]:
  """This host's batches (numpy dicts) from step `start_step` on; see the module docstring.
  (`split` is accepted for the spine's signature: a held-out folder is another `Examples`.)"""
  del split
  if batch_size < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need batch_size >= 1 and 0 <= process_index < process_count, got "
                     f"{batch_size}, {process_index}, {process_count}")
  n, b = examples.source.num_items, batch_size
  step = start_step
  while True:
    first = step * b * process_count + process_index * b
    rows = range(first, first + b)
    if train:
      yield _stack([examples(epoch_item(g, n, seed), seed, g, True) for g in rows])
    else:
      if step * b * process_count >= n:
        return
      batch = _stack([examples(g % n, seed, g, False) for g in rows])
      batch["mask"] = np.asarray([g < n for g in rows])
      yield batch
    step += 1

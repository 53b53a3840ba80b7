"""Dataset readers: each turns a dataset on disk (or the embedded photos) into a `Source`.

A `Source` is what `pipelines.py` needs to build a stream that is a pure function of
(seed, example index): a table of items, a graph function `load(item)` that reads one item, and a
graph function `sample(index, seed)` that picks the item a training example uses. Nothing here
depends on the order examples are produced in, so per-host sharding and resuming at step N are
just index arithmetic in the pipeline.

Sources (spec §3, §8.1; wild paper §3.2):
* `universal_source`: the ten-task layout `root/{train,val}/<degradation>/{LQ,GT}/*`, LQ and GT
  paired by sorted file name. Training is class-balanced: each example picks a degradation
  uniformly, then a pair of that degradation uniformly (the reference's `MD_dataset` does
  `index % 10` then a random image; a uniform pick has the same balance in expectation and needs no
  coordination between hosts). Validation interleaves the classes (the reference's val order).
* `csv_source`: DA-CLIP's caption CSV (tab-separated, `filepath` = LQ path, `title` =
  "caption: degradation"). The title is split on its LAST ": ", so captions that contain ": "
  work (the reference's `split(': ')` raised on them). The GT is found by replacing the LQ
  path's last `LQ` folder with `GT`; without one, GT = LQ and the count is logged.
* `folder_source`: any folder of clean images (recursive), degraded on the fly (wild-IR's MDGT).
* `paired_source`: LQ and GT folders (`root/<split>/{LQ,GT}`, any folder names, nested), paired
  by relative path without the extension (GoPro, DPDD).

Every source but the CSV takes an optional guidance folder (guided restoration,
`input_pipeline.guidance`): one image per photo under the same key; its "guidance" image joins
each item, and photos without one are skipped and counted ("no_guidance").
* `quickstart_source`: scikit-image's bundled colour photos with our captions
  (`data/quickstart_captions.json`), degraded on the fly; no download needed.

Training samplers for single-list sources draw without replacement per epoch: example i is item
`permute(i mod n)` of epoch `i // n`, with a keyed Feistel permutation (O(1) per example, no
shuffle buffer, so the stream can start at any index).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from input_pipeline import guidance as guidance_files
from input_pipeline import image_io

# The ten degradation names (spec §3.2) and the file pairing are shared with uir_jax.evaluate.
from uir_jax.data_layout import DEGRADATIONS, list_universal_pairs  # noqa: F401 (re-exported)

SPLITS = ("train", "val")

QUICKSTART_CAPTIONS = os.path.join(os.path.dirname(__file__), "data", "quickstart_captions.json")


@dataclasses.dataclass
class Source:
  """A dataset as the pipelines see it.

  Attributes:
    name: for logs.
    num_items: number of items (one pass of an evaluation pipeline).
    paired: True if `load` returns an "lq" read from disk; False if the pipeline degrades "gt".
    load: graph fn, int64 item -> {"gt": float32 [H, W, 3], ("lq": same shape,) "label": int32
      (index into DEGRADATIONS, -1 if none), "caption": string, "degradation": string}.
    sample: graph fn, (int64 example index, int32[2] seed) -> int64 item, for training.
    eval_items: item order for evaluation (int64 [num_items]).
    counts: what the validation pass found (see `image_io.scan_images`), plus reader counts.
    guided: True if `load` also returns a "guidance" image (float32 [Hg, Wg, 3]) per item
      (`input_pipeline.guidance`).
  """

  name: str
  num_items: int
  paired: bool
  load: Callable[[tf.Tensor], dict]
  sample: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
  eval_items: np.ndarray
  counts: collections.Counter
  guided: bool = False


# --- Samplers. ------------------------------------------------------------------------------------


def _round_hash(key, value, bits):
  """Pseudo-random int64 in [0, 2**bits) from an int32[2] key and an int64 value."""
  seed = tf.random.experimental.stateless_fold_in(key, value)
  r = tf.random.stateless_uniform([], seed, minval=0, maxval=1 << bits, dtype=tf.int64)
  return r


def permute_index(position, n: int, key, rounds: int = 4):
  """A keyed bijection of [0, n) (Feistel network on 2h bits + cycle walking), in graph ops.

  position: int64 scalar in [0, n); key: int32[2]. Different keys give independent permutations.
  """
  if n <= 1:
    return tf.zeros_like(tf.cast(position, tf.int64))
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  keys = [tf.random.experimental.stateless_fold_in(key, r) for r in range(rounds)]

  def feistel(x):
    left, right = tf.bitwise.right_shift(x, half), tf.bitwise.bitwise_and(x, mask)
    for k in keys:
      left, right = right, tf.bitwise.bitwise_xor(left, _round_hash(k, right, half))
    return tf.bitwise.bitwise_or(tf.bitwise.left_shift(left, half), right)

  x = feistel(tf.cast(position, tf.int64))
  # Cycle walking: the permutation of [0, 4**half) restricted to [0, n) follows the cycle until it
  # comes back into range (expected < 4 steps since 4**half < 4n).
  return tf.while_loop(lambda x: x >= n, lambda x: (feistel(x),), (x,))[0]


def epoch_sampler(n: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Each epoch of n examples visits every item once, in a fresh order per (seed, epoch)."""

  def sample(index, seed):
    index = tf.cast(index, tf.int64)
    key = tf.random.experimental.stateless_fold_in(seed, index // n)
    return permute_index(index % n, n, key)

  return sample


def balanced_sampler(class_sizes: Sequence[int]) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Picks a class uniformly (among non-empty ones), then one of its items uniformly.

  Items are numbered class by class (class c owns [offset_c, offset_c + size_c)).
  """
  sizes = np.asarray(class_sizes, np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  present = np.flatnonzero(sizes > 0)
  if not len(present):
    raise ValueError("balanced_sampler needs at least one non-empty class")
  sizes_t, offsets_t = tf.constant(sizes[present]), tf.constant(offsets[present])

  def sample(index, seed):
    del index  # The seed is already per example.
    seeds = tf.random.experimental.stateless_split(seed, 2)
    c = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=len(present), dtype=tf.int64)
    j = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=tf.gather(sizes_t, c),
                                    dtype=tf.int64)
    return tf.gather(offsets_t, c) + j

  return sample


def interleave_classes(class_sizes: Sequence[int]) -> np.ndarray:
  """Round-robin item order over classes (items numbered class by class), as the reference's val."""
  offsets = np.concatenate([[0], np.cumsum(class_sizes)[:-1]]).astype(np.int64)
  order = []
  for j in range(max(class_sizes, default=0)):
    order.extend(int(offsets[c] + j) for c, size in enumerate(class_sizes) if j < size)
  return np.asarray(order, np.int64)


# --- Shared pieces. -------------------------------------------------------------------------------


def _label_of(degradation: str) -> int:
  return DEGRADATIONS.index(degradation) if degradation in DEGRADATIONS else -1


def _with_guidance(keys: Sequence[str], guidance_dir: str, *, name: str, validate: bool
                   ) -> tuple[list[int], list[str] | None, collections.Counter]:
  """(indices of the items that have a guidance image, their guidance paths, counts); with no
  `guidance_dir`: every item, None, no counts. Photos without guidance are skipped and counted
  (`guidance.match_guidance`); none at all is an error."""
  if not guidance_dir:
    return list(range(len(keys))), None, collections.Counter()
  paths, counts = guidance_files.match_guidance(keys, guidance_dir, name=name, validate=validate)
  keep = [i for i, p in enumerate(paths) if p is not None]
  if not keep:
    raise ValueError(f"{name}: none of its {len(keys)} photo(s) has a guidance image in "
                     f"{guidance_dir} (looked up by {keys[0]!r} and the like, any extension)")
  return keep, [paths[i] for i in keep], counts


def _unpaired_source(name: str, paths: Sequence[str], captions: Sequence[str], *, min_size: int,
                     validate: bool, memory_budget: int = 0,
                     guidance: Sequence[str] | None = None) -> Source:
  """Clean images (GT only), degraded on the fly by the pipeline; `guidance`: one guidance image
  path per image, or None.

  When the scan shows the decoded 8-bit images fit in `memory_budget` bytes, they are decoded once
  and kept in memory (one flat uint8 tensor), so training skips the per-example decode of a
  full-size image for a small crop (the quickstart photos take ~35 MB).
  """
  paths, captions = list(paths), list(captions)
  guidance = list(guidance) if guidance is not None else None
  infos = None
  if validate:
    scan = image_io.scan_images(paths, min_size=min_size, name=name)
    keep = [i for i, info in enumerate(scan.infos) if info is not None]
    paths, captions, counts = [paths[i] for i in keep], [captions[i] for i in keep], scan.counts
    infos = [scan.infos[i] for i in keep]
    guidance = [guidance[i] for i in keep] if guidance is not None else None
  else:
    counts = collections.Counter(ok=len(paths))
  if not paths:
    raise ValueError(f"{name}: no decodable images")
  caption_t = tf.constant(captions)
  in_memory = (infos is not None and all(i.bit_depth == 8 for i in infos)
               and sum(3 * i.height * i.width for i in infos) <= memory_budget)
  if in_memory:
    arrays = [np.round(image_io.read_image_numpy(p) * 255).astype(np.uint8) for p in paths]
    shapes = tf.constant([a.shape[:2] for a in arrays], tf.int64)
    offsets = tf.constant(np.cumsum([0] + [a.size for a in arrays[:-1]]), tf.int64)
    flat = tf.constant(np.concatenate([a.reshape(-1) for a in arrays]))

    def read(item):
      hw = tf.gather(shapes, item)
      pixels = tf.slice(flat, [tf.gather(offsets, item)], [hw[0] * hw[1] * 3])
      return tf.cast(tf.reshape(pixels, tf.concat([hw, [3]], 0)), tf.float32) / 255.0
  else:
    path_t = tf.constant(paths)
    read = lambda item: image_io.read_image(tf.gather(path_t, item))

  guidance_t = tf.constant(guidance) if guidance is not None else None

  def load(item):
    out = {"gt": read(item), "label": tf.constant(-1), "caption": tf.gather(caption_t, item),
           "degradation": tf.constant("")}
    if guidance_t is not None:
      out["guidance"] = image_io.read_image(tf.gather(guidance_t, item))
    return out

  return Source(name, len(paths), False, load, epoch_sampler(len(paths)),
                np.arange(len(paths), dtype=np.int64), counts, guided=guidance is not None)


def validate_pairs(lq: Sequence[str], gt: Sequence[str], *, min_size: int = 0,
                   name: str = "pairs", validate: bool = True
                   ) -> tuple[list[int], collections.Counter]:
  """Indices of the LQ/GT pairs that decode and have equal sizes, and the counts (logged).

  One scan of every distinct file (`image_io.scan_images`); a pair is skipped when either file is
  undecodable ("corrupt" counts files) or when LQ and GT sizes differ ("size_mismatch" counts
  pairs). "pairs" is the number kept.
  """
  n = len(lq)
  if not validate:
    return list(range(n)), collections.Counter(ok=n, pairs=n)
  unique = sorted(set(lq) | set(gt))
  scan = image_io.scan_images(unique, min_size=min_size, name=name, log=False)
  info = dict(zip(unique, scan.infos, strict=True))
  counts = scan.counts
  keep, mismatched = [], []
  for i in range(n):
    a, b = info[lq[i]], info[gt[i]]
    if a is None or b is None:
      continue
    if (a.height, a.width) != (b.height, b.width):
      mismatched.append(lq[i])
      continue
    keep.append(i)
  counts["size_mismatch"] = len(mismatched)
  counts["pairs"] = len(keep)
  image_io.log_summary(name, counts, bad_paths=scan.bad_paths)
  if mismatched:
    logging.warning("%s: skipped %d pair(s) whose LQ and GT sizes differ, e.g. %s", name,
                    len(mismatched), mismatched[0])
  return keep, counts


def _paired_source(name: str, lq: Sequence[str], gt: Sequence[str], labels: Sequence[int],
                   captions: Sequence[str], degradations: Sequence[str], *, min_size: int,
                   validate: bool, sampler_for: Callable[[list[int]], Callable],
                   eval_order_for: Callable[[list[int]], np.ndarray],
                   guidance: Sequence[str] | None = None) -> Source:
  """LQ/GT pairs; pairs with an undecodable file or unequal LQ/GT sizes are skipped and counted.

  `sampler_for(keep)` / `eval_order_for(keep)` build the sampler and eval order from the indices
  of the pairs that survived the scan (kept in their original order). `guidance`: one guidance
  image path per pair, or None.
  """
  keep, counts = validate_pairs(lq, gt, min_size=min_size, name=name, validate=validate)
  if not keep:
    raise ValueError(f"{name}: no usable LQ/GT pairs")
  take = lambda xs: tf.constant([xs[i] for i in keep])
  lq_t, gt_t, label_t = take(lq), take(gt), tf.constant([int(labels[i]) for i in keep], tf.int32)
  caption_t, deg_t = take(captions), take(degradations)
  guidance_t = take(guidance) if guidance is not None else None

  def load(item):
    out = {"lq": image_io.read_image(tf.gather(lq_t, item))}
    gt_path = tf.gather(gt_t, item)
    out["gt"] = image_io.read_image(gt_path)
    out.update(label=tf.gather(label_t, item), caption=tf.gather(caption_t, item),
               degradation=tf.gather(deg_t, item))
    if guidance_t is not None:
      out["guidance"] = image_io.read_image(tf.gather(guidance_t, item))
    return out

  return Source(name, len(keep), True, load, sampler_for(keep), eval_order_for(keep), counts,
                guided=guidance is not None)


# --- (a) The ten-task layout. ---------------------------------------------------------------------


def resolve_split_dir(root: str, split: str) -> str:
  """`root/split` if it exists, else `root` itself (a root that is already one split)."""
  sub = os.path.join(root, split)
  return sub if os.path.isdir(sub) else root


def universal_source(root: str, split: str = "train", *, min_size: int = 0, validate: bool = True,
                     match_names: bool = True, guidance_dir: str = "") -> Source:
  """The ten-task set (spec §3.1): class-balanced sampling for training, interleaved for eval.

  `guidance_dir`: guidance images keyed `<degradation>/<LQ file stem>` (`input_pipeline.guidance`);
  pairs without one are skipped and counted.
  """
  split_dir = resolve_split_dir(root, split)
  pairs = list_universal_pairs(split_dir, match_names=match_names)
  lq, gt, labels, degs, cls = [], [], [], [], []
  for c, (deg, items) in enumerate(pairs.items()):
    for a, b in items:
      lq.append(a)
      gt.append(b)
      labels.append(_label_of(deg))
      degs.append(deg)
      cls.append(c)
  name = f"universal:{split_dir}"
  keys = [f"{d}/{os.path.splitext(os.path.basename(a))[0]}" for d, a in zip(degs, lq, strict=True)]
  has, guidance, guidance_counts = _with_guidance(keys, guidance_dir, name=name, validate=validate)
  lq, gt, labels, degs, cls = ([xs[i] for i in has] for xs in (lq, gt, labels, degs, cls))

  def class_sizes(keep):
    return np.bincount(np.asarray(cls, np.int64)[keep], minlength=len(pairs)).tolist()

  source = _paired_source(name, lq, gt, labels, [""] * len(lq), degs,
                          min_size=min_size, validate=validate,
                          sampler_for=lambda keep: balanced_sampler(class_sizes(keep)),
                          eval_order_for=lambda keep: interleave_classes(class_sizes(keep)),
                          guidance=guidance)
  source.counts.update(guidance_counts)
  return source


def paired_source(root: str, split: str = "train", *, lq_folder: str = "LQ",
                  gt_folder: str = "GT", min_size: int = 0, validate: bool = True,
                  guidance_dir: str = "") -> Source:
  """LQ/GT folders `root/<split>/<lq_folder>` and `.../<gt_folder>` (or `root/<lq_folder>` when
  there is no split folder), searched recursively and paired by relative path without the
  extension (GoPro's `blur/<sequence>/<frame>` with `sharp/<sequence>/<frame>`). LQ images
  without a GT are skipped and counted ("no_gt"). `guidance_dir`: guidance images under the same
  keys; pairs without one are skipped and counted."""
  split_dir = resolve_split_dir(root, split)
  lq_dir, gt_dir = os.path.join(split_dir, lq_folder), os.path.join(split_dir, gt_folder)
  for d in (lq_dir, gt_dir):
    if not os.path.isdir(d):
      raise ValueError(f"paired data: folder {d!r} does not exist (expected "
                       f"<root>/<split>/{{{lq_folder},{gt_folder}}})")
  gts = {guidance_files.photo_key(p, gt_dir): p for p in image_io.list_images(gt_dir)}
  lqs = image_io.list_images(lq_dir)
  keys = [guidance_files.photo_key(p, lq_dir) for p in lqs]
  has_gt = [i for i, k in enumerate(keys) if k in gts]
  name = f"paired:{split_dir}"
  if len(has_gt) < len(lqs):
    logging.warning("%s: skipped %d LQ image(s) without a GT of the same name in %s, e.g. %r",
                    name, len(lqs) - len(has_gt), gt_dir,
                    next(k for k in keys if k not in gts))
  if not has_gt:
    raise ValueError(f"{name}: no LQ image in {lq_dir} has a GT of the same name in {gt_dir}")
  keys = [keys[i] for i in has_gt]
  has, guidance, guidance_counts = _with_guidance(keys, guidance_dir, name=name, validate=validate)
  lq = [lqs[has_gt[i]] for i in has]
  gt = [gts[keys[i]] for i in has]
  n = len(lq)
  source = _paired_source(name, lq, gt, [-1] * n, [""] * n, [""] * n, min_size=min_size,
                          validate=validate, sampler_for=lambda keep: epoch_sampler(len(keep)),
                          eval_order_for=lambda keep: np.arange(len(keep), dtype=np.int64),
                          guidance=guidance)
  source.counts.update(guidance_counts)
  source.counts["no_gt"] = len(lqs) - len(has_gt)
  return source


# --- (b) DA-CLIP caption CSV. ---------------------------------------------------------------------


def split_title(title: str) -> tuple[str, str] | None:
  """"caption: degradation" -> (caption, degradation), split on the LAST ": "; None if absent."""
  caption, sep, degradation = title.rpartition(": ")
  if not sep or not degradation.strip():
    return None
  return caption.strip(), degradation.strip()


def _gt_path_for(lq_path: str) -> str | None:
  parts = lq_path.split(os.sep)
  for i in range(len(parts) - 2, -1, -1):  # The last folder named LQ (never the file name).
    if parts[i] == "LQ":
      candidate = os.sep.join(parts[:i] + ["GT"] + parts[i + 1:])
      return candidate if os.path.isfile(candidate) else None
  return None


def read_caption_csv(csv_path: str, *, img_key: str = "filepath", caption_key: str = "title"
                     ) -> tuple[list[dict], collections.Counter]:
  """Rows of a DA-CLIP CSV as dicts {lq, gt, caption, degradation}, plus counts of skipped rows.

  Relative image paths are resolved against the CSV's folder. Rows whose title has no
  ": degradation" part ("bad_title") or whose file does not exist ("missing") are skipped.
  """
  base = os.path.dirname(os.path.abspath(csv_path))
  counts = collections.Counter(bad_title=0, missing=0, no_gt=0)
  rows = []
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing_cols = {img_key, caption_key} - set(reader.fieldnames or ())
    if missing_cols:
      raise ValueError(f"{csv_path}: missing column(s) {sorted(missing_cols)}; found "
                       f"{reader.fieldnames} (expected a tab-separated file with a header)")
    for row in reader:
      parts = split_title(row[caption_key] or "")
      if parts is None:
        counts["bad_title"] += 1
        continue
      path = row[img_key]
      if not os.path.isabs(path):
        path = os.path.join(base, path)
      if not os.path.isfile(path):
        counts["missing"] += 1
        continue
      gt = _gt_path_for(path)
      counts["no_gt"] += gt is None
      rows.append({"lq": path, "gt": gt or path, "caption": parts[0], "degradation": parts[1]})
  return rows, counts


def csv_source(csv_path: str, *, min_size: int = 0, validate: bool = True,
               img_key: str = "filepath", caption_key: str = "title") -> Source:
  """DA-CLIP's CSV (spec §3.3): LQ images with caption and degradation text."""
  rows, row_counts = read_caption_csv(csv_path, img_key=img_key, caption_key=caption_key)
  if not rows:
    raise ValueError(f"{csv_path}: no usable rows ({dict(row_counts)})")
  if row_counts["bad_title"] or row_counts["missing"] or row_counts["no_gt"]:
    logging.warning("%s: %s (rows without GT use the LQ image as GT)", csv_path, dict(row_counts))
  degs = [r["degradation"] for r in rows]
  source = _paired_source(
      f"csv:{csv_path}", [r["lq"] for r in rows], [r["gt"] for r in rows],
      [_label_of(d) for d in degs], [r["caption"] for r in rows], degs, min_size=min_size,
      validate=validate, sampler_for=lambda keep: epoch_sampler(len(keep)),
      eval_order_for=lambda keep: np.arange(len(keep), dtype=np.int64))
  source.counts.update(row_counts)
  return source


# --- (c) A folder of clean images. ----------------------------------------------------------------


def folder_source(root: str, *, min_size: int = 0, validate: bool = True,
                  memory_budget: int = 256 << 20, captions: str = "",
                  guidance_dir: str = "") -> Source:
  """Every image under `root` (recursive, sorted), degraded on the fly.

  Folders whose decoded images fit in `memory_budget` bytes are held in memory. `captions`: an
  optional JSON file {path relative to root: caption} (DA-CLIP training of clean photos; images
  without an entry get the empty caption). `guidance_dir`: guidance images keyed by the path
  relative to `root` without the extension; images without one are skipped and counted.
  """
  paths = image_io.list_images(root)
  if not paths:
    raise ValueError(f"{root}: no image files ({', '.join(image_io.IMAGE_EXTENSIONS)})")
  texts = [""] * len(paths)
  if captions:
    with open(captions, encoding="utf-8") as f:
      table = json.load(f)
    if not isinstance(table, dict):
      raise ValueError(f"{captions}: expected a JSON object {{relative path: caption}}")
    texts = [str(table.get(os.path.relpath(p, root), "")) for p in paths]
    logging.info("%s: captions for %d of %d images", captions, sum(map(bool, texts)), len(paths))
  name = f"folder:{root}"
  keys = [guidance_files.photo_key(p, root) for p in paths]
  has, guidance, guidance_counts = _with_guidance(keys, guidance_dir, name=name, validate=validate)
  source = _unpaired_source(name, [paths[i] for i in has], [texts[i] for i in has],
                            min_size=min_size, validate=validate, memory_budget=memory_budget,
                            guidance=guidance)
  source.counts.update(guidance_counts)
  return source


# --- (e) The embedded quickstart photos. ----------------------------------------------------------


def quickstart_entries() -> list[dict]:
  """[{name, path, caption}] for the bundled scikit-image colour photos (no network needed)."""
  import skimage.data  # Imported here: only this source needs scikit-image.

  with open(QUICKSTART_CAPTIONS, encoding="utf-8") as f:
    images = json.load(f)["images"]
  data_dir = os.path.dirname(skimage.data.__file__)
  return [{"name": e["name"], "path": os.path.join(data_dir, e["file"]), "caption": e["caption"]}
          for e in images]


def quickstart_source(*, min_size: int = 0, validate: bool = True,
                      holdout: Sequence[str] = (), train: bool = True,
                      guidance_dir: str = "") -> Source:
  """scikit-image's bundled colour photos with our captions, degraded on the fly.

  holdout: names of photos that form the evaluation split (`train=False`) while the others form
  the training split, so evaluation sees photos training never did; () = every photo in both.
  guidance_dir: guidance images keyed by the photos' names ("astronaut.png", ...).
  """
  entries = quickstart_entries()
  names = [e["name"] for e in entries]
  unknown = sorted(set(holdout) - set(names))
  if unknown or len(set(holdout)) >= len(names):
    raise ValueError(f"holdout must name some (not all) of the quickstart photos {names}, got "
                     f"{list(holdout)}")
  if holdout:
    entries = [e for e in entries if (e["name"] in holdout) != train]
  has, guidance, guidance_counts = _with_guidance([e["name"] for e in entries], guidance_dir,
                                                  name="quickstart", validate=validate)
  entries = [entries[i] for i in has]
  source = _unpaired_source("quickstart", [e["path"] for e in entries],
                            [e["caption"] for e in entries], min_size=min_size, validate=validate,
                            memory_budget=256 << 20, guidance=guidance)
  source.counts.update(guidance_counts)
  return source


# --- From a config. -------------------------------------------------------------------------------


def source_from_config(cfg, *, train: bool) -> Source:
  """Builds the Source named by `cfg.source` ("quickstart" | "folder" | "universal" | "paired" |
  "csv").

  Keys: `patch_size` (counts small images), `validate` (default True), `root` (folder,
  universal, paired), `csv_path` (csv; `val_csv_path` for evaluation if given), `split` /
  `val_split` (universal, paired; default "train" / "val"), `match_names` (universal, default
  True), `lq_folder` / `gt_folder` (paired; default "LQ" / "GT"), `guidance_root` (every source
  but csv: a folder of guidance images, its `<split>/` subfolder if present; see
  `input_pipeline.guidance`).
  """
  get = cfg.get
  min_size, validate = int(get("patch_size", 0) or 0), bool(get("validate", True))
  kind = cfg.source
  split = get("split", "train") if train else get("val_split", "val")
  guidance_root = get("guidance_root", "") or ""
  guidance_dir = guidance_files.split_folder(guidance_root, split) if guidance_root else ""
  if guidance_dir and kind == "csv":
    raise ValueError("data.guidance_root is not supported with the csv source (use folder, "
                     "universal, paired or quickstart)")

  def need(key):
    value = get(key, None)
    if not value:
      raise ValueError(f"data source {kind!r} needs config key {key!r}")
    return value

  if kind == "quickstart":
    return quickstart_source(min_size=min_size, validate=validate,
                             holdout=tuple(get("holdout", ()) or ()), train=train,
                             guidance_dir=guidance_dir)
  if kind == "folder":
    root = get("val_root", None) if not train else None
    return folder_source(root or need("root"), min_size=min_size, validate=validate,
                         memory_budget=int(get("memory_budget", 256 << 20)),
                         captions=get("captions", "") or "", guidance_dir=guidance_dir)
  if kind == "universal":
    return universal_source(need("root"), split, min_size=min_size, validate=validate,
                            match_names=bool(get("match_names", True)),
                            guidance_dir=guidance_dir)
  if kind == "paired":
    return paired_source(need("root"), split, lq_folder=get("lq_folder", "LQ") or "LQ",
                         gt_folder=get("gt_folder", "GT") or "GT", min_size=min_size,
                         validate=validate, guidance_dir=guidance_dir)
  if kind == "csv":
    path = get("val_csv_path", None) if not train else None
    return csv_source(path or need("csv_path"), min_size=min_size, validate=validate)
  raise ValueError(f"unknown data source {kind!r}; expected quickstart, folder, universal, paired "
                   "or csv")

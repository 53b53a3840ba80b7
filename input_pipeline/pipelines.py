"""tf.data pipelines for restoration training and evaluation: crops, flips, degradations, batches.

Every example is a pure function of (seed, global example index): its item, crop, flips, grayscale
draw and degradation all come from stateless TF random ops seeded by `example_seed(seed, index)`.
So the same seed gives identical batches, a stream started at `start_step=N` is exactly the
stream from batch N of a fresh one (nothing to fast-forward, no shuffle buffer to restore), and
parallel map calls cannot change the result.

Global example indices are laid out batch by batch: global batch b holds indices
[b * B * hosts, (b + 1) * B * hosts), and host h takes the contiguous block
[b * B * hosts + h * B, ... + B). The hosts' shards are disjoint and together cover every index.

Training (`train=True`, an infinite stream; spec §7.1, §8.1):
  item (class-balanced or per-epoch permutation) -> reflect-pad to `patch_size` if smaller ->
  the same random crop of LQ and GT -> the same random hflip / vflip / transpose (the 8 dihedral
  transforms, as the reference's `util.augment`) -> for sources without LQ files: GT to gray with
  probability `gray_prob` (wild-IR) and LQ = `degradations.random_degrade(GT)`.
Evaluation (`train=False`, finite): items in the source's eval order, centre crops, no flips, no
  gray; the last batch is padded (repeating items) and the "mask" key marks the real examples.
Optional CLIP branch (`clip_lq=True`): "clip_lq" = the reference's `clip_transform` of the LQ
  crop (`clip_image`: 8 bits, Pillow-exact antialiased bicubic to 224 x 224, OpenAI mean / std;
  spec §3.4, §7.1 step 6); with `clip_view="crop"` instead its full-resolution centre crop of
  `clip_size` (`clip_crop`: small CLIPs, e.g. the quickstart's, see the degradation's pixels).

Batches are numpy dicts: "lq", "gt" float32 [B, P, P, 3] in [0, 1]; "words" bool [B, 4] (what
the on-the-fly degradation added, over `degradations.DEGRADATION_WORDS`; all False for paired
data); "label" int32 [B] (index into `readers.DEGRADATIONS`, -1 if none); "caption",
"degradation" bytes [B]; "index" int64 [B] (global example index); "mask" bool [B] (eval only);
"clip_lq" float32 [B, 224, 224, 3] (when asked); "guidance" float32 [B, P, P, 3] for guided
sources (or `synthetic_guidance`): the guidance region matching the crop, with the crop's flips
(the rule: `input_pipeline.guidance`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from input_pipeline import degradations, image_io, readers, registry
from input_pipeline import guidance as guidance_crops

# TF must not claim accelerator memory that JAX needs.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Already initialised by someone else; nothing to do.
  pass

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Same values as uir_jax.preprocess.
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
# BT.601 luma, what cv2.COLOR_BGR2GRAY computes (weights here in RGB order).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# Sub-seed numbers of an example seed.
_SAMPLE, _CROP, _FLIP, _GRAY, _DEGRADE = range(5)


def example_seed(seed: int, index) -> tf.Tensor:
  """int32[2] seed of the example with global index `index` (int64) under run seed `seed`."""
  seed = int(seed)
  base = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int32)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def _sub(seed, n):
  return tf.random.experimental.stateless_fold_in(seed, n)


def global_index(local, batch_size: int, process_index: int, process_count: int):
  """Global example index of this host's `local`-th example (see the module docstring)."""
  local = tf.cast(local, tf.int64)
  b, j = local // batch_size, local % batch_size
  return b * batch_size * process_count + process_index * batch_size + j


def random_crop(images, size: int, seed):
  """The same random size x size window of each (equal-shape) image."""
  h, w = tf.shape(images[0])[0], tf.shape(images[0])[1]
  seeds = tf.random.experimental.stateless_split(seed, 2)
  y = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=h - size + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=w - size + 1, dtype=tf.int32)
  return [x_[y:y + size, x:x + size] for x_ in images]


def center_crop(images, size: int):
  h, w = tf.shape(images[0])[0], tf.shape(images[0])[1]
  y, x = (h - size) // 2, (w - size) // 2
  return [im[y:y + size, x:x + size] for im in images]


def random_dihedral(images, seed, *, use_flip: bool = True, use_rot: bool = True):
  """The reference's `augment`: hflip (p 0.5); with use_rot also vflip and transpose (p 0.5 each).

  The same draw is applied to every image.
  """
  draws = tf.random.stateless_uniform([3], seed) < 0.5
  out = list(images)
  if use_flip:
    out = [tf.cond(draws[0], lambda x=x: tf.reverse(x, [1]), lambda x=x: x) for x in out]
  if use_rot:
    out = [tf.cond(draws[1], lambda x=x: tf.reverse(x, [0]), lambda x=x: x) for x in out]
    out = [tf.cond(draws[2], lambda x=x: tf.transpose(x, [1, 0, 2]), lambda x=x: x) for x in out]
  return out


def to_gray3(image):
  """RGB -> BT.601 gray, repeated to 3 channels (cv2 BGR2GRAY then GRAY2BGR)."""
  gray = tf.tensordot(image, tf.constant(_GRAY_WEIGHTS, image.dtype), axes=[[-1], [0]])
  return tf.repeat(gray[..., None], 3, axis=-1)


def _pil_pass(x, in_size: int, out_size: int, axis: int):
  """One Pillow bicubic pass over integer-valued float32 [H, W, C] along axis 0 (H) or 1 (W):
  Pillow's fixed-point weights as a dense matrix (a matmul), then its round-half-up and clamp."""
  if in_size == out_size:
    return x
  from uir_jax.preprocess import pil_bicubic_weights  # numpy at trace time; jax is not called

  weights = tf.constant(pil_bicubic_weights(in_size, out_size) / float(1 << 22), tf.float32)
  if axis == 1:
    x = tf.transpose(x, [1, 0, 2])
  rest = x.shape[1:]  # static: (other side, channels)
  # A plain [out, in] x [in, rest] matmul (an einsum over the middle axis costs ~1.6x more).
  y = tf.reshape(tf.matmul(weights, tf.reshape(x, [in_size, -1])), [out_size, *rest])
  y = tf.clip_by_value(tf.floor(y + 0.5), 0.0, 255.0)
  return tf.transpose(y, [1, 0, 2]) if axis == 1 else y


def clip_image(lq, size: int = CLIP_SIZE):
  """LQ [H, W, 3] in [0, 1] -> CLIP input [size, size, 3]: the reference's `clip_transform`.

  (`size` is 224 for every released CLIP; smaller CLIPs, e.g. the quickstart's, take their own.)

  8-bit image, PIL bicubic resize of the shortest side to 224 (antialiased, rounded and clamped to
  8 bits after each pass, horizontal pass first when the height does not shrink much more than
  the width: Pillow's order, see `uir_jax.preprocess`), centre crop, OpenAI mean/std. With a
  static size (every pipeline's patches) the passes are matmuls with Pillow's own fixed-point
  weights: equal to PIL up to float32 rounding at exact half levels (a pixel in ~10^4 off by one
  level), and ~2x cheaper on one core than tf.image.resize's antialiased kernel (0.96 vs 1.8 ms
  at 256 -> 224). A dynamic size falls back to tf.image.resize (Keys a = -0.5 with antialiasing,
  no 8-bit rounding between passes: up to a few levels from PIL at edges).

  Differs from the reference in one place on purpose: the 8-bit image is `round(x * 255)`, not
  numpy's truncating `astype(uint8)`, which turns a /255 level stored as k - 1 ulp into k - 1.
  """
  from uir_jax.preprocess import center_crop_offsets, shortest_side_size, vertical_first

  lq = tf.convert_to_tensor(lq, tf.float32)
  h, w = lq.shape[0], lq.shape[1]
  x = tf.round(tf.clip_by_value(lq, 0.0, 1.0) * 255.0)
  if h is None or w is None:
    x = tf.image.resize(x[None], [size, size], method="bicubic", antialias=True)[0]
    x = tf.round(tf.clip_by_value(x, 0.0, 255.0))
  else:
    new_h, new_w = shortest_side_size(h, w, size)
    if vertical_first(h, w, new_h, new_w):
      x = _pil_pass(_pil_pass(x, h, new_h, 0), w, new_w, 1)
    else:
      x = _pil_pass(_pil_pass(x, w, new_w, 1), h, new_h, 0)
    if (new_h, new_w) != (size, size):
      top, left = center_crop_offsets(new_h, new_w, size)
      x = x[top:top + size, left:left + size]
  return _openai_normalize(x)


def _openai_normalize(x_255):
  """8-bit levels (0..255, float) -> CLIP's input: OpenAI mean / std."""
  return (x_255 / 255.0 - tf.constant(OPENAI_MEAN)) / tf.constant(OPENAI_STD)


CLIP_VIEWS = ("resize", "crop")


def clip_crop(lq, size: int):
  """LQ [H, W, 3] in [0, 1] -> its centre size x size crop at full resolution, 8-bit rounded and
  OpenAI-normalised like `clip_image` (`clip_view="crop"`): a small CLIP sees the degradation's
  pixels (noise grain, blur, JPEG blocks) unchanged instead of shrunk away by the resize."""
  from uir_jax.preprocess import center_crop_offsets

  lq = tf.convert_to_tensor(lq, tf.float32)
  h, w = lq.shape[0], lq.shape[1]
  if h is None or w is None or min(h, w) < size:
    raise ValueError(f"clip_view='crop' needs static patches of at least {size} pixels, got "
                     f"{h}x{w}")
  top, left = center_crop_offsets(h, w, size)
  return _openai_normalize(tf.round(tf.clip_by_value(lq[top:top + size, left:left + size], 0.0,
                                                      1.0) * 255.0))


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """What a pipeline does to each example (see the module docstring)."""

  patch_size: int = 256
  gray_prob: float = 0.0
  use_flip: bool = True
  use_rot: bool = True
  clip_lq: bool = False
  degrade_probs: Mapping[str, float] | None = None  # Overrides of the chain's parameters.
  # The on-the-fly degradation chain: a name or a pipeline spec of `input_pipeline.registry`.
  chain: Any = "wild"
  # Or a mixture of named tasks [(name, chain), ...]: each example gets one, uniformly, and its
  # "degradation" text is the task's name and its "label" the task's index (a synthetic
  # universal set from clean photos).
  tasks: tuple = ()
  clip_gt: bool = False  # also the CLIP view of the GT ("clip_gt"; DA-CLIP's robust term)
  clip_size: int = CLIP_SIZE  # side of the CLIP views (the CLIP's input size)
  # How the CLIP views are made: "resize" (the reference's clip_transform of the whole patch) or
  # "crop" (its centre clip_size crop at full resolution; `clip_crop`).
  clip_view: str = "resize"
  # Guided restoration: > 0 makes each example's "guidance" from its GT (its centre square at
  # this side, `guidance.synthetic_guidance`) for sources without guidance files.
  synthetic_guidance: int = 0


def _example_fn(source: readers.Source, opts: PipelineOptions, seed: int, train: bool):
  """Graph fn: (global index, item) -> example dict."""
  p = opts.patch_size
  chain = (registry.get_pipeline(opts.chain, **dict(opts.degrade_probs or {}))
           if not source.paired and not opts.tasks else None)
  task_names = tf.constant([name for name, _ in opts.tasks]) if opts.tasks else None
  task_chains = [registry.get_pipeline(spec) for _, spec in opts.tasks]
  guided = source.guided or opts.synthetic_guidance > 0

  def degrade(gt, seed):
    """(lq, words, degradation text, label) of an unpaired example."""
    if not task_chains:
      lq, words = chain(gt, seed)
      return lq, words, degradations.degradation_text(words), None
    k = tf.random.stateless_uniform([], _sub(seed, 0), 0, len(task_chains), tf.int32)
    branches = [lambda c=c: tuple(c(gt, _sub(seed, 1))) for c in task_chains]
    lq, words = tf.switch_case(k, branches)
    return lq, words, tf.gather(task_names, k), k

  def fn(gidx, item):
    s = example_seed(seed, gidx)
    ex = source.load(item)
    images = [ex["gt"], ex["lq"]] if source.paired else [ex["gt"]]
    photo_hw = (tf.shape(images[0])[0], tf.shape(images[0])[1])
    images = image_io.pad_to_min_size(images, p)
    if guided:  # the same box of LQ, GT and the guidance (`input_pipeline.guidance`)
      g = (ex["guidance"] if source.guided
           else guidance_crops.synthetic_guidance(ex["gt"], opts.synthetic_guidance))
      y, x = guidance_crops.crop_offsets(
          photo_hw, (tf.shape(g)[0], tf.shape(g)[1]), p,
          padded_hw=(tf.shape(images[0])[0], tf.shape(images[0])[1]),
          seed=_sub(s, _CROP) if train else None)
      images = [im[y:y + p, x:x + p] for im in images]
      images.append(guidance_crops.sample_region(g, photo_hw, y, x, p))
    if train:
      if not guided:
        images = random_crop(images, p, _sub(s, _CROP))
      images = random_dihedral(images, _sub(s, _FLIP), use_flip=opts.use_flip,
                               use_rot=opts.use_rot)
    elif not guided:
      images = center_crop(images, p)
    images = [tf.ensure_shape(x, [p, p, 3]) for x in images]
    guidance = images.pop() if guided else None
    gt = images[0]
    if source.paired:
      lq, words, degradation = images[1], degradations.no_words(), ex["degradation"]
      label = None
    else:
      if train and opts.gray_prob > 0:
        gray = tf.random.stateless_uniform([], _sub(s, _GRAY)) < opts.gray_prob
        gt = tf.cond(gray, lambda: to_gray3(gt), lambda: gt)
      lq, words, degradation, label = degrade(gt, _sub(s, _DEGRADE))
      lq = tf.ensure_shape(tf.cast(lq, tf.float32), [p, p, 3])
    out = {"lq": lq, "gt": gt, "words": tf.ensure_shape(words, [4]),
           "label": ex["label"] if source.paired or label is None else label,
           "caption": ex["caption"], "degradation": degradation, "index": gidx}
    view = clip_crop if opts.clip_view == "crop" else clip_image
    if opts.clip_lq:
      out["clip_lq"] = view(lq, opts.clip_size)
    if opts.clip_gt:
      out["clip_gt"] = view(gt, opts.clip_size)
    if guided:
      out["guidance"] = guidance
    return out

  return fn


def make_dataset(source: readers.Source, opts: PipelineOptions, *, batch_size: int, seed: int,
                 train: bool, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1) -> tf.data.Dataset:
  """Batched tf.data.Dataset of this host's examples (infinite if train, else one padded pass)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  b, h, hosts = batch_size, process_index, process_count
  example = _example_fn(source, opts, seed, train)
  first = start_step * b
  if train:
    ds = tf.data.Dataset.counter(start=first, dtype=tf.int64)

    def element(local):
      gidx = global_index(local, b, h, hosts)
      return example(gidx, source.sample(gidx, _sub(example_seed(seed, gidx), _SAMPLE)))
  else:
    n = source.num_items
    per_host = -(-n // (b * hosts)) * b  # Whole batches; every host gets the same number.
    ds = tf.data.Dataset.range(min(first, per_host), per_host)
    order = tf.constant(source.eval_items, tf.int64)

    def element(local):
      gidx = global_index(local, b, h, hosts)
      valid = gidx < n
      out = example(gidx, tf.gather(order, tf.where(valid, gidx, gidx % n)))
      out["mask"] = valid
      return out

  # AutoGraph off: the code is plain graph ops already, and converting the degradation chain
  # costs seconds of start-up.
  element = tf.autograph.experimental.do_not_convert(element)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Last-resort net for files that became unreadable after the scan (a run never dies on one
  # file); such a file shifts the stream, so the scan is what keeps resumption exact.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(b, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class NumpyStream:
  """An iterable of numpy batch dicts over a tf.data pipeline; each `iter()` starts afresh.

  Attributes:
    dataset: the underlying tf.data.Dataset.
    source: the readers.Source (its `counts` say what the validation pass found).
    num_batches: batches in one pass (evaluation), or None (infinite training stream).
  """

  def __init__(self, dataset: tf.data.Dataset, source: readers.Source, num_batches: int | None):
    self.dataset, self.source, self.num_batches = dataset, source, num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.dataset.as_numpy_iterator()

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("an infinite training stream has no length")
    return self.num_batches


def options_from_config(cfg) -> PipelineOptions:
  get = cfg.get
  probs = get("degrade_probs", None)
  return PipelineOptions(
      patch_size=int(get("patch_size", 256)), gray_prob=float(get("gray_prob", 0.0) or 0.0),
      use_flip=bool(get("use_flip", True)), use_rot=bool(get("use_rot", True)),
      clip_lq=bool(get("clip_lq", False)), degrade_probs=dict(probs) if probs else None,
      chain=registry.plain_spec(get("chain", "wild")), clip_gt=bool(get("clip_gt", False)),
      clip_size=int(get("clip_size", CLIP_SIZE)), clip_view=str(get("clip_view", "resize")),
      tasks=tuple((str(name), registry.plain_spec(spec))
                  for name, spec in registry.plain_spec(get("tasks", ()) or ())),
      synthetic_guidance=int(get("synthetic_guidance", 0) or 0))


def from_config(cfg: Any, *, batch_size: int, seed: int, train: bool, start_step: int = 0,
                process_index: int = 0, process_count: int = 1,
                split: str | None = None) -> NumpyStream:
  """The trainer's entry point: a data ConfigDict -> an iterable of numpy batch dicts.

  Args:
    cfg: `source` ("quickstart" | "folder" | "universal" | "csv"), `patch_size`, `gray_prob`,
      `root` / `csv_path` when needed, and optional `use_flip`, `use_rot`, `clip_lq`,
      `chain` (a registry name or spec, default "wild"), `degrade_probs` (its parameters),
      `validate`, `split`, `val_split`, `val_root`, `val_csv_path`,
      `match_names` (see readers.source_from_config).
    batch_size: this host's batch size.
    seed: run seed; the same seed gives the same batches.
    train: infinite augmented stream (True) or one padded, masked evaluation pass (False).
    start_step: first batch to produce; batches from a fresh stream's step N on equal those of a
      stream started at N.
    process_index, process_count: this host and the number of hosts.
    split: "train" | "eval": which split of the source to read (default: "train" if `train`);
      `train=True, split="eval"` is an infinite augmented stream of the held-out split.
  """
  opts = options_from_config(cfg)
  if opts.patch_size < 1:
    raise ValueError(f"patch_size must be >= 1, got {opts.patch_size}")
  if opts.clip_view not in CLIP_VIEWS:
    raise ValueError(f"clip_view must be one of {CLIP_VIEWS}, got {opts.clip_view!r}")
  if opts.clip_view == "crop" and opts.patch_size < opts.clip_size:
    raise ValueError(f"clip_view='crop' needs patch_size >= clip_size, got {opts.patch_size} < "
                     f"{opts.clip_size}")
  if split not in (None, "train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  source = readers.source_from_config(cfg, train=train if split is None else split == "train")
  ds = make_dataset(source, opts, batch_size=batch_size, seed=seed, train=train,
                    start_step=start_step, process_index=process_index,
                    process_count=process_count)
  num_batches = None
  if not train:
    total = -(-source.num_items // (batch_size * process_count))
    num_batches = max(0, total - start_step)
  return NumpyStream(ds, source, num_batches)

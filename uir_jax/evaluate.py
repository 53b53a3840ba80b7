"""Paired evaluation: restore every LQ image of a test set (or read the already restored images of
any method) and score it against its GT, the way the reference's `test.py` does (spec §8.2):
8-bit images, a `crop_border` frame dropped (4 px), PSNR and SSIM on RGB and on the BT.601 luma;
optionally LPIPS (AlexNet), DISTS, FID (per set) and NIQE (no-reference, of the restored images).

    pairs = list_pairs("datasets/universal/val")          # {degradation: [(lq, gt), ...]}
    report = evaluate(restorer, pairs, key=jax.random.key(0), lpips=load_lpips("lpips_alex.pth"))
    report = score_restored("other_method/", pairs, fid=load_inception("pt_inception.pth"))
    report["mean"]["psnr"], report["per_set"]["noisy"]["ssim_y"]
    write_report(report, "eval_out")                      # results.json, .md and .csv

No TensorFlow: images are read with Pillow. A file that cannot be read, a pair whose LQ and GT
sizes differ, a restored image that is missing or of another size, or an image the restorer fails
on, is skipped, logged and counted (`report["skipped"]`); the run goes on. A metric that needs
more pixels than an image has (SSIM 11, LPIPS 32, NIQE 194 per side; FID two images per set) is
`None` there and left out of the means.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from uir_jax.data_layout import list_images
from uir_jax.metrics.image import psnr, ssim
from uir_jax.photos import read_rgb, to_uint8

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
# Every column a report can have, in table order: (key, label, higher is better, decimals).
COLUMNS = (
    ("psnr", "PSNR", True, 2),
    ("ssim", "SSIM", True, 4),
    ("psnr_y", "PSNR-Y", True, 2),
    ("ssim_y", "SSIM-Y", True, 4),
    ("lpips", "LPIPS", False, 4),
    ("dists", "DISTS", False, 4),
    ("fid", "FID", False, 2),
    ("niqe", "NIQE", False, 3),
    ("psnr_input", "input PSNR", True, 2),
)
MIN_SIZE = {"ssim": 11, "lpips": 32}  # NIQE's own minimum: uir_jax.metrics.niqe.MIN_SIZE


class _Skip(Exception):
  """A pair that cannot be scored; the message says why."""


def _pair_metric(metric: Callable | None) -> Callable | None:
  """An nnx metric module (LPIPS, DISTS) runs jitted over its split state (one compilation per
  image size instead of an eager op-by-op run per image)."""
  from flax import nnx

  if isinstance(metric, nnx.Module):
    from uir_jax.metrics.common import jit_pair_metric

    return jit_pair_metric(metric)
  return metric


def _fid_features(fid: Any) -> Callable | None:
  """An `InceptionV3` becomes a `FeatureExtractor` (one image at a time); callables pass."""
  from flax import nnx

  if isinstance(fid, nnx.Module):
    from uir_jax.metrics.fid import FeatureExtractor

    return FeatureExtractor(fid, batch_size=1)
  return fid


def quantize(image: np.ndarray) -> np.ndarray:
  """[H, W, 3] in [0, 1] -> [1, H, W, 3] float32 on the 8-bit grid (the reference's tensor2img)."""
  return to_uint8(image)[None].astype(np.float32) / 255.0


def score(restored: np.ndarray, gt: np.ndarray, *, crop_border: int = 4,
          lpips: Callable | None = None, dists: Callable | None = None,
          niqe: Callable | None = None) -> dict[str, float | None]:
  """The metrics of one restored image [H, W, 3] against its GT, both in [0, 1].

  Both are quantised to 8 bits once, for every metric. `lpips(x, y)` / `dists(x, y)` take
  [1, H, W, 3] batches and return [1] distances; `niqe(x)` scores the restored image alone.
  A metric the image is too small for is None.
  """
  from uir_jax.metrics.niqe import MIN_SIZE as NIQE_MIN

  size = min(gt.shape[:2])
  border = crop_border if 2 * crop_border < size - 11 else 0
  x, y = quantize(restored), quantize(gt)
  big_enough = size - 2 * border >= MIN_SIZE["ssim"]
  out: dict[str, float | None] = {
      "psnr": float(psnr(x, y, crop_border=border)[0]),
      "ssim": float(ssim(x, y, crop_border=border)[0]) if big_enough else None,
      "psnr_y": float(psnr(x, y, crop_border=border, y_channel=True)[0]),
      "ssim_y": float(ssim(x, y, crop_border=border, y_channel=True)[0]) if big_enough else None,
  }
  if lpips is not None:
    out["lpips"] = float(np.asarray(lpips(x, y))[0]) if size >= MIN_SIZE["lpips"] else None
  if dists is not None:
    out["dists"] = float(np.asarray(dists(x, y))[0])
  if niqe is not None:
    out["niqe"] = float(np.asarray(niqe(x))[0]) if size >= NIQE_MIN else None
  return out


def _mean(values: Sequence) -> float | None:
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(values)) if values else None


def _run(pairs: Mapping[str, Sequence], produce: Callable, *, crop_border: int, lpips, dists, fid,
         niqe, limit: int | None, log: Callable[[str], None]) -> dict[str, Any]:
  """The shared loop: `produce(set, lq_path, gt_path, lq) -> (restored [H, W, 3], seconds,
  extra row fields)` or raises _Skip."""
  lpips, dists, fid = _pair_metric(lpips), _pair_metric(dists), _fid_features(fid)
  per_image, skipped = [], []
  features: dict[str, tuple[list, list]] = {}
  for name, items in pairs.items():
    items = list(items)[:limit] if limit else list(items)
    for lq_path, gt_path in items:
      try:
        try:
          lq, gt = read_rgb(lq_path), read_rgb(gt_path)
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run
          raise _Skip(f"unreadable: {e}") from e
        if lq.shape != gt.shape:
          raise _Skip(f"LQ {lq.shape[:2]} and GT {gt.shape[:2]} sizes differ")
        restored, seconds, extra = produce(name, lq_path, gt_path, lq)
        if restored.shape != gt.shape:
          raise _Skip(f"restored {restored.shape[:2]} and GT {gt.shape[:2]} sizes differ")
      except _Skip as e:
        skipped.append({"set": name, "lq": lq_path, "reason": str(e)})
        logging.error("skipping %s: %s", lq_path, e)
        continue
      row = {"set": name, "lq": lq_path, "gt": gt_path, **extra,
             **score(restored, gt, crop_border=crop_border, lpips=lpips, dists=dists, niqe=niqe),
             "psnr_input": float(psnr(lq, gt, crop_border=0, quantize=True)[0])}
      if seconds is not None:
        row["seconds"] = round(seconds, 3)
      per_image.append(row)
      if fid is not None:
        ours, theirs = features.setdefault(name, ([], []))
        ours.append(np.asarray(fid(quantize(restored)))[0])
        theirs.append(np.asarray(fid(quantize(gt)))[0])
      ssim_text = "n/a" if row["ssim"] is None else f"{row['ssim']:.4f}"
      took = "" if seconds is None else f", {seconds:.1f}s"
      log(f"[{name}] {os.path.basename(gt_path)}: PSNR {row['psnr']:.2f} dB (input "
          f"{row['psnr_input']:.2f}), SSIM {ssim_text}{took}")
  return _summarise(per_image, skipped, features if fid is not None else None, log)


def _summarise(per_image, skipped, features, log) -> dict[str, Any]:
  from uir_jax.metrics.fid import fid_from_features

  names = list(dict.fromkeys(r["set"] for r in per_image))
  present = {k for r in per_image for k in r}
  keys = [k for k, *_ in COLUMNS if k in present and k != "fid"]
  per_set = {}
  for n in names:
    rows = [r for r in per_image if r["set"] == n]
    per_set[n] = {"count": len(rows), **{k: _mean([r.get(k) for r in rows]) for k in keys}}
    if features is not None:
      ours, theirs = features.get(n, ([], []))
      if len(ours) >= 2:
        per_set[n]["fid"] = fid_from_features(np.stack(ours), np.stack(theirs))
      else:  # a covariance needs two images
        per_set[n]["fid"] = None
        log(f"[{n}] FID needs at least 2 images, the set has {len(ours)}")
  keys = [k for k, *_ in COLUMNS if any(k in row for row in per_set.values())]
  # The mean over sets (each set weighs the same, like the paper's averages over tasks).
  mean = {k: _mean([per_set[n].get(k) for n in names]) for k in keys} if names else {}
  return {"per_image": per_image, "per_set": per_set, "mean": mean, "skipped": skipped}


def evaluate(restorer: Callable[[np.ndarray, jax.Array], Any], pairs: Mapping[str, Sequence],
             *, key: jax.Array, crop_border: int = 4, lpips: Callable | None = None,
             dists: Callable | None = None, fid: Any = None, niqe: Callable | None = None,
             limit: int | None = None, output_dir: str | None = None,
             log: Callable[[str], None] = print,
             guidance: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
  """Restores and scores every pair; returns {"per_image", "per_set", "mean", "skipped"}.

  Args:
    restorer: `restorer(lq [1, H, W, 3], key) -> [1, H, W, 3]` in [0, 1] (e.g. a `Restorer`).
    pairs: {set name: [(lq_path, gt_path), ...]} (`uir_jax.data_layout.list_pairs`).
    key: PRNG key; image i of the whole run uses fold_in(key, i).
    crop_border: frame dropped before PSNR/SSIM (the reference uses 4).
    lpips, dists: optional full-reference metrics (`uir_jax.convert.lpips.load_lpips`,
      `uir_jax.convert.dists.load_dists`).
    fid: optional FID Inception (`uir_jax.convert.fid.load_inception`) or a feature extractor;
      FID is computed per set between the restored and the GT images.
    niqe: optional `uir_jax.metrics.niqe.NIQE()`, scoring the restored images.
    limit: at most this many pairs per set (the reference validates on the first 100).
    output_dir: if set, restored PNGs go to output_dir/<set>/<name>.png and the report to
      output_dir/results.{json,md,csv}.
    guidance: {set: {stem: guidance path}} for a guided restorer (`restorer(lq, key,
      guidance=...)`); a pair whose LQ (or GT) stem has none, or whose guidance is unreadable,
      is skipped and counted.
  """
  counter = iter(range(1 << 62))

  def produce(name, lq_path, gt_path, lq):
    t0 = time.perf_counter()
    extra = {}
    if guidance is not None:
      index = guidance.get(name, {})
      g_path = index.get(_stem(lq_path)) or index.get(_stem(gt_path))
      if g_path is None:
        raise _Skip(f"no guidance image named {_stem(lq_path)}.*")
      try:
        extra["guidance"] = read_rgb(g_path)[None]
      except Exception as e:  # noqa: BLE001 - one unreadable guidance must not stop the run
        raise _Skip(f"unreadable guidance {g_path}: {e}") from e
    try:
      restored = np.asarray(restorer(lq[None], jax.random.fold_in(key, next(counter)),
                                     **extra)[0])
    except Exception as e:  # noqa: BLE001 - one image the model cannot take must not stop the run
      raise _Skip(f"restoring failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    if output_dir:
      dest = os.path.join(output_dir, name,
                          os.path.splitext(os.path.basename(lq_path))[0] + ".png")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      Image.fromarray(to_uint8(restored)).save(dest)
    return restored, seconds, {}

  report = _run(pairs, produce, crop_border=crop_border, lpips=lpips, dists=dists, fid=fid,
                niqe=niqe, limit=limit, log=log)
  if output_dir:
    write_report(report, output_dir)
  return report


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _index_folder(folder: str) -> dict[str, str]:
  """{file stem: path} of the images directly in `folder`; two images with one stem are an error."""
  index: dict[str, str] = {}
  for path in list_images(folder, recursive=False):
    if _stem(path) in index:
      raise ValueError(f"{folder}: two restored images named {_stem(path)!r} "
                       f"({os.path.basename(index[_stem(path)])}, {os.path.basename(path)})")
    index[_stem(path)] = path
  return index


def find_restored(restored_dir: str, pairs: Mapping[str, Sequence]) -> dict[str, dict[str, str]]:
  """{set: {stem: path}} of the restored images to score: `restored_dir/<set>/<name>.*` (the
  layout `uir-jax eval --output_dir` writes) or, for a set without its own folder,
  `restored_dir/<name>.*`. Raises FileNotFoundError / ValueError (no folder, no images)."""
  if not os.path.isdir(restored_dir):
    raise FileNotFoundError(f"restored-image folder {restored_dir!r} does not exist")
  top = _index_folder(restored_dir)
  found = {}
  for name in pairs:
    folder = os.path.join(restored_dir, name)
    found[name] = _index_folder(folder) if os.path.isdir(folder) else top
  if not any(found.values()):
    raise ValueError(f"{restored_dir}: no images (expected <set>/<name>.png or <name>.png, named "
                     "as the GT images)")
  return found


def score_restored(restored_dir: str, pairs: Mapping[str, Sequence], *, crop_border: int = 4,
                   lpips: Callable | None = None, dists: Callable | None = None, fid: Any = None,
                   niqe: Callable | None = None, limit: int | None = None,
                   output_dir: str | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores already restored images (any method's) against the GT without restoring.

  Each pair's restored image is found by the GT's file name (any image extension) as
  `find_restored` describes; a pair without one is skipped and counted. Arguments and report as
  `evaluate`; the report rows also name the restored file.
  """
  found = find_restored(restored_dir, pairs)

  def produce(name, lq_path, gt_path, lq):
    del lq
    index = found[name]
    path = index.get(_stem(gt_path)) or index.get(_stem(lq_path))
    if path is None:
      raise _Skip(f"no restored image named {_stem(gt_path)}.* in {restored_dir}")
    try:
      return read_rgb(path), None, {"restored": path}
    except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run
      raise _Skip(f"unreadable restored image {path}: {e}") from e

  report = _run(pairs, produce, crop_border=crop_border, lpips=lpips, dists=dists, fid=fid,
                niqe=niqe, limit=limit, log=log)
  if output_dir:
    write_report(report, output_dir)
  return report


# ----------------------------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------------------------


def _columns(report: Mapping[str, Any]) -> list[tuple[str, str, bool, int]]:
  return [c for c in COLUMNS if c[0] in report["mean"]]


def _rows(report: Mapping[str, Any]):
  """(set name, count, {key: value}) per set, then the mean over sets."""
  for name, row in report["per_set"].items():
    yield name, row["count"], row
  if report["per_set"]:
    yield "mean over sets", sum(r["count"] for r in report["per_set"].values()), report["mean"]


def _fmt(value, decimals: int) -> str:
  return "–" if value is None else f"{value:.{decimals}f}"


def format_table(report: Mapping[str, Any]) -> str:
  """The per-set and mean metrics as a fixed-width text table."""
  cols = _columns(report)
  head = f"{'set':18s} {'n':>4s} " + " ".join(f"{k:>10s}" for k, *_ in cols)
  lines = [head, "-" * len(head)]
  for name, count, row in _rows(report):
    lines.append(f"{name:18s} {count:4d} "
                 + " ".join(f"{_fmt(row.get(k), 4):>10s}" for k, *_ in cols))
  if report["skipped"]:
    lines.append(f"skipped {len(report['skipped'])} pair(s): see results.json / the log")
  return "\n".join(lines)


def _label(label: str, higher: bool) -> str:
  return f"{label} {'↑' if higher else '↓'}"


def format_markdown(report: Mapping[str, Any]) -> str:
  """The per-degradation table in Markdown, one column per metric with its arrow (↑: higher is
  better, ↓: lower is better), the mean over sets last."""
  cols = _columns(report)
  lines = ["| set | n | " + " | ".join(_label(lab, up) for _, lab, up, _ in cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  for name, count, row in _rows(report):
    cells = [_fmt(row.get(k), d) for k, _, _, d in cols]
    if name == "mean over sets":
      name, cells = f"**{name}**", [f"**{c}**" for c in cells]
    lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
  if report["skipped"]:
    lines += ["", f"{len(report['skipped'])} pair(s) skipped (see results.json)."]
  return "\n".join(lines) + "\n"


def format_csv(report: Mapping[str, Any]) -> str:
  """The same table as CSV: `set,count,<metric> <arrow>,...`, full precision, empty cells for
  metrics an image set could not have."""
  cols = _columns(report)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["set", "count", *(_label(lab, up) for _, lab, up, _ in cols)])
  for name, count, row in _rows(report):
    writer.writerow([name, count, *("" if row.get(k) is None else repr(row[k]) for k, *_ in cols)])
  return out.getvalue()


def write_report(report: Mapping[str, Any], output_dir: str) -> dict[str, str]:
  """Writes results.json, results.md and results.csv into output_dir; returns their paths."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {ext: os.path.join(output_dir, f"results.{ext}") for ext in ("json", "md", "csv")}
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=1)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(format_markdown(report))
  with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
    f.write(format_csv(report))
  return paths

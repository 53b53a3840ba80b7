"""Paired evaluation: restore every LQ image of a test set and score it against its GT, the way the
reference's `test.py` does (spec §8.2): 8-bit images, a `crop_border` frame dropped (4 px), PSNR and
SSIM on RGB and on the BT.601 luma, and LPIPS (AlexNet) when weights are given.

    pairs = list_pairs("datasets/universal/val")          # {degradation: [(lq, gt), ...]}
    report = evaluate(restorer, pairs, key=jax.random.key(0), lpips=load_lpips("lpips_alex.pth"))
    report["mean"]["psnr"], report["per_set"]["noisy"]["ssim_y"]

No TensorFlow: images are read with Pillow. A file that cannot be read, or a pair whose LQ and GT
sizes differ, is skipped, logged and counted (`report["skipped"]`); the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from uir_jax.metrics.image import psnr, ssim
from uir_jax.photos import read_rgb, to_uint8

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


def score(restored: np.ndarray, gt: np.ndarray, *, crop_border: int = 4,
          lpips: Callable | None = None) -> dict[str, float]:
  """The reference test metrics of one restored image [H, W, 3] against its GT, both in [0, 1]."""
  border = crop_border if 2 * crop_border < min(gt.shape[:2]) - 11 else 0
  # 8-bit images, as the reference's test scores them; quantised once for every metric.
  x, y = (to_uint8(a)[None].astype(np.float32) / 255.0 for a in (restored, gt))
  out = {
      "psnr": float(psnr(x, y, crop_border=border)[0]),
      "ssim": float(ssim(x, y, crop_border=border)[0]),
      "psnr_y": float(psnr(x, y, crop_border=border, y_channel=True)[0]),
      "ssim_y": float(ssim(x, y, crop_border=border, y_channel=True)[0]),
  }
  if lpips is not None:
    out["lpips"] = float(np.asarray(lpips(x, y))[0])
  return out


def evaluate(restorer: Callable[[np.ndarray, jax.Array], Any], pairs: Mapping[str, Sequence],
             *, key: jax.Array, crop_border: int = 4, lpips: Callable | None = None,
             limit: int | None = None, output_dir: str | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Restores and scores every pair; returns {"per_image", "per_set", "mean", "skipped"}.

  Args:
    restorer: `restorer(lq [1, H, W, 3], key) -> [1, H, W, 3]` in [0, 1] (e.g. a `Restorer`).
    pairs: {set name: [(lq_path, gt_path), ...]} (`uir_jax.data_layout.list_pairs`).
    key: PRNG key; image i of the whole run uses fold_in(key, i).
    crop_border: frame dropped before PSNR/SSIM (the reference uses 4).
    lpips: optional LPIPS metric (`uir_jax.convert.lpips.load_lpips`).
    limit: at most this many pairs per set (the reference validates on the first 100).
    output_dir: if set, restored PNGs go to output_dir/<set>/<name>.png and the report to
      output_dir/results.json.
  """
  per_image, skipped, index = [], [], 0
  for name, items in pairs.items():
    items = list(items)[:limit] if limit else list(items)
    for lq_path, gt_path in items:
      try:
        lq, gt = read_rgb(lq_path), read_rgb(gt_path)
      except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run
        skipped.append({"set": name, "lq": lq_path, "reason": f"unreadable: {e}"})
        logging.error("skipping %s: %s", lq_path, e)
        continue
      if lq.shape != gt.shape:
        skipped.append({"set": name, "lq": lq_path,
                        "reason": f"LQ {lq.shape[:2]} and GT {gt.shape[:2]} sizes differ"})
        logging.error("skipping %s: LQ %s vs GT %s", lq_path, lq.shape[:2], gt.shape[:2])
        continue
      t0 = time.perf_counter()
      restored = np.asarray(restorer(lq[None], jax.random.fold_in(key, index))[0])
      index += 1
      seconds = time.perf_counter() - t0
      row = {"set": name, "lq": lq_path, "gt": gt_path, "seconds": round(seconds, 3),
             **score(restored, gt, crop_border=crop_border, lpips=lpips),
             "psnr_input": float(psnr(lq, gt, crop_border=0, quantize=True)[0])}
      per_image.append(row)
      if output_dir:
        dest = os.path.join(output_dir, name, os.path.splitext(os.path.basename(lq_path))[0]
                            + ".png")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        Image.fromarray(to_uint8(restored)).save(dest)
      log(f"[{name}] {os.path.basename(lq_path)}: PSNR {row['psnr']:.2f} dB (input "
          f"{row['psnr_input']:.2f}), SSIM {row['ssim']:.4f}, {seconds:.1f}s")
  names = list(dict.fromkeys(r["set"] for r in per_image))
  keys = [k for k in (*METRICS, "lpips", "psnr_input") if per_image and k in per_image[0]]
  per_set = {n: {"count": sum(r["set"] == n for r in per_image),
                 **{k: float(np.mean([r[k] for r in per_image if r["set"] == n])) for k in keys}}
             for n in names}
  # The mean over sets (each set weighs the same, like the paper's averages over tasks).
  mean = {k: float(np.mean([per_set[n][k] for n in names])) for k in keys} if names else {}
  report = {"per_image": per_image, "per_set": per_set, "mean": mean, "skipped": skipped}
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
      json.dump(report, f, indent=1)
  return report


def format_table(report: Mapping[str, Any]) -> str:
  """The per-set and mean metrics as a fixed-width text table."""
  keys = list(report["mean"])
  head = f"{'set':18s} {'n':>4s} " + " ".join(f"{k:>10s}" for k in keys)
  lines = [head, "-" * len(head)]
  for name, row in report["per_set"].items():
    lines.append(f"{name:18s} {row['count']:4d} " + " ".join(f"{row[k]:10.4f}" for k in keys))
  lines.append(f"{'mean over sets':18s} {sum(r['count'] for r in report['per_set'].values()):4d} "
               + " ".join(f"{report['mean'][k]:10.4f}" for k in keys))
  if report["skipped"]:
    lines.append(f"skipped {len(report['skipped'])} pair(s): see results.json / the log")
  return "\n".join(lines)

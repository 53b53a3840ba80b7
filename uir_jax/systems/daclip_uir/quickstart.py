"""The quickstart: the whole system on the embedded photos, on any machine (a CPU included).

  stage 1  a small DA-CLIP controller learns to tell the synthetic degradation types apart
           (`configs/quickstart.py: stage1`, the daclip trainer);
  stage 2  a NAFNet conditioned on that frozen DA-CLIP learns to restore them (`stage2`, the
           nafnet trainer: direct regression, the DA-CLIP paper's "NAFNet + DA-CLIP" row);
  report   on crops of held-out photos that neither stage trained on: PSNR / SSIM of the degraded
           inputs and of the restorations per degradation type, DA-CLIP's zero-shot degradation
           accuracy and confusion matrix, image grids; `report.md`, `report.json`, PNGs.

Each stage trains in its own workdir (`<workdir>/1_daclip`, `<workdir>/2_restorer`) with the
spine's checkpoints, so the same command resumes an interrupted run where it stopped and never
redoes a finished stage.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uir_jax.metrics.image import psnr, ssim
from uir_jax.systems.daclip_uir import conditioning, daclip, nafnet
from uir_jax.train import common

STAGE_DIRS = ("1_daclip", "2_restorer")


def _stage2_config(config: ml_collections.ConfigDict, daclip_dir: str):
  c = config.stage2.copy_and_resolve_references()
  with c.unlocked():
    c.daclip.checkpoint = daclip_dir
  return c


def load_restorer(workdir: str) -> nnx.Module:
  """The EMA weights of a nafnet / irsde training run as its configured network."""
  from uir_jax.checkpoint import model_from_run, read_training_run

  config, state = read_training_run(workdir)
  model = nnx.eval_shape(lambda: common.build_model(ml_collections.ConfigDict(config),
                                                    nnx.Rngs(0)))
  return model_from_run(model, state)


def labelled_confusion(confusion: np.ndarray, names: list[str], cell: int = 44) -> np.ndarray:
  """A confusion matrix [K, K] (rows: true type, columns: predicted) as an RGB image with the
  type names and the counts, shaded by the row-normalised rate."""
  from PIL import Image, ImageDraw

  k = len(names)
  margin = 8 * max(len(n) for n in names) + 12
  img = Image.new("RGB", (margin + k * cell + 4, margin + k * cell + 4), "white")
  draw = ImageDraw.Draw(img)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  for i, name in enumerate(names):
    draw.text((4, margin + i * cell + cell // 2 - 5), name, fill="black")
    draw.text((margin + i * cell + 2, 4 + (i % 2) * 12), name[:7], fill="black")
    for j in range(k):
      shade = int(255 * (1 - rates[i, j]))
      box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1,
             margin + (i + 1) * cell - 1)
      draw.rectangle(box, fill=(shade, shade, 255) if i == j else (255, shade, shade),
                     outline="gray")
      draw.text((box[0] + cell // 2 - 6, box[1] + cell // 2 - 5), str(int(confusion[i, j])),
                fill="black")
  draw.text((margin, margin - 14), "predicted ->", fill="gray")
  return np.asarray(img)


def report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores the trained pair on held-out crops; writes report.md / report.json / PNGs."""
  from PIL import Image

  from input_pipeline import pipelines
  from uir_jax.convert.clip import load_daclip
  from uir_jax.models.clip import l2_normalize
  from uir_jax.tokenizer import tokenize

  daclip_dir, restorer_dir = (os.path.join(workdir, d) for d in STAGE_DIRS)
  dac = load_daclip(daclip_dir)
  net = load_restorer(restorer_dir)
  r = config.report
  data = config.stage2.data.copy_and_resolve_references()
  with data.unlocked():
    data.patch_size = r.patch_size
  batch = next(iter(pipelines.from_config(data, batch_size=r.num_crops, seed=config.seed + 99,
                                          train=True, split="eval")))
  names = [n for n, _ in config.stage2.data.tasks]
  # Flat crops (sky, black borders) score PSNR = inf against any mild degradation: leave out.
  keep = np.asarray(batch["gt"]).reshape(len(batch["gt"]), -1).std(axis=1) >= r.min_gt_std
  lq, gt, clip_lq = (np.asarray(batch[k])[keep] for k in ("lq", "gt", "clip_lq"))
  label = np.asarray(batch["label"])[keep]

  windows = bool(config.stage2.daclip.windows)
  dgraph, dstate = nnx.split(dac)
  ngraph, nstate = nnx.split(net)
  word_ids = jnp.asarray(tokenize(names), jnp.int32)

  @jax.jit
  def run(dstate, nstate, lq, clip_lq):
    model = nnx.merge(dgraph, dstate)
    content, degra = conditioning.daclip_embed(model, clip_lq, lq, windows)
    pred = (l2_normalize(degra) @ l2_normalize(model.encode_text(word_ids)).T).argmax(-1)
    restored = nnx.merge(ngraph, nstate)(
        lq, text_context=degra if net.use_degra_context else None,
        image_context=content if net.use_image_context else None)
    return jnp.clip(restored, 0, 1), pred

  restored, pred = (np.asarray(x) for x in run(dstate, nstate, lq, clip_lq))
  confusion = np.zeros((len(names), len(names)), np.int64)
  np.add.at(confusion, (label, pred), 1)
  # Per-crop scores in one call each (one compiled SSIM shape), then averaged per type.
  scores = {"psnr_lq": psnr(lq, gt), "psnr_restored": psnr(restored, gt),
            "ssim_lq": ssim(lq, gt), "ssim_restored": ssim(restored, gt)}
  rows = {}
  for k, name in enumerate(names):
    m = label == k
    if not m.any():
      continue
    rows[name] = {"crops": int(m.sum()),
                  **{key: float(np.mean(v[m])) for key, v in scores.items()},
                  "degradation_accuracy": float(np.mean(pred[m] == k))}
    grid = common.image_grid(lq[m][:r.grid_rows], restored[m][:r.grid_rows], gt[m][:r.grid_rows])
    Image.fromarray(grid).save(os.path.join(workdir, f"grid_{name}.png"))
  Image.fromarray(labelled_confusion(confusion, names)).save(
      os.path.join(workdir, "degradation_confusion.png"))
  mean = {k: float(np.mean([row[k] for row in rows.values()]))
          for k in ("psnr_lq", "psnr_restored", "ssim_lq", "ssim_restored")}
  result = {"per_type": rows, "mean_over_types": mean,
            "degradation_accuracy": float(np.mean(pred == label)), "chance": 1 / len(names),
            "crops": int(len(label)), "flat_crops_left_out": int((~keep).sum()),
            "confusion": confusion.tolist(), "types": names,
            "steps": {"daclip": config.stage1.total_steps, "restorer": config.stage2.total_steps}}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = format_table(result)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(REPORT_HEADER + table + "\n" + REPORT_NOTES)
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = ["| degradation | crops | PSNR LQ | PSNR restored | SSIM LQ | SSIM restored | "
           "DA-CLIP acc. |", "|---|---|---|---|---|---|---|"]
  for name, row in result["per_type"].items():
    lines.append(f"| {name} | {row['crops']} | {row['psnr_lq']:.2f} | "
                 f"{row['psnr_restored']:.2f} | {row['ssim_lq']:.3f} | "
                 f"{row['ssim_restored']:.3f} | {row['degradation_accuracy']:.2f} |")
  m = result["mean_over_types"]
  lines.append(f"| **mean** | {result['crops']} | {m['psnr_lq']:.2f} | {m['psnr_restored']:.2f} "
               f"| {m['ssim_lq']:.3f} | {m['ssim_restored']:.3f} | "
               f"{result['degradation_accuracy']:.2f} (chance {result['chance']:.2f}) |")
  return "\n".join(lines) + "\n"


REPORT_HEADER = """# uir-jax quickstart report

Held-out crops of photos that neither stage trained on, one synthetic degradation each.
PSNR in dB and SSIM against the clean crop: the degraded input (LQ) and the restoration.
DA-CLIP acc.: the controller's zero-shot degradation prediction over the type names.

"""

REPORT_NOTES = """
Images: `grid_<type>.png` (rows of LQ | restored | GT), `degradation_confusion.png` (rows: true
type, columns: DA-CLIP's prediction). Numbers: `report.json`.

What the DA-CLIP here is: no pretrained CLIP ships with uir-jax, so the frozen CLIP is a small
randomly initialised one. Its text tower still gives each degradation name a distinct fixed
embedding, so the trained controller can learn to map images to the right name (the accuracy
above), but its content embedding is a random feature of the image, not a semantic description
as with the released ViT-B/32: the restorer's gain from DA-CLIP here comes from the degradation
embedding. With `--config.stage1.clip.checkpoint=<open_clip weights>`,
`--config.stage1.clip.arch=ViT-B-32` and the released models' CLIP view (`data.clip_view=resize`
and `data.clip_size=224` in both stages, `stage2.daclip.windows=False`) the same run uses a real
CLIP (much slower on a CPU).
"""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage 1, stage 2, report (see the module docstring); prints the report's table."""
  daclip_dir, restorer_dir = (os.path.join(workdir, d) for d in STAGE_DIRS)
  quiet = jax.process_index() > 0
  if not quiet:
    print(f"== stage 1/2: DA-CLIP controller ({config.stage1.total_steps} steps) -> {daclip_dir}",
          flush=True)
  first = daclip.train_and_evaluate(config.stage1, daclip_dir)
  if not quiet:
    print(f"== stage 2/2: NAFNet + DA-CLIP ({config.stage2.total_steps} steps) -> {restorer_dir}",
          flush=True)
  second = nafnet.train_and_evaluate(_stage2_config(config, daclip_dir), restorer_dir)
  stages = {"daclip": first, "restorer": second}
  if first.get("preempted") or second.get("preempted"):
    return {"preempted": True, "stages": stages}
  result = report(config, workdir)
  if not quiet:
    print("== report (held-out crops):\n" + format_table(result), flush=True)
    print(f"report: {os.path.join(workdir, 'report.md')}", flush=True)
  return {"preempted": False, "degradation_accuracy": result["degradation_accuracy"],
          **{f"mean/{k}": v for k, v in result["mean_over_types"].items()}, "stages": stages}

"""The quickstart's DA-CLIP stage alone, with a contrastive option set, scored on held-out crops.

Trains `configs/quickstart.py`'s stage 1 (the daclip trainer, its 500 steps) in `--workdir`,
then reports its zero-shot degradation accuracy twice: the stage's own evaluation batch (96
held-out crops, the 32-px centre view) and the quickstart report's crops (96-px crops of the
held-out photos, flat ones left out, embeddings averaged over 32-px windows as the report does).

  python benchmarks/daclip_positives.py --workdir /tmp/dc_ref
  python benchmarks/daclip_positives.py --workdir /tmp/dc_distinct \
      --set contrastive.distinct_texts=True

Prints JSON lines: name, device, shape, value, unit (+ extras).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[],
                      help="stage-1 override key=value (a Python literal), repeatable")
  parser.add_argument("--steps", type=int, default=None, help="(default: the config's 500)")
  args = parser.parse_args()
  # This folder is on sys.path (run as a script) and its input_pipeline.py benchmark would shadow
  # the package of that name.
  here = os.path.dirname(os.path.abspath(__file__))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

  from configs import quickstart
  from input_pipeline import pipelines
  from uir_jax.convert.clip import load_daclip
  from uir_jax.models.clip import l2_normalize
  from uir_jax.systems.daclip_uir import conditioning, daclip
  from uir_jax.tokenizer import tokenize

  config = quickstart.get_config()
  s1 = config.stage1
  with s1.unlocked():
    for item in args.set:
      key, value = item.split("=", 1)
      node = s1
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = ast.literal_eval(value)
    if args.steps is not None:
      s1.total_steps = s1.eval_every = s1.checkpoint_every = args.steps
  t0 = time.time()
  result = daclip.train_and_evaluate(s1, args.workdir)
  seconds = time.time() - t0

  # The quickstart report's crops and view (uir_jax/systems/daclip_uir/quickstart.py: report).
  names = [n for n, _ in config.stage2.data.tasks]
  data = config.stage2.data.copy_and_resolve_references()
  with data.unlocked():
    data.patch_size = config.report.patch_size
  batch = next(iter(pipelines.from_config(data, batch_size=config.report.num_crops,
                                          seed=config.seed + 99, train=True, split="eval")))
  keep = np.asarray(batch["gt"]).reshape(len(batch["gt"]), -1).std(axis=1) >= \
      config.report.min_gt_std
  lq, clip_lq = (np.asarray(batch[k])[keep] for k in ("lq", "clip_lq"))
  label = np.asarray(batch["label"])[keep]
  model = load_daclip(args.workdir)
  words = jnp.asarray(tokenize(names), jnp.int32)
  _, degra = conditioning.daclip_embed(model, jnp.asarray(clip_lq), jnp.asarray(lq),
                                       bool(config.stage2.daclip.windows))
  pred = np.asarray((l2_normalize(degra) @ l2_normalize(model.encode_text(words)).T).argmax(-1))
  per_type = {n: float(np.mean(pred[label == k] == k)) for k, n in enumerate(names)
              if (label == k).any()}
  device = jax.devices()[0].device_kind
  extras = {"overrides": args.set, "steps": int(result["step"]), "train_s": round(seconds, 1)}
  print(json.dumps({"name": "daclip_stage_eval_accuracy", "device": device, "shape": "96 crops",
                    "value": result["eval/degradation_accuracy"], "unit": "fraction",
                    **extras}))
  print(json.dumps({"name": "daclip_report_accuracy", "device": device,
                    "shape": f"{len(label)} crops", "value": float(np.mean(pred == label)),
                    "unit": "fraction", "per_type": per_type, **extras}))


if __name__ == "__main__":
  main()

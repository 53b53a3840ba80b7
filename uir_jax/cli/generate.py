"""`uir-jax generate`: Stable Diffusion text-to-image from a diffusers pipeline folder.

  uir-jax generate --sd DIR --prompt "a photo of a cat" [--negative "blurry"] [--num_steps 20]
                   [--sampler unipc] [--guidance_scale 7.5] [--seed 0] [--height 512 --width 512]
                   [--batch 4] [--dtype bfloat16] --output_dir out

DIR is a diffusers SD 1.x / 2.x pipeline folder or a repo id in the local Hugging Face cache.
Writes OUT/<seed>_<i>.png (image i of the batch drawn with --seed) and OUT/<seed>_<i>.json with
the settings that made it; a progress bar counts the images (the denoising loop of a batch is
one compiled call).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from uir_jax.cli.common import FLAGS, failer

flags.DEFINE_string("sd", None, "generate: a diffusers Stable Diffusion 1.x / 2.x pipeline folder "
                    "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a "
                    "repo id in the local Hugging Face cache.")
flags.DEFINE_string("prompt", None, "generate: the text prompt.")
flags.DEFINE_string("negative", "", "generate: the negative prompt (default: empty).")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "dpm++2m", "unipc"], "generate: the sampler "
                  "(diffusers' DDIM, DPM-Solver++(2M), UniPC schedulers).")
flags.DEFINE_float("guidance_scale", 7.5, "generate: classifier-free guidance scale (<= 1: "
                   "none).")
flags.DEFINE_integer("height", None, "generate: image height (default: the model's size).")
flags.DEFINE_integer("width", None, "generate: image width (default: the model's size).")
flags.DEFINE_integer("batch", 1, "generate: images per call (all with the same prompt).",
                     lower_bound=1)
flags.DEFINE_integer("num_images", None, "generate: images in all (default --batch), made "
                     "--batch at a time, call k seeded with --seed + k.", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "generate: compute dtype of the "
                  "networks (bfloat16 for accelerators; parameters stay float32).")

DEFAULT_STEPS = 50


def main(argv):
  fail = failer("generate")
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; the prompt goes in --prompt")
  if not FLAGS.sd:
    fail("needs --sd DIR (a diffusers Stable Diffusion pipeline folder or cached repo id)")
  if FLAGS.prompt is None:
    fail("needs --prompt")
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image
  from tqdm import tqdm

  from uir_jax.convert.common import one_line
  from uir_jax.photos import to_uint8
  from uir_jax.systems.sd import load_pipeline

  try:
    pipe = load_pipeline(FLAGS.sd, dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16"
                         else jnp.float32)
  except (OSError, ValueError) as e:
    fail(f"cannot load {FLAGS.sd}: {one_line(e)}")
  steps = FLAGS.num_steps or DEFAULT_STEPS
  total = FLAGS.num_images or FLAGS.batch
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  settings = dict(model=os.path.abspath(pipe.path), prompt=FLAGS.prompt,
                  negative_prompt=FLAGS.negative, sampler=FLAGS.sampler, num_steps=steps,
                  guidance_scale=FLAGS.guidance_scale, dtype=FLAGS.dtype)
  start = time.time()
  bar = tqdm(total=total, unit="image", file=sys.stderr, dynamic_ncols=True)
  done = 0
  for call in range((total + FLAGS.batch - 1) // FLAGS.batch):
    n = min(FLAGS.batch, total - done)
    seed = FLAGS.seed + call
    t0 = time.time()
    try:
      images = pipe.generate([FLAGS.prompt] * n, negative_prompts=[FLAGS.negative] * n,
                             num_steps=steps, guidance_scale=FLAGS.guidance_scale,
                             sampler=FLAGS.sampler, height=FLAGS.height, width=FLAGS.width,
                             seed=seed)
    except ValueError as e:
      bar.close()
      fail(e)
    images = to_uint8(np.asarray(images))
    for i, image in enumerate(images):
      dest = os.path.join(FLAGS.output_dir, f"{seed}_{i}.png")
      Image.fromarray(image).save(dest)
      h, w = image.shape[:2]
      with open(os.path.join(FLAGS.output_dir, f"{seed}_{i}.json"), "w") as f:
        json.dump(dict(settings, seed=seed, index=i, height=h, width=w, output=dest), f,
                  indent=1)
      tqdm.write(f"-> {dest} ({w}x{h}, {(time.time() - t0) / n:.1f}s)", file=sys.stdout)
    done += n
    bar.update(n)
  bar.close()
  print(f"{done} image(s) generated, {time.time() - start:.1f} s (-> {FLAGS.output_dir})")

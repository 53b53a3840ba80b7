r"""The `uir-jax` command.

  uir-jax train --config configs/irsde_quickstart.py[:variant] --workdir DIR [--config.k=v ...]
  uir-jax restore --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --output_dir OUT PHOTO...
                  [--num_steps 20] [--tile 512 --tile_overlap 64 | --tile 0]
  uir-jax restore --run WORKDIR --output_dir OUT PHOTO...   (a training run: its EMA weights)
  uir-jax restore --model EXPORT_DIR --output_dir OUT PHOTO...   (files, folders, globs)
  uir-jax restore --guidance DIR --checkpoint NAFNetRefFusion.pth | --run TDR_RUN | --model EXPORT
                  --output_dir OUT PHOTO...   (TextualDegRemoval: each photo with DIR/<name>.*)
  uir-jax export --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --out EXPORT_DIR
                 [--num_steps 20] [--sizes 256x256,512x384] [--platforms cpu,cuda,tpu]
  uir-jax export --workdir RUN --out EXPORT_DIR [--step N]
  uir-jax convert CHECKPOINT.pt[h] OUT.safetensors [--kind daclip|clip|denoiser|lpips]
  uir-jax eval --unet universal-ir.pth [--daclip daclip_ViT-B-32.pt] --data datasets/universal/val
               [--limit 100] [--lpips lpips_alex.pth] [--dists vgg16.pth] [--fid pt_inception.pth]
               [--niqe] [--output_dir OUT]
  uir-jax eval --restored OTHER_METHOD_DIR --data datasets/universal/val [metric flags]
  uir-jax generate --sd SD_DIR --prompt "a photo of a cat" [--negative "blurry"] [--num_steps 20]
                   [--sampler ddim|dpm++2m|unipc] [--guidance_scale 7.5] [--seed 0]
                   [--height 512 --width 512] [--batch 4] --output_dir OUT

PyTorch checkpoints (.pt/.pth/.bin) are read as data only (tensors, numpy scalars): a file whose
pickle asks for anything else is refused, naming it. --trust_checkpoint loads it anyway, which RUNS
CODE FROM THE FILE: only for files whose source you trust. .safetensors files never need it.

Commands:
  train     train the model described by an ml_collections config (see configs/*.py docstrings).
  restore   restore photos (files, folders, globs) with released (PyTorch) or converted
            checkpoints, a training run of ours (--run), or an export (--model); writes
            OUT/<name>.png, and with a DA-CLIP OUT/<name>.json with the predicted degradation.
  export    write a self-describing model directory: manifest.json, weights (.safetensors and
            orbax) and a serialized restore function (jax.export) that runs without torch or the
            model code; from checkpoints or from a training run (--workdir: its EMA weights; an
            IR-SDE run, or a NAFNet run such as the quickstart's 2_restorer).
  eval      restore a paired test set (<data>/<degradation>/{LQ,GT} or <data>/{LQ,GT}), or score
            already restored images (--restored), and report PSNR / SSIM (RGB and luma, 4-px
            border, 8-bit) as the reference's test.py, and LPIPS, DISTS, FID, NIQE per set;
            writes OUT/results.{json,md,csv} (and the restored PNGs).
  convert   rewrite a PyTorch checkpoint as a .safetensors state_dict (checked by loading it), so
            restoring needs no torch afterwards.
  generate  Stable Diffusion 1.x / 2.x text-to-image from a diffusers pipeline folder (or a repo
            id in the local Hugging Face cache); writes OUT/<seed>_<i>.png and a .json of the
            settings beside each.
"""

from __future__ import annotations

import os
import sys

from absl import app

from uir_jax.cli import common, convert, eval, export, generate, restore, train  # noqa: A004

FLAGS = common.FLAGS

# The dispatch table: command -> its module's main(argv) (uir_jax/cli/<command>.py).
COMMANDS = {"train": train.main, "restore": restore.main, "eval": eval.main,
            "convert": convert.main, "export": export.main, "generate": generate.main}


def run(argv: list[str] | None = None) -> None:
  """Console entry point: `uir-jax <command> [flags]`."""
  # TensorFlow's C++ start-up notices (oneDNN, CPU features, libpng) are not for people; its
  # errors still show.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help", "help") else 2)
  command = argv.pop(1)
  app.run(COMMANDS[command], argv=argv)


if __name__ == "__main__":
  run()

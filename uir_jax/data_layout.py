"""Image folders and the ten-task `<split>/<degradation>/{LQ,GT}` layout, in plain Python.

Shared by the tf.data readers (`input_pipeline.readers`) and the TensorFlow-free evaluation
(`uir_jax.evaluate`), so both pair the same files the same way (sorted file names, spec §3.1).
"""

from __future__ import annotations

import logging
import os

# File name endings treated as images (compared lower-case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# The ten degradation names of the universal (DA-CLIP) set, in the reference's order (spec §3.2).
DEGRADATIONS = ("motion-blurry", "hazy", "jpeg-compressed", "low-light", "noisy", "raindrop",
                "rainy", "shadowed", "snowy", "uncompleted")


def is_image_name(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str, *, recursive: bool = True) -> list[str]:
  """Sorted paths of the image files under `root` (by extension; hidden files skipped)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
  out = []
  if recursive:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      out.extend(os.path.join(dirpath, f) for f in filenames if is_image_name(f))
  else:
    out = [os.path.join(root, f) for f in os.listdir(root)
           if is_image_name(f) and os.path.isfile(os.path.join(root, f))]
  return sorted(out)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _pair_folder(folder: str, match_names: bool) -> list[tuple[str, str]]:
  lq_dir, gt_dir = os.path.join(folder, "LQ"), os.path.join(folder, "GT")
  if not (os.path.isdir(lq_dir) and os.path.isdir(gt_dir)):
    raise ValueError(f"folder {folder!r} must contain LQ/ and GT/ subfolders")
  lq = list_images(lq_dir, recursive=False)
  gt = list_images(gt_dir, recursive=False)
  if len(lq) != len(gt):
    raise ValueError(f"{folder}: {len(lq)} LQ images but {len(gt)} GT images; LQ and GT are "
                     "paired by sorted file name and must match one to one")
  if match_names:
    for a, b in zip(lq, gt, strict=True):
      if _stem(a) != _stem(b):
        raise ValueError(f"{folder}: LQ/GT file names do not match in sorted order: "
                         f"LQ/{os.path.basename(a)} vs GT/{os.path.basename(b)} (pass "
                         "match_names=False to pair by order only, as the reference does)")
  return list(zip(lq, gt, strict=True))


def list_universal_pairs(split_dir: str, *, match_names: bool = True) -> dict[str, list]:
  """{degradation: [(lq_path, gt_path), ...]} for `split_dir/<degradation>/{LQ,GT}/*`.

  Pairs are formed in sorted file-name order (spec §3.1). With `match_names`, the i-th LQ and
  i-th GT must have the same name up to the extension; otherwise, or if the counts differ, a
  ValueError names the folder and the first mismatch. Degradation folders without LQ/GT subfolders
  are errors too; unknown degradation names are allowed with a warning.
  """
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"{split_dir!r} is not a directory (expected "
                            "<root>/<split>/<degradation>/{LQ,GT}/*)")
  pairs = {}
  for deg in sorted(os.listdir(split_dir)):
    folder = os.path.join(split_dir, deg)
    if deg.startswith(".") or not os.path.isdir(folder):
      continue
    found = _pair_folder(folder, match_names)
    if deg not in DEGRADATIONS:
      logging.warning("%s: %r is not one of the ten degradation names", split_dir, deg)
    if found:
      pairs[deg] = found
  if not pairs:
    raise ValueError(f"{split_dir}: no <degradation>/LQ,GT image pairs found")
  return pairs


def list_pairs(root: str, *, match_names: bool = True) -> dict[str, list]:
  """Pairs of either layout: `root/{LQ,GT}` (one set, named after the folder) or the ten-task
  `root/<degradation>/{LQ,GT}`."""
  if os.path.isdir(os.path.join(root, "LQ")) and os.path.isdir(os.path.join(root, "GT")):
    pairs = _pair_folder(root, match_names)
    if not pairs:
      raise ValueError(f"{root}: LQ/ and GT/ hold no images")
    return {os.path.basename(os.path.normpath(root)) or "images": pairs}
  return list_universal_pairs(root, match_names=match_names)

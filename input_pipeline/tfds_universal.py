"""TFDS builder "universal_ir": the ten-task DA-CLIP / universal-IR set (spec §3.1, §3.2).

The images cannot be downloaded by a script (ten source datasets, several behind forms), so the
builder reads the prepared layout from the TFDS manual dir:

  <manual_dir>/train/<degradation>/{LQ,GT}/*.png
  <manual_dir>/val/<degradation>/{LQ,GT}/*.png        (optional)

LQ and GT are paired by sorted file name, exactly as `readers.universal_source` pairs them (names
must match up to the extension). Folders must be named after the ten degradations
(`readers.DEGRADATIONS`); the degradation becomes a ClassLabel over those names, in the reference's
order. Pairs with an undecodable file or unequal LQ/GT sizes are skipped, counted and logged, as
in the readers. Images are decoded with `image_io` (gray -> RGB, alpha dropped) and stored as
8-bit PNG (16-bit sources are rounded to 8 bits).

  builder = UniversalIr(data_dir="~/tensorflow_datasets")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="datasets/universal"))
  ds = builder.as_dataset(split="train")   # {"lq", "gt", "degradation", "filename"}
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from input_pipeline import image_io, readers

_SPLITS = {"train": "train", "validation": "val"}  # TFDS split name -> folder name.


class UniversalIr(tfds.core.GeneratorBasedBuilder):
  """Paired LQ/GT images of ten degradations for universal image restoration."""

  name = "universal_ir"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Ten-task layout read from the manual dir."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Prepare the DA-CLIP "universal" set as described in daclip-uir's README ("Dataset
  Preparation"): <manual_dir>/train/<degradation>/{LQ,GT}/* and optionally
  <manual_dir>/val/<degradation>/{LQ,GT}/*, with <degradation> one of
  motion-blurry, hazy, jpeg-compressed, low-light, noisy, raindrop, rainy, shadowed, snowy,
  uncompleted. Pass the folder with tfds.download.DownloadConfig(manual_dir=...) or place it in
  ~/tensorflow_datasets/downloads/manual.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds a builder's source file through importlib_resources, an etils extra that is not
    # always installed; this module's own path is the answer it would compute.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "lq": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "gt": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "degradation": tfds.features.ClassLabel(names=list(readers.DEGRADATIONS)),
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("lq", "gt"),
        homepage="https://github.com/Algolzw/daclip-uir",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {name: self._generate_examples(os.path.join(root, folder))
              for name, folder in _SPLITS.items() if os.path.isdir(os.path.join(root, folder))}
    if "train" not in splits:
      raise FileNotFoundError(f"{root}/train not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return splits

  def _generate_examples(self, split_dir: str):
    pairs = readers.list_universal_pairs(split_dir)
    unknown = sorted(set(pairs) - set(readers.DEGRADATIONS))
    if unknown:
      raise ValueError(f"{split_dir}: folder(s) {unknown} are not among the ten degradations "
                       f"{readers.DEGRADATIONS}")
    flat = [(deg, lq, gt) for deg, items in pairs.items() for lq, gt in items]
    keep, _ = readers.validate_pairs([f[1] for f in flat], [f[2] for f in flat],
                                     name=f"universal_ir:{split_dir}")
    for i in keep:
      deg, lq, gt = flat[i]
      filename = os.path.basename(lq)
      yield f"{deg}/{filename}", {"lq": _to_uint8(lq), "gt": _to_uint8(gt), "degradation": deg,
                                  "filename": filename}
    logging.info("universal_ir: %s: %d pairs", split_dir, len(keep))


def _to_uint8(path: str) -> np.ndarray:
  return np.round(image_io.read_image_numpy(path) * 255.0).astype(np.uint8)

"""Smoke run of the IR-SDE restoration trainer (tiny config): train, eval, checkpoint, resume."""

import glob
import json
import os

import numpy as np
import pytest

from configs import irsde_quickstart
from uir_jax.train import restoration


@pytest.mark.slow
def test_quickstart_tiny_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / "wd")
  config = irsde_quickstart.get_config("tiny")
  metrics = restoration.train_and_evaluate(config, workdir)
  assert set(metrics) == {"eval/psnr_lq", "eval/psnr_restored", "eval/ssim_lq",
                          "eval/ssim_restored"}
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(-1.0 <= metrics[k] <= 1.0 for k in ("eval/ssim_lq", "eval/ssim_restored"))
  # Artifacts: config, an eval grid PNG, checkpoints at the interval and the last step.
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 6
  assert glob.glob(os.path.join(workdir, "eval_0000006.png"))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints",
                                                                          "[0-9]*")))
  assert steps == [3, 6]

  # Resume: extending the run continues from step 6 instead of starting over.
  with config.unlocked():
    config.total_steps = 8
  restoration.train_and_evaluate(config, workdir)
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints",
                                                                          "[0-9]*")))
  assert steps[-1] == 8 and 6 in steps


def test_bad_configs_fail_fast(tmp_path):
  config = irsde_quickstart.get_config("tiny")
  with config.unlocked():
    config.model.name = "resnet"
  with pytest.raises(ValueError, match="unknown model name"):
    restoration.build_model(config, None)
  with pytest.raises(ValueError, match="unknown variant"):
    irsde_quickstart.get_config("huge")
  config = irsde_quickstart.get_config("tiny")
  with config.unlocked():
    config.batch_size = 3
  with pytest.raises(ValueError, match="divisible"):
    restoration.train_and_evaluate(config, str(tmp_path))

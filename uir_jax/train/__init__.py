"""The training spine (`loop.py`, `common.py`) and the trainer registry: `config.trainer` names a
stage module of a system (imported only when asked for, so the spine imports no system)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# config.trainer -> module with `train_and_evaluate(config, workdir)`.
TRAINERS = {
    "irsde": "uir_jax.systems.daclip_uir.irsde",
    "nafnet": "uir_jax.systems.daclip_uir.nafnet",
    "daclip": "uir_jax.systems.daclip_uir.daclip",
    "quickstart": "uir_jax.systems.daclip_uir.quickstart",
    "sd": "uir_jax.systems.sd.train",
    "tdr": "uir_jax.systems.textual_deg_removal.train",
}


def get_trainer(name: str) -> Callable:
  if name not in TRAINERS:
    raise ValueError(f"unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
  return importlib.import_module(TRAINERS[name]).train_and_evaluate

"""Trainers, one per stage, on the shared spine (`loop.py`); `config.trainer` picks one."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# config.trainer -> module with `train_and_evaluate(config, workdir)`.
TRAINERS = {
    "irsde": "uir_jax.train.irsde",
    "nafnet": "uir_jax.train.nafnet",
    "daclip": "uir_jax.train.daclip",
    "quickstart": "uir_jax.train.quickstart",
}


def get_trainer(name: str) -> Callable:
  if name not in TRAINERS:
    raise ValueError(f"unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
  return importlib.import_module(TRAINERS[name]).train_and_evaluate

"""The guided restoration networks of TextualDegRemoval by name: one entry point for the trainer,
the CLI and the converter.

    net = build_guided("nafnet", width=32, rngs=nnx.Rngs(0))
    restored = net(lq, guidance)     # NHWC in [0, 1]; the guidance may have any size

`ARCHS` lists the backbones: "nafnet" (`GuidedNAFNet`, the code's NAFNetRefFusion), "restormer"
(`GuidedRestormer`, RestormerRefFusion) and "promptir" (`GuidedPromptIR`, PromptIRRefFusion).
Options are the network's constructor arguments (all take `fusion=`, one of `FUSIONS`); `rngs`
defaults to `nnx.Rngs(0)`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from uir_jax.systems.textual_deg_removal.guided_nafnet import FUSIONS, GuidedNAFNet
from uir_jax.systems.textual_deg_removal.guided_restormer import GuidedPromptIR, GuidedRestormer

__all__ = ["ARCHS", "FUSIONS", "build_guided"]

ARCHS: tuple[str, ...] = ("nafnet", "restormer", "promptir")
# FUSIONS: where the guidance enters: the code's encoder + bottleneck, or also before every
# decoder level (the paper's best ablation, Table 10). Every network takes `fusion=`.
_CLASSES = {"nafnet": GuidedNAFNet, "restormer": GuidedRestormer, "promptir": GuidedPromptIR}


def build_guided(arch: str, **options: Any) -> nnx.Module:
  """A guided network `net(lq, guidance)` of backbone `arch` (one of `ARCHS`)."""
  options.setdefault("rngs", nnx.Rngs(0))
  if arch not in _CLASSES:
    raise ValueError(f"build_guided: unknown arch {arch!r}; expected one of {ARCHS}")
  return _CLASSES[arch](**options)

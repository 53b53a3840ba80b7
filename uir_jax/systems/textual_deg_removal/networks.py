"""The guided restoration networks of TextualDegRemoval by name: one entry point for the trainer,
the CLI and the converter.

    net = build_guided("nafnet", width=32, rngs=nnx.Rngs(0))
    restored = net(lq, guidance)     # NHWC in [0, 1]; the guidance may have any size

`ARCHS` lists the backbones: "nafnet" (`GuidedNAFNet`, the code's NAFNetRefFusion), "restormer"
(RestormerRefFusion) and "promptir" (the code's PromptIR variant). Options are the network's
constructor arguments; `rngs` defaults to `nnx.Rngs(0)`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet

__all__ = ["ARCHS", "build_guided"]

ARCHS: tuple[str, ...] = ("nafnet", "restormer", "promptir")


def build_guided(arch: str, **options: Any) -> nnx.Module:
  """A guided network `net(lq, guidance)` of backbone `arch` (one of `ARCHS`)."""
  options.setdefault("rngs", nnx.Rngs(0))
  if arch == "nafnet":
    return GuidedNAFNet(**options)
  if arch in ("restormer", "promptir"):
    raise NotImplementedError(f"build_guided: arch {arch!r} is not built yet (only 'nafnet')")
  raise ValueError(f"build_guided: unknown arch {arch!r}; expected one of {ARCHS}")

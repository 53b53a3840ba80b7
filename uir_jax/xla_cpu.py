"""XLA CPU options the package sets, applied when `uir_jax` is imported.

XLA CPU (jaxlib 0.10) hands every convolution to YNNPACK. Its kernel gradients (a convolution
whose window is the whole image) and its 3x3 convolutions at 32²-64² with 64-128 channels run
2-4x slower than XLA's own Eigen convolutions and PyTorch's oneDNN ones on the same machine;
YNNPACK's matmuls and elementwise fusions are fine. So the package removes only the convolution
type from YNNPACK's fusions:

  --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

Measured (benchmarks/RESULTS.md, issue 22): the IR-SDE U-Net training step 2.2 s -> 1.6 s on 2
cores; every 3x3 conv of the U-Net, value + both gradients, 1.84 s -> 1.22 s in total (PyTorch
0.94 s; `benchmarks/conv_layers.py`); NAFNet's step unchanged.

Rules:
  * Only XLA's CPU backend reads `xla_cpu_*` options: GPU and TPU programs are untouched.
  * XLA reads XLA_FLAGS once, when the first backend starts, so the option takes effect when
    `uir_jax` is imported before the process runs its first JAX computation (importing jax
    first is fine). Afterwards it changes nothing.
  * A setting of the same option in XLA_FLAGS by the user wins; `UIR_JAX_XLA_CPU_FLAGS=0` turns
    the package's options off.
  * XLA aborts on an option it does not know, so they are only added for the jaxlib versions they
    were measured on (`KNOWN_JAXLIB`).
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
KNOWN_JAXLIB = ((0, 10),)  # (major, minor) series that accept every option of CPU_FLAGS
OPT_OUT = "UIR_JAX_XLA_CPU_FLAGS"


def _jaxlib_series() -> tuple[int, int] | None:
  try:
    from importlib.metadata import version
    major, minor = version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except Exception:  # noqa: BLE001 - no jaxlib metadata: add nothing
    return None


def flags_to_add(xla_flags: str, jaxlib_series: tuple[int, int] | None,
                 opt_out: str | None = None) -> list[str]:
  """The options of CPU_FLAGS that `apply` would append to `xla_flags`."""
  if (opt_out or "").strip().lower() in ("0", "false", "no", "off"):
    return []
  if jaxlib_series not in KNOWN_JAXLIB:
    return []
  return [f for f in CPU_FLAGS if f.split("=")[0] not in xla_flags]


def apply() -> list[str]:
  """Appends the missing options of CPU_FLAGS to os.environ["XLA_FLAGS"]; returns them."""
  current = os.environ.get("XLA_FLAGS", "")
  add = flags_to_add(current, _jaxlib_series(), os.environ.get(OPT_OUT))
  if add:
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), *add]).strip()
  return add

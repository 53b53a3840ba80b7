"""uir-jax: vision-language-guided universal image restoration in JAX/Flax NNX.

DA-CLIP (frozen CLIP + controller), the IR-SDE restorer, NAFNet with DA-CLIP and the wild-IR
variant.
The library never imports TensorFlow; only `input_pipeline/` does.
"""

__version__ = "0.1.0"

# XLA CPU options (YNNPACK convolutions off), before the first computation: see xla_cpu.py.
from uir_jax import xla_cpu as _xla_cpu  # noqa: E402

_xla_cpu.apply()

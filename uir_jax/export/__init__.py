"""Self-describing model exports: a restore function that runs without torch or the model code.

  manifest  the format (file names, the manifest, its checks)
  writer    `write_export`, which every system's export spec calls with its functions and weights
  reader    `load_export` -> `ExportedModel` (numpy, jax and safetensors only: no flax, no models)

A system supplies what its export holds (for DA-CLIP + IR-SDE / NAFNet:
`uir_jax.systems.daclip_uir.export_spec`). Importing this package imports the reader only.
"""

from uir_jax.export.manifest import FORMAT, FORMAT_VERSION, ExportError, parse_sizes, read_manifest
from uir_jax.export.reader import ExportedModel, load_export

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportError", "ExportedModel", "load_export", "parse_sizes",
           "read_manifest"]

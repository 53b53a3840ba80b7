"""Stable Diffusion 1.x / 2.x as a system: `load_pipeline(folder or repo id)` -> a pipeline whose
`generate` does text-to-image (and image-to-image, ControlNet / residual hooks, given text
states), and the latent-diffusion training stage (`train`, trainer "sd"): the base of the SD-based
systems (TextualDegRemoval, Diff-Restorer)."""

from uir_jax.systems.sd.pipeline import (
    ControlNetHook,
    PipelineError,
    StableDiffusionPipeline,
    check_pipeline_folder,
    load_pipeline,
)

__all__ = ["ControlNetHook", "PipelineError", "StableDiffusionPipeline", "check_pipeline_folder",
           "load_pipeline"]

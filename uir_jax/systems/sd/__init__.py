"""Stable Diffusion as a system: the latent-diffusion training stage (`train`), the base that
TextualDegRemoval and Diff-Restorer build on (SD-based systems may import `systems/sd`)."""

"""DA-CLIP + IR-SDE / NAFNet universal image restoration (Luo et al., "Controlling
Vision-Language Models for Multi-Task Image Restoration").

  conditioning  the DA-CLIP view of the LQ, its embeddings and which feeds which input
  restorers     DiffusionRestorer (IR-SDE) and RegressionRestorer (NAFNet), one interface
  daclip, irsde, nafnet, quickstart   the training stages (`config.trainer`)
  zero_shot     DA-CLIP's zero-shot degradation readout
  export_spec   what an export of this system holds (`uir-jax export`)
"""

"""The `uir-jax` commands, one module each (`uir_jax.main` is the dispatch table). Each module
defines its flags (shared ones in `common.py`) and a `main(argv)`; none imports model code at
import time, so `uir-jax restore --model` runs where flax is missing."""

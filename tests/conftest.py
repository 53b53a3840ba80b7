"""Test-wide setup: 8 fake CPU devices for mesh/sharding checks, deterministic CPU numerics."""

import os
import sys

# torch probes for triton when torch._dynamo is imported (torch.save/load, open_clip); loading
# libtriton into a process that already holds TensorFlow's and XLA's LLVM segfaults. The CPU tests
# never need triton: make `import triton` fail cleanly so torch treats it as absent.
sys.modules.setdefault("triton", None)

# PyTorch references and fixture builders live in tests/helpers (not test modules): importable by
# their bare names (`pytest.importorskip("torch_unet")`) from every folder of the tree.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))

# Must happen before jax is imported anywhere: multi-device tests run on 8 fake CPU devices.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session's workers and the runs they start (the
# CLI tests train the same tiny programs in several processes): inside the checkout, so a fresh
# clone starts empty; size-capped, so the cache's file lock keeps concurrent writers apart.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# TensorFlow (input_pipeline tests) must never grab an accelerator or spam logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Random initialisers compile one small program per parameter shape; with threefry each takes
# ~0.1-0.5 s on CPU (24 s to initialise a tiny U-Net), with rbg a few ms. Tests only need some
# random numbers, never particular ones.
jax.config.update("jax_default_prng_impl", "rbg")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def one_device(monkeypatch):
  """In-process training on one of the 8 fake devices, for tests of what a run does (trains,
  saves, resumes, stops, reports) rather than of sharding (tests/train/test_parallel.py and the
  multi-device tests of tests/train/test_train_loop.py): an 8-way SPMD program on 2 cores costs
  these tests about a third of their time."""
  from uir_jax import parallel

  make_mesh = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh",
                      lambda shape=(-1, 1), devices=None: make_mesh(shape, jax.devices()[:1]))


def pytest_collection_modifyitems(config, items):
  # Slow tests first (a stable sort): with `--dist worksteal` (the README's command) the workers
  # split the queue and an idle one takes half of the other's unstarted tests, so the
  # minutes-long tests spread over both and the short ones fill in at the end, instead of one
  # worker running the last long test alone while the other idles.
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  # Torch parity tests must run in CI: if torch is missing there, fail loudly instead of skipping.
  if os.environ.get("CI"):
    return
  try:
    import torch  # noqa: F401
  except ImportError:
    skip = pytest.mark.skip(reason="torch not installed (pip install -e '.[convert]')")
    for item in items:
      if "torch" in item.keywords:
        item.add_marker(skip)

"""Declarative PyTorch -> Flax NNX weight conversion.

A converter is a list of `Rule`s. Each rule matches PyTorch state_dict keys with a regular
expression and names the Flax parameter path(s) it fills (a template using the regex groups) plus a
transform of the array (transpose a conv kernel, split a fused q|k|v projection, ...). `convert`
applies the rules and checks, in this order, that:

  * every source key is matched by exactly one rule or explicitly ignored,
  * every target parameter of the model is filled exactly once,
  * every filled array has the target's shape,

and otherwise raises `ConversionError` naming the offending keys. The reference PyTorch code loads
the restoration U-Net non-strictly (silently dropping mismatches); we never do.

Target paths are dotted strings over the model's `nnx.state(model, nnx.Param)` tree, e.g.
"downs.0.block1.proj.kernel"; integer path components (list indices) are written as numbers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray
Transform = Callable[[Array], Array | Sequence[Array]]


class ConversionError(ValueError):
  """A checkpoint does not match the model: names the missing, unexpected or mis-shaped keys."""


# ----------------------------------------------------------------------------------------------
# Transforms (PyTorch layout -> Flax layout).
# ----------------------------------------------------------------------------------------------


def identity(x: Array) -> Array:
  return x


def linear(x: Array) -> Array:
  """nn.Linear weight [out, in] -> Flax Dense kernel [in, out]."""
  return x.T


def conv(x: Array) -> Array:
  """nn.Conv2d weight [out, in, kh, kw] -> Flax Conv kernel [kh, kw, in, out]."""
  return np.transpose(x, (2, 3, 1, 0))


def conv1x1_to_linear(x: Array) -> Array:
  """1x1 nn.Conv2d weight [out, in, 1, 1] -> Dense kernel [in, out]."""
  return x[:, :, 0, 0].T


def flatten(x: Array) -> Array:
  """Broadcastable per-channel parameter (e.g. [1, C, 1, 1] or [1, C]) -> [C]."""
  return x.reshape(-1)


def split(n: int, inner: Transform = identity) -> Transform:
  """Split along axis 0 into `n` equal parts, each passed through `inner` (fused qkv -> q, k, v)."""

  def fn(x: Array) -> list[Array]:
    if x.shape[0] % n:
      raise ConversionError(f"cannot split a tensor of shape {x.shape} into {n} parts along axis 0")
    return [np.asarray(inner(p)) for p in np.split(x, n, axis=0)]

  return fn


# ----------------------------------------------------------------------------------------------
# Rules and the conversion driver.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps source keys matching `pattern` (full match) to one or more target paths.

  `target` is a template for `re.Match.expand` (use \\1 or \\g<name>); a tuple of templates means
  the transform returns that many arrays, in order.
  """

  pattern: str
  target: str | tuple[str, ...]
  transform: Transform = identity

  def __post_init__(self):
    object.__setattr__(self, "_regex", re.compile(self.pattern))

  def match(self, key: str) -> re.Match | None:
    return self._regex.fullmatch(key)  # type: ignore[attr-defined]


def dense_rules(src: str, dst: str) -> list[Rule]:
  """nn.Linear `src.weight` / `src.bias` (`src` is a regex) -> Dense `dst.kernel`, `dst.bias`."""
  return [Rule(src + r"\.weight", dst + ".kernel", linear), Rule(src + r"\.bias", dst + ".bias")]


def to_numpy(value: Any) -> Array:
  """A torch tensor (any dtype/device), numpy array or scalar -> float32 numpy array."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if hasattr(value, "float") and value.is_floating_point():
      value = value.float()
    value = value.numpy()
  arr = np.asarray(value)
  if arr.dtype.kind == "f" and arr.dtype != np.float32:
    arr = arr.astype(np.float32)
  return arr


def flat_params(state: Any) -> dict[str, Any]:
  """Flattens an NNX state (or nested dict) into {"a.b.0.kernel": leaf}."""
  from flax import nnx  # local: keep this module importable without flax for tooling

  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)
  out: dict[str, Any] = {}

  def rec(prefix: str, node: Any):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  rec("", state)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flat_params` for plain nested dicts (integer-looking keys become ints)."""
  root: dict = {}
  for path, leaf in flat.items():
    node = root
    parts = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = leaf
  return root


def convert(
    state_dict: Mapping[str, Any],
    rules: Iterable[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, Array]:
  """Converts a PyTorch state_dict into a flat {flax_path: array} dict, checking everything.

  Args:
    state_dict: PyTorch key -> tensor/array.
    rules: the key map; the first matching rule wins.
    target_shapes: flat flax path -> expected shape, for every parameter the model has.
    ignore: regexes (full match) of source keys that are deliberately dropped (aliases, buffers).
    what: a name for error messages ("DA-CLIP checkpoint", "universal-ir U-Net", ...).

  Returns:
    Flat dict flax path -> float32 numpy array covering exactly `target_shapes`.

  Raises:
    ConversionError naming unmatched source keys, unfilled or doubly-filled targets, or shapes.
  """
  rules = list(rules)
  ignore_re = [re.compile(p) for p in ignore]
  out: dict[str, Array] = {}
  filled_by: dict[str, str] = {}
  unmatched: list[str] = []
  unknown_targets: list[str] = []
  shape_errors: list[str] = []
  bad_shape_targets: set[str] = set()

  for key, value in state_dict.items():
    if any(r.fullmatch(key) for r in ignore_re):
      continue
    for rule in rules:
      m = rule.match(key)
      if m is not None:
        break
    else:
      unmatched.append(key)
      continue
    templates = (rule.target,) if isinstance(rule.target, str) else rule.target
    arr = to_numpy(value)
    result = rule.transform(arr)
    results = [result] if isinstance(rule.target, str) else list(result)
    if len(results) != len(templates):
      raise ConversionError(
          f"{what}: rule for {key!r} produced {len(results)} arrays for {len(templates)} targets"
      )
    for tmpl, res in zip(templates, results, strict=True):
      path = m.expand(tmpl)
      res = np.asarray(res)
      if path not in target_shapes:
        unknown_targets.append(f"{key} -> {path}")
        continue
      if path in filled_by:
        raise ConversionError(
            f"{what}: target {path!r} filled twice (by {filled_by[path]!r} and {key!r})")
      if tuple(res.shape) != tuple(target_shapes[path]):
        bad_shape_targets.add(path)
        shape_errors.append(
            f"{key} (source shape {tuple(arr.shape)}) -> {path}: got {tuple(res.shape)}, "
            f"model expects {tuple(target_shapes[path])}"
        )
        continue
      filled_by[path] = key
      out[path] = res

  missing = sorted(set(target_shapes) - set(filled_by) - bad_shape_targets)
  problems = []
  if unmatched:
    problems.append(f"unexpected keys in the {what} (no rule matches): {_fmt(unmatched)}")
  if unknown_targets:
    problems.append(f"keys mapped to parameters the model does not have: {_fmt(unknown_targets)}")
  if shape_errors:
    problems.append("shape mismatches:\n    " + "\n    ".join(shape_errors[:20]))
  if missing:
    sources = _expected_sources(missing, filled_by)
    problems.append(f"model parameters not found in the {what}: {_fmt(sources)}")
  if problems:
    raise ConversionError(f"cannot load {what}:\n  " + "\n  ".join(problems))
  return out


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
  keys = list(keys)
  shown = ", ".join(repr(k) for k in keys[:limit])
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return f"[{shown}{more}] ({len(keys)} total)"


def _expected_sources(missing: Sequence[str], filled_by: Mapping[str, str]) -> list[str]:
  # Report missing targets by their flax path; the PyTorch name is usually obvious from it and the
  # rule table, and a reverse template expansion is not well defined for regex rules.
  del filled_by
  return list(missing)


def assign(model: Any, flat: Mapping[str, Array], dtype: Any = None) -> None:
  """Writes a flat {path: array} dict (from `convert`) into an NNX model's parameters in place."""
  import jax.numpy as jnp
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  current = flat_params(pure)
  if set(current) != set(flat):
    extra = sorted(set(flat) - set(current))
    missing = sorted(set(current) - set(flat))
    raise ConversionError(f"parameter sets differ: missing {_fmt(missing)}, extra {_fmt(extra)}")
  new = unflatten(
      {k: jnp.asarray(v, dtype=dtype or current[k].dtype) for k, v in flat.items()}
  )
  nnx.replace_by_pure_dict(state, new)
  nnx.update(model, state)


def param_shapes(model: Any) -> dict[str, tuple[int, ...]]:
  """Flat {path: shape} of an NNX model's (possibly abstract) parameters."""
  from flax import nnx

  return {k: tuple(v.shape) for k, v in flat_params(nnx.state(model, nnx.Param)).items()}


def unwrap_network(ckpt: Mapping[str, Any], containers: Sequence[str]) -> dict[str, Any]:
  """A network's state_dict inside a checkpoint: the first of `containers` (e.g. "state_dict",
  "params") holding a mapping, else the checkpoint itself; a DataParallel "module." is stripped."""
  for key in containers:
    if key in ckpt and isinstance(ckpt[key], Mapping):
      ckpt = ckpt[key]
      break
  if not ckpt:
    raise ConversionError("checkpoint has an empty state_dict")
  return strip_prefix(ckpt, "module.")


def check_options(options: Mapping[str, Any], inferred: Mapping[str, Any], model: str) -> None:
  """Every option a caller gave must be known and agree with what the checkpoint implies.

  Sequences are compared as tuples (a config's list equals the inferred tuple).
  """
  for name, value in options.items():
    if name not in inferred:
      raise ValueError(f"unknown {model} option {name!r}; known: {sorted(inferred)}")
    want = tuple(value) if isinstance(inferred[name], tuple) else value
    if want != inferred[name]:
      raise ConversionError(f"option {name}={value!r} disagrees with the checkpoint, which has "
                            f"{name}={inferred[name]!r}")


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
  """Strips `prefix` from every key that has it (DataParallel / DDP checkpoints)."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_torch_file(path: str) -> Mapping[str, Any]:
  """Loads a PyTorch checkpoint file on CPU (needs the [convert] extra).

  The released DA-CLIP files are full training checkpoints whose pickles reference numpy globals
  (learning rates in the optimizer state), which `weights_only=True` (torch >= 2.6 default) rejects;
  only files the user points us at are read, so `weights_only=False` is used as a fallback.
  """
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reading PyTorch checkpoints needs torch: pip install 'uir-jax[convert]'"
    ) from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # noqa: BLE001 - numpy globals or old pickles
    return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(path_or_state_dict: Any) -> Mapping[str, Any]:
  """A state_dict from a .pt/.pth/.bin/.safetensors path, or the given mapping itself."""
  import os

  if isinstance(path_or_state_dict, (str, os.PathLike)):
    path = os.fspath(path_or_state_dict)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      return load_file(path)
    return load_torch_file(path)
  if not isinstance(path_or_state_dict, Mapping):
    raise ValueError(f"expected a path or a state_dict mapping, got {type(path_or_state_dict)}")
  return path_or_state_dict

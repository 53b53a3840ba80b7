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

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def torch_key(path: str, reverse: Sequence[tuple[str, str]]) -> str:
  """The PyTorch state_dict key that fills our parameter `path`, by a family's reverse table of
  (pattern, replacement) regex substitutions applied in order."""
  for pattern, repl in reverse:
    path = re.sub(pattern, repl, path)
  return path


def expected_torch_keys(model: Any, reverse: Sequence[tuple[str, str]]) -> list[str]:
  """The PyTorch state_dict keys (sorted) a checkpoint for `model` has, by the reverse table."""
  return sorted(torch_key(p, reverse) for p in param_shapes(model))


def load_checked(abstract: Any, sd: Mapping[str, Any], rules: Sequence[Rule],
                 reverse: Sequence[tuple[str, str]], *, what: str,
                 ignore: Iterable[str] = ()) -> Any:
  """Fills an abstract model (`nnx.eval_shape`) from `sd`: first names the PyTorch keys the file
  lacks (by the reverse table: clearer than our paths), then converts and assigns."""
  missing = [k for k in expected_torch_keys(abstract, reverse) if k not in sd]
  if missing:
    raise ConversionError(f"cannot load {what}: keys missing from the file: {_fmt(missing)}")
  assign(abstract, convert(sd, rules, param_shapes(abstract), ignore=ignore, what=what))
  return abstract


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


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files: never runs code from the file unless asked to.
# ----------------------------------------------------------------------------------------------

TRUST_OPT_IN = "--trust_checkpoint (trust=True in Python)"


class CheckpointError(ConversionError):
  """A file cannot be read as a checkpoint: a directory, empty, truncated, not a checkpoint, not a
  state_dict, or a pickle that asks for more than data (`UntrustedCheckpointError`)."""


class UntrustedCheckpointError(CheckpointError):
  """A pickle that needs globals beyond the data allowlist: loading it would run code from it."""

  def __init__(self, path: str, names: Sequence[str]):
    self.path, self.globals = path, tuple(names)
    asked = ", ".join(names) if names else "a global it does not name"
    super().__init__(
        f"{path}: refused: its pickle asks for {asked}, which is not data (allowed: tensors, "
        f"numpy scalars / arrays / dtypes, OrderedDict), so loading it could run code from the "
        f"file. Use a .safetensors of it, or pass {TRUST_OPT_IN} only if you trust its source: "
        f"that runs code from the file")


def _torch_safe_globals() -> list[Any]:
  """What `torch.load(weights_only=True)` may build besides tensors and containers: numpy scalars,
  arrays and dtypes as numpy 1.x (`numpy.core.*`) and 2.x (`numpy._core.*`) pickle them (training
  checkpoints keep numpy learning rates and epochs in their optimizer state). All of them are data:
  an ndarray's state (shape, dtype, bytes or a list of objects) is unpickled under the same rules.
  OrderedDict is on torch's own list."""
  import numpy.dtypes

  try:
    from numpy._core import multiarray
  except ImportError:  # numpy 1.x
    from numpy.core import multiarray
  dtype_classes = [v for v in vars(numpy.dtypes).values()
                   if isinstance(v, type) and issubclass(v, np.dtype)]
  named = [(fn, f"{module}.multiarray.{fn.__name__}")
           for fn in (multiarray.scalar, multiarray._reconstruct)
           for module in ("numpy.core", "numpy._core")]
  return [np.dtype, np.ndarray, *dtype_classes, *named]


_GLOBAL_PATTERNS = (  # torch's weights-only unpickler errors, by the global they name
    r"GLOBAL (\S+) was not an allowed global",
    r"unsupported GLOBAL (\S+) whose module",
    r"allowlisted via `add_safe_globals`,? but got <class '([^']+)'>",
)


def refused_globals(message: str) -> list[str]:
  """The global(s) a weights-only load refused, parsed from torch's error message; [] if none."""
  for pattern in _GLOBAL_PATTERNS:
    names = re.findall(pattern, message)
    if names:
      # torch writes builtins as bare names ("eval"); say where they come from.
      return list(dict.fromkeys(n if "." in n else f"builtins.{n}" for n in names))
  return []


def _short_reason(e: BaseException) -> str:
  """" (why)" from torch's zip reader, whose first sentence says what is wrong with the archive;
  "" for unpickling errors (an opcode number, or advice to load the file unsafely)."""
  if not isinstance(e, RuntimeError):
    return ""
  text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(e).split()))
  return f" ({text.split('. ')[0][:200]})" if text else ""


def load_torch_file(path: str, *, trust: bool = False) -> Any:
  """A PyTorch file (`torch.save`: zip or legacy format) read on CPU without running its code.

  `torch.load(weights_only=True)` with `_torch_safe_globals` allowed for this call only. A file
  that needs anything else raises `UntrustedCheckpointError` naming it; `trust=True` loads it with
  plain pickle instead, which RUNS CODE FROM THE FILE: only for files whose source you trust.
  Raises `CheckpointError` for a file that is not a readable PyTorch checkpoint.
  """
  import os
  import pickle

  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reading PyTorch checkpoints needs torch: pip install 'uir-jax[convert]' (or convert the "
        "file to .safetensors where torch is installed: uir-jax convert)"
    ) from e
  if os.path.getsize(path) == 0:
    raise CheckpointError(f"{path}: empty file, not a checkpoint")
  if trust:
    try:
      return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever the file held: one line naming it
      raise CheckpointError(f"{path}: cannot load it ({one_line(e)[:300]})") from e
  # Scoped to this call (torch keeps one process-wide set): what the caller allowed stays.
  present = set(torch.serialization.get_safe_globals())
  allowed = [g for g in _torch_safe_globals() if g not in present]
  try:
    with torch.serialization.safe_globals(allowed):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    names = refused_globals(str(e))
    if not names:  # a zip checkpoint: list every unlisted global, not only the first
      try:
        with torch.serialization.safe_globals(allowed):
          names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
      except Exception:  # noqa: BLE001 - legacy format or unreadable: keep what we have
        names = []
    if names or "GLOBAL" in str(e):
      raise UntrustedCheckpointError(path, names) from e
    raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a truncated / corrupt one"
                          f"{_short_reason(e)}") from e
  except Exception as e:  # noqa: BLE001 - truncated zips, text, other archives: one line
    raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a truncated / corrupt one"
                          f"{_short_reason(e)}") from e


def read_state_dict(path_or_state_dict: Any, *, trust: bool = False) -> Mapping[str, Any]:
  """A state_dict from a .pt/.pth/.bin/.safetensors path, or the given mapping itself.

  `.safetensors` files hold arrays only (the recommended format: nothing in them can run). PyTorch
  files go through `load_torch_file`: data only unless `trust=True`, which runs code from the
  file. Raises FileNotFoundError for a missing file and `CheckpointError` (one line naming the
  file) for one that cannot be read as a mapping of arrays.
  """
  import os

  if isinstance(path_or_state_dict, (str, os.PathLike)):
    path = os.fspath(path_or_state_dict)
    if os.path.isdir(path):
      raise CheckpointError(f"{path}: a directory, not a checkpoint file")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      try:
        return load_file(path)
      except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one line naming it
        raise CheckpointError(f"{path}: not a readable .safetensors file "
                              f"({one_line(e)[:200]})") from e
    ckpt = load_torch_file(path, trust=trust)
    if trust and not isinstance(ckpt, Mapping) and callable(getattr(ckpt, "state_dict", None)):
      ckpt = ckpt.state_dict()  # a whole pickled model, `torch.save(model)`
    if not isinstance(ckpt, Mapping):
      raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a state_dict (a mapping "
                            f"of names to tensors)")
    return ckpt
  if not isinstance(path_or_state_dict, Mapping):
    raise ValueError(f"expected a path or a state_dict mapping, got {type(path_or_state_dict)}")
  return path_or_state_dict


def one_line(e: BaseException) -> str:
  """An error as a command's one-line refusal: our errors' messages as they are (they name the
  file), others after their type name; a multi-line message (a list of keys) joined."""
  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  if isinstance(e, (ConversionError, OSError)) and text:
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def checkpoint_errors(path: Any, field: str = "") -> Iterator[None]:
  """Any error while loading the checkpoint `path` becomes one `CheckpointError` line naming it
  ("[field ]path: problem"; the original is chained), so that a command refuses a wrong, corrupt
  or untrusted file with one line instead of a traceback. A missing file stays FileNotFoundError
  and an `UntrustedCheckpointError` stays itself (both name the file). Not a path: unchanged."""
  import os

  if not isinstance(path, (str, os.PathLike)):
    yield
    return
  path = os.fspath(path)
  try:
    yield
  except (FileNotFoundError, UntrustedCheckpointError):
    raise
  except Exception as e:  # noqa: BLE001 - wrong kind, corrupt, mismatched: named, one line
    text = one_line(e)
    if path not in text:
      text = f"{path}: {text}"
    elif isinstance(e, CheckpointError) and not field:
      raise
    raise CheckpointError(f"{field} {text}" if field else text) from e

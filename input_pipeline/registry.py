"""Degradation pipelines by name or by declarative spec, so configs can define their own chains.

Every registered op has the signature `op(image, seed, **params) -> (image, words)` of
`input_pipeline.degradations` (float32 [H, W, 3] image, int32[2] stateless seed, bool[4] words over
`DEGRADATION_WORDS`). A spec composes them with the combinators of `degradations` (`leaf`, `gated`,
`chain`, `shuffled`, `run_pipeline`), so a spec-built chain has the same seed plumbing as the
hand-written one: `build_pipeline(wild_spec())` gives bit-identical output to `random_degrade`.

Step spec (a dict; a list of steps is a chain):

  {"op": "blur", "prob": 0.8, "else": {"op": "udc", "prob": 0.2}, "max_radius": 10, ...}
      a registered op with its parameters; "prob" (a float, or the name of a shared gate) applies
      it with that probability, else the "else" step (or nothing);
  {"op": "shuffle", "steps": [...]}   the steps in a random order per example (wild paper §3.2);
  {"op": "chain", "steps": [...]}     the steps in order. Both take "prob" / "else" too.

Pipeline spec: a list of steps, or {"steps": [...], "gates": {"resize": 0.8}, "quantize": true}.
"gates" are drawn once per example and shared by every step whose "prob" names them (the wild
chain's resize flag enables both the resize down and the resize back); "quantize" (default true)
rounds the output to 8 bits. An op parameter "size": "input" means the pipeline input's (h, w).

    pipeline = get_pipeline("wild")                       # the spec §7.2 chain, reference probs
    pipeline = get_pipeline("wild", jpeg_prob=0.0)        # ... with overrides
    pipeline = get_pipeline([{"op": "blur", "prob": 0.5}, {"op": "jpeg", "quality_range": [30, 60]},
                             {"op": "shuffle", "steps": [{"op": "noise"}, {"op": "resize"}]}])
    lq, words = pipeline(image, seed)                     # eagerly or inside tf.data.Dataset.map

Resources that cannot live in a config (PSF banks) are passed to `build_pipeline` / `get_pipeline`
as keywords and handed to every op whose signature takes them (`psf_bank`, `udc_bank`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from input_pipeline import degradations as deg

# name -> op(image, seed, **params) -> (image, words), or a pipeline spec (built when used).
_REGISTRY: dict[str, Any] = {}
_COMBINATORS = ("shuffle", "chain")
_STEP_KEYS = ("op", "prob", "else", "steps")


def register(name: str, *, replace: bool = False):
  """Decorator: `register("name")(fn)` makes an op (or a pipeline spec) available by name.

  fn is `op(image, seed, **params) -> (image, words)` or a pipeline spec (list / dict). Names are
  unique unless replace=True, so two modules cannot silently shadow each other's ops.
  """
  if not isinstance(name, str) or not name or name in _COMBINATORS:
    raise ValueError(f"op name must be a non-empty string other than {_COMBINATORS}, got {name!r}")

  def decorator(fn):
    if name in _REGISTRY and not replace:
      raise ValueError(f"degradation op {name!r} is already registered (pass replace=True)")
    if not callable(fn):
      fn = plain_spec(fn)
      if not isinstance(fn, (list, dict)):
        raise ValueError(f"register({name!r}) needs a callable op or a pipeline spec, got {fn!r}")
    _REGISTRY[name] = fn
    return fn

  return decorator


def registered() -> list[str]:
  """The registered op and pipeline names, sorted."""
  return sorted(_REGISTRY)


def _lookup(name):
  if name not in _REGISTRY:
    raise ValueError(f"unknown degradation op {name!r}; known: {registered()} "
                     f"(and the combinators {list(_COMBINATORS)})")
  op = _REGISTRY[name]
  if not callable(op):  # a registered spec: used as an op it runs as a whole pipeline
    spec = op
    op = lambda image, seed, **resources: build_pipeline(spec, **resources)(image, seed)
  return op


def plain_spec(spec):
  """ml_collections ConfigDicts (and other `to_dict` objects) -> plain dicts; tuples -> lists."""
  if hasattr(spec, "to_dict") and not isinstance(spec, Mapping):
    spec = spec.to_dict()
  if isinstance(spec, Mapping):
    return {k: plain_spec(v) for k, v in spec.items()}
  if isinstance(spec, tuple):
    return [plain_spec(v) for v in spec]
  if isinstance(spec, list):
    return [plain_spec(v) for v in spec]
  return spec


# --- The ops. ------------------------------------------------------------------------------------


def _with_word(fn, word):
  def op(image, seed, **params):
    return fn(image, seed, **params), deg.word_mask(word)

  op.__signature__ = inspect.signature(fn)
  op.__doc__ = fn.__doc__
  return op


def udc(image, seed, *, udc_bank=None):
  """Under-display-camera filter (spec §7.4); a no-op without a UDC bank (none is shipped)."""
  if udc_bank is None:
    return deg._as_image(image), deg.no_words()
  return deg.under_display_filter(image, seed, udc_bank=udc_bank)


def quantize(image, seed):
  """8-bit quantisation as an explicit step; adds no word."""
  del seed
  return deg.quantize(image), deg.no_words()


def low_light(image, seed, *, gamma_range=(1.4, 2.2), gain_range=(0.4, 0.7)):
  """Under-exposure: gain · image^γ with γ and the gain drawn uniformly (a dark, low-contrast
  photo; the synthetic stand-in for the universal set's "low-light" task). Adds no word."""
  import tensorflow as tf

  image = deg._as_image(image)
  s = tf.random.experimental.stateless_split(seed, 2)
  gamma = tf.random.stateless_uniform([], s[0], *gamma_range)
  gain = tf.random.stateless_uniform([], s[1], *gain_range)
  return gain * tf.pow(tf.clip_by_value(image, 0.0, 1.0), gamma), deg.no_words()


def haze(image, seed, *, beta_range=(0.6, 1.4), airlight_range=(0.7, 0.9)):
  """Atmospheric scattering I = J t + A (1 − t), t = exp(−β d), with a depth d growing from the
  bottom (near, 0.3) to the top (far, 1.0) of the crop, β and the airlight A drawn uniformly (the
  stand-in for the "hazy" task). Adds no word."""
  import tensorflow as tf

  image = deg._as_image(image)
  s = tf.random.experimental.stateless_split(seed, 2)
  beta = tf.random.stateless_uniform([], s[0], *beta_range)
  airlight = tf.random.stateless_uniform([], s[1], *airlight_range)
  h = tf.shape(image)[0]
  depth = 1.0 - 0.7 * tf.linspace(0.0, 1.0, h)[:, None, None]
  t = tf.exp(-beta * depth)
  return image * t + airlight * (1.0 - t), deg.no_words()


register("blur")(deg.random_blur)
register("resize")(deg.random_resize)
register("noise")(deg.random_noise)
register("gaussian_noise")(_with_word(deg.add_gaussian_noise, deg.NOISE))
register("poisson_noise")(_with_word(deg.add_poisson_noise, deg.NOISE))
register("jpeg")(deg.random_jpeg)
register("udc")(udc)
register("quantize")(quantize)
register("low_light")(low_light)
register("haze")(haze)
register("wild")(deg.random_degrade)


def wild_spec(*, blur_prob=0.8, resize_prob=0.8, noise_prob=0.4, jpeg_prob=0.4, udc_prob=0.2):
  """The spec §7.2 chain written as a pipeline spec (a template for configs' own chains).

  Same structure as `degradations.wild_chain`, so `build_pipeline(wild_spec(**p))` equals
  `random_degrade(..., **p)` bit for bit; registered "wild" is `random_degrade` itself.
  """
  udc_step = {"op": "udc", "prob": udc_prob}
  return {
      "gates": {"resize": resize_prob},
      "steps": [
          {"op": "shuffle", "steps": [
              {"op": "blur", "prob": blur_prob, "else": udc_step, "max_radius": 10,
               "sinc_prob": 0.1, "deblur_prob": 0.1, "blur_range": [0.2, 2.2]},
              {"op": "resize", "prob": "resize"},
              {"op": "noise", "prob": noise_prob},
              {"op": "jpeg", "prob": jpeg_prob, "quality_range": [60, 95]},
          ]},
          {"op": "shuffle", "steps": [
              {"op": "blur", "prob": blur_prob * 0.5, "else": udc_step, "max_radius": 5,
               "sinc_prob": 0.1, "deblur_prob": 0.1, "blur_range": [0.2, 1.5]},
              {"op": "noise", "prob": noise_prob * 0.5},
          ]},
          {"op": "shuffle", "steps": [
              {"op": "blur", "prob": blur_prob, "max_radius": 10, "sinc_prob": 0.8,
               "deblur_prob": 0.1, "blur_range": [0.2, 1.0]},
              {"op": "resize", "prob": "resize", "size": "input"},
              {"op": "jpeg", "prob": jpeg_prob, "quality_range": [80, 100]},
          ]},
      ],
      "quantize": True,
  }


# --- Building. -----------------------------------------------------------------------------------


def _accepted(op) -> tuple[set[str], bool]:
  """The keyword parameters op takes after (image, seed), and whether it takes **kwargs."""
  params = list(inspect.signature(op).parameters.values())[2:]
  var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
  return {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}, var_kw


def _bind(op, params, resources, where):
  names, var_kw = _accepted(op)
  if not var_kw:
    unknown = sorted(set(params) - names)
    if unknown:
      raise ValueError(f"{where}: unknown parameter(s) {unknown}; {where} takes {sorted(names)}")
  extra = {k: v for k, v in resources.items()
           if v is not None and k not in params and (var_kw or k in names)}
  return lambda image, seed, **kw: op(image, seed, **extra, **kw)


def _build_step(spec, resources, gates_used, where):
  """One step spec -> a `degradations` step fn(image, words, seed, ctx) -> (image, words)."""
  spec = plain_spec(spec)
  if isinstance(spec, list):
    return deg.chain([_build_step(s, resources, gates_used, f"{where}[{i}]")
                      for i, s in enumerate(spec)])
  if not isinstance(spec, dict) or not isinstance(spec.get("op"), str):
    raise ValueError(f"{where}: a step must be a dict with a string 'op' (or a list of steps), "
                     f"got {spec!r}")
  name = spec["op"]
  where = f"{where} ({name})"
  if name in _COMBINATORS:
    extra = sorted(set(spec) - set(_STEP_KEYS))
    steps = spec.get("steps")
    if extra or not isinstance(steps, list) or not steps:
      raise ValueError(f"{where}: needs a non-empty 'steps' list and takes only {_STEP_KEYS}; "
                       f"got keys {sorted(spec)}")
    inner = [_build_step(s, resources, gates_used, f"{where}.steps[{i}]")
             for i, s in enumerate(steps)]
    step = deg.shuffled(inner) if name == "shuffle" else deg.chain(inner)
  else:
    if "steps" in spec:
      raise ValueError(f"{where}: only {list(_COMBINATORS)} take 'steps'")
    params = {k: v for k, v in spec.items() if k not in _STEP_KEYS}
    step = deg.leaf(_bind(_lookup(name), params, resources, where), **params)
  if "prob" not in spec:
    if "else" in spec:
      raise ValueError(f"{where}: 'else' needs a 'prob'")
    return step
  prob = spec["prob"]
  if isinstance(prob, str):
    gates_used.add(prob)
  elif not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
    raise ValueError(f"{where}: 'prob' must be a probability in [0, 1] or a gate name, "
                     f"got {prob!r}")
  otherwise = None
  if "else" in spec:
    otherwise = _build_step(spec["else"], resources, gates_used, f"{where}.else")
  return deg.gated(step, prob, otherwise)


def build_chain(steps, **resources):
  """A list of step specs (or one step spec) -> one `degradations` step (see the module doc)."""
  return _build_step(steps, resources, set(), "spec")


def build_pipeline(spec, **resources) -> Callable:
  """Pipeline spec -> fn(image, seed) -> (lq float32 [H, W, 3], words bool[4]).

  Everything is checked here, before any tracing: op names, parameter names, gate names,
  probabilities. resources (psf_bank=, udc_bank=) go to the ops that take them.
  """
  spec = plain_spec(spec)
  if isinstance(spec, list):
    spec = {"steps": spec}
  if not isinstance(spec, dict):
    raise ValueError(f"a pipeline spec is a list of steps or a dict, got {spec!r}")
  extra = sorted(set(spec) - {"steps", "gates", "quantize"})
  if extra:
    raise ValueError(f"unknown pipeline spec key(s) {extra}; known: steps, gates, quantize")
  gates = dict(spec.get("gates") or {})
  for gate, p in gates.items():
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
      raise ValueError(f"gate {gate!r} must be a probability in [0, 1], got {p!r}")
  used = set()
  step = _build_step(spec.get("steps", []), resources, used, "spec")
  undeclared = sorted(used - set(gates))
  if undeclared:
    raise ValueError(f"steps use undeclared gate(s) {undeclared}; declared: {sorted(gates)}")
  final_quantize = bool(spec.get("quantize", True))

  def pipeline(image, seed):
    return deg.run_pipeline(step, image, seed, gates=gates, final_quantize=final_quantize)

  return pipeline


def get_pipeline(name_or_spec: str | Sequence | Mapping, **kwargs) -> Callable:
  """A registered name or a pipeline spec -> fn(image, seed) -> (lq, words).

  With a name, kwargs are the op's parameters (for "wild": the probabilities and the banks); with
  a spec, kwargs are resources (see `build_pipeline`). Unknown names raise a ValueError listing
  the known ones.
  """
  if isinstance(name_or_spec, str):
    op = _lookup(name_or_spec)
    op = _bind(op, kwargs, {}, f"op {name_or_spec!r}")
    return lambda image, seed: op(image, seed, **kwargs)
  return build_pipeline(name_or_spec, **kwargs)

"""The training spine every trainer shares.

A stage (IR-SDE, NAFNet regression, DA-CLIP controller) supplies a `Stage`: how to build its model,
its loss, its optimizer, the frozen arrays it reads (e.g. a DA-CLIP), and its evaluation. The spine
does the rest, identically for all of them:

  1. `config.json` in the workdir; the multi-process start; the mesh from `config.mesh`.
  2. The train state {step, params, rest, opt, ema} created already sharded (`parallel`).
  3. Restore, in this order: the workdir's own latest checkpoint (resume) -> `config.init_from`
     (parameters only, through the stage's loader) -> the fresh init.
  4. The loop: this host's rows of each batch -> global arrays -> one compiled step (jit over the
     mesh, or pmap), with periodic logging (loss, steps/s, ETA, data-wait share), evaluation,
     checkpoints, and a clean exit on SIGTERM / a preemption notice (checkpoint first).
  5. A finiteness check of every step's loss before anything is saved: a non-finite loss stops
     the run with the step named, and the newest checkpoint stays the last finite state.

Determinism: the step key is `fold_in(seed key, step)` and stages draw per-example randomness from
`fold_in(step key, global example index)`, so the numbers do not depend on how the batch is split
over devices or hosts; the input stream is a pure function of (seed, step). A resumed run is
therefore bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from uir_jax import parallel
from uir_jax.checkpoint import Checkpointer, abstract_like

# Stage.loss_fn(model, batch, key, aux) -> (scalar loss, {name: scalar}); batch arrays are this
# program's view of the batch (global under jit, one device's rows under pmap).
LossFn = Callable[[nnx.Module, dict, jax.Array, Any], tuple[jax.Array, dict]]
# Stage.evaluate(graphdef, params, rest, aux, batch) -> ({name: float}, {name: uint8 image})
EvalFn = Callable[..., tuple[dict[str, float], dict[str, np.ndarray]]]


@dataclasses.dataclass
class Stage:
  """What a trainer supplies to the spine.

  Attributes:
    name: shown in progress lines ("irsde", "nafnet", "daclip").
    build_model: () -> nnx.Module, freshly initialised from the config's seed; traced under jit
      (so the parameters are created sharded), hence no host-side weight loading inside.
    loss_fn: see `LossFn`. Must reduce over the batch with a mean of per-example terms (so the
      pmap strategy's mean of device means is the global mean) and draw its randomness per
      example from `fold_in(key, batch["index"])`.
    batch_keys: the host batch fields the step reads.
    optimizer: optax transformation (its schedule is `schedule`).
    schedule: step -> learning rate, for the logs.
    trainable: nnx filter of the trained variables (the rest is carried unchanged).
    aux: frozen arrays passed to loss_fn and evaluate (e.g. a frozen DA-CLIP's state), or None.
    evaluate: see `EvalFn` (receives the EMA parameters), or None.
    eval_keys: the batch fields evaluation reads.
    load_params: (path, trust=) -> nnx.State of trainable parameters (for `config.init_from`;
      `trust`: the config's `trust_checkpoint`), or None.
    post_update: params -> params applied after every optimizer update (e.g. a clamp), or None.
    initial_state: () -> (params, rest) replacing the random init of a fresh run (e.g. a
      pretrained CLIP under a new controller), or None. Loaded on the host, then sharded.
    prepare: host-side numpy batch -> numpy batch before it goes to the devices (e.g. text
      tokenisation), or None.
    strategies: the step strategies the loss supports (a loss that needs the whole global batch,
      like a contrastive one, is "jit" only).
    batches: the stage's own input stream instead of `input_pipeline.pipelines.from_config(
      config.data, ...)`, called with the same keywords (batch_size, seed, train, start_step,
      process_index, process_count, split) and held to the same contract (a pure function of
      (seed, step), this host's rows), or None. E.g. image + caption folders read without
      TensorFlow.
  """

  name: str
  build_model: Callable[[], nnx.Module]
  loss_fn: LossFn
  batch_keys: tuple[str, ...]
  optimizer: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  trainable: Any = nnx.Param
  aux: Any = None
  evaluate: EvalFn | None = None
  eval_keys: tuple[str, ...] = ()
  load_params: Callable[..., Any] | None = None
  post_update: Callable[[Any], Any] | None = None
  initial_state: Callable[[], tuple[Any, Any]] | None = None
  prepare: Callable[[dict], dict] | None = None
  strategies: tuple[str, ...] = parallel.STRATEGIES
  batches: Callable[..., Any] | None = None


class NonFiniteLoss(FloatingPointError):
  """A step produced a non-finite loss; the run stopped before saving it."""


# ---- Optimizers ---------------------------------------------------------------------------------

def make_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup over `o.warmup_steps` (0: none), then cosine from `o.lr` to `o.end_lr` at the
  last step (the reference's TrueCosineAnnealingLR when there is no warmup)."""
  warmup = int(o.warmup_steps)
  decay_steps = max(1, total_steps - warmup)
  cosine = optax.cosine_decay_schedule(o.lr, decay_steps=decay_steps,
                                       alpha=o.end_lr / o.lr if o.lr else 0.0)
  if warmup <= 0:
    return cosine
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, warmup), cosine], boundaries=[warmup])


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int, *,
                   decay_mask: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (b1, b2, eps, weight_decay from `o`) with `make_schedule`, global-norm clipping if
  `o.grad_clip` > 0; `decay_mask` (a pytree of bools or a callable) limits weight decay."""
  schedule = make_schedule(o, total_steps)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   mask=decay_mask)
  if o.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule


# ---- The step ------------------------------------------------------------------------------------

def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  """EMA with warm-up (TF's ExponentialMovingAverage with num_updates): early on the average
  follows the weights instead of staying anchored at the random init."""
  step_f = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + step_f) / (10.0 + step_f))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_train_step(graphdef: Any, stage: Stage, ema_decay: float) -> Callable[..., Any]:
  """(state, batch, aux, key, axis_name) -> (state, metrics); the strategy compiles it."""

  def step(state, batch, aux, key, axis_name):
    key = jax.random.fold_in(key, state["step"])

    def loss_of(params):
      return stage.loss_fn(nnx.merge(graphdef, params, state["rest"]), batch, key, aux)

    (loss, extra), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    # pmap: each device saw its rows; the mean of equal-size means is the global mean.
    loss, extra, grads = parallel.pmean_if((loss, extra, grads), axis_name)
    updates, opt = stage.optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if stage.post_update is not None:
      params = stage.post_update(params)
    ema = ema_update(state["ema"], params, state["step"], ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": stage.schedule(state["step"]), **extra}
    return dict(state, params=params, opt=opt, ema=ema, step=state["step"] + 1), metrics

  return step


def step_key(seed: int) -> jax.Array:
  """The run's base key. Threefry whatever the process default: its bits do not depend on how a
  computation is partitioned, which the sharded = single-device guarantee relies on."""
  return jax.random.key(seed, impl="threefry2x32")


def init_state_fn(stage: Stage) -> tuple[Any, Callable[[], dict]]:
  """(graphdef, init) where init() -> the fresh train state (traced under jit)."""
  graphdef, _, _ = nnx.split(nnx.eval_shape(stage.build_model), stage.trainable, ...)

  def init():
    _, params, rest = nnx.split(stage.build_model(), stage.trainable, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
            "opt": stage.optimizer.init(params), "ema": jax.tree.map(jnp.copy, params)}

  return graphdef, init


def check_same_structure(loaded: Any, expected: Any, what: str) -> None:
  """Raises ValueError naming the first key whose presence or shape differs."""
  flat = lambda t: {jax.tree_util.keystr(p): tuple(x.shape)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(loaded), flat(expected)
  for k in sorted(set(a) | set(b)):
    if k not in a:
      raise ValueError(f"{what}: parameter {k} (shape {b[k]}) is missing from the file")
    if k not in b:
      raise ValueError(f"{what}: the file has parameter {k} (shape {a[k]}) that the configured "
                       "model does not")
    if a[k] != b[k]:
      raise ValueError(f"{what}: parameter {k} has shape {a[k]} in the file but {b[k]} in the "
                       "configured model")


# ---- Progress ------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps/s, ETA and the share of time spent waiting for data, printed for people."""

  def __init__(self, name: str, first_step: int, total_steps: int, quiet: bool):
    self.name, self.total, self.quiet = name, total_steps, quiet
    self.start_step, self.t_start = first_step - 1, time.perf_counter()
    self.window_step, self.window_t, self.window_data = self.start_step, self.t_start, 0.0

  def add_data_wait(self, seconds: float) -> None:
    self.window_data += seconds

  def report(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
    """Prints one line; returns the rates to write as summaries."""
    now = time.perf_counter()
    dt = max(now - self.window_t, 1e-9)
    rate = (step - self.window_step) / dt
    out = {"steps_per_sec": rate, "data_wait_share": min(1.0, self.window_data / dt)}
    self.window_step, self.window_t, self.window_data = step, now, 0.0
    if not self.quiet:
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      extra = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                        if k not in ("loss", "learning_rate", "grad_norm"))
      print(f"[{self.name}] step {step}/{self.total}  loss {scalars['loss']:.5f}  "
            f"lr {scalars['learning_rate']:.2e}  {rate:.2f} steps/s  "
            f"data {100 * out['data_wait_share']:.0f}%  ETA {_duration(eta)}"
            + (f"  {extra}" if extra else ""), flush=True)
    return out


class _StopFlag:
  """SIGTERM (and SIGINT) -> finish the current step, save, exit cleanly."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-process) array -> the whole value as numpy on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def resolve_total_steps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """total_steps = -1: ceil(num_epochs x training items / batch_size)."""
  from input_pipeline import readers

  if config.num_epochs <= 0:
    raise ValueError("total_steps <= 0 needs num_epochs > 0 (steps = epochs x items / batch)")
  items = readers.source_from_config(config.data, train=True).num_items
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's stays as given
  config.total_steps = -(-config.num_epochs * items // config.batch_size)
  logging.info("total_steps = %d (%d epochs of %d items)", config.total_steps, config.num_epochs,
               items)
  return config


def config_changes(saved: dict, config: ml_collections.ConfigDict, limit: int = 8) -> list[str]:
  """The fields where `config` differs from `saved` (a workdir's config.json), as "a.b: old -> new"
  (at most `limit` of them, then "... and N more"); both sides compared through JSON."""
  from uir_jax.convert.common import flat_params

  old, new = flat_params(saved), flat_params(json.loads(config.to_json_best_effort()))
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  changes = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in sorted(set(old) | set(new))
             if k not in old or k not in new or old[k] != new[k]]
  if len(changes) > limit:
    changes = changes[:limit] + [f"... and {len(changes) - limit} more"]
  return changes


def _saved_config(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image

  Image.fromarray(image).save(path)


# ---- The run -------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str,
          make_stage: Callable[[ml_collections.ConfigDict], Stage]) -> dict[str, Any]:
  """Trains the stage `make_stage(config)` per `config`, writing everything under `workdir`.

  Returns {"step": last step, "preempted": bool, **final eval metrics}. Raises NonFiniteLoss
  (before saving) if a step's loss is not finite.
  """
  parallel.initialize_distributed(config.distributed)
  if config.total_steps <= 0:
    config = resolve_total_steps(config)
  saved = _saved_config(workdir)
  write_config(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  strategy = config.strategy
  if strategy not in parallel.STRATEGIES:
    raise ValueError(f"strategy must be one of {parallel.STRATEGIES}, got {strategy!r}")
  local_batch = parallel.local_batch_size(config.batch_size, mesh)
  stage = make_stage(config)
  if strategy not in stage.strategies:
    raise ValueError(f"the {stage.name} trainer supports strategy {stage.strategies}, got "
                     f"{strategy!r}")
  quiet = jax.process_index() > 0
  ckpt = Checkpointer(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                      total_steps=config.total_steps)
  first_step = (ckpt.latest_step or 0) + 1
  if ckpt.latest_step is not None and saved is not None and not quiet:
    changes = config_changes(saved, config)
    if changes:  # e.g. a workdir of an older config, or a run extended on purpose
      print(f"[{stage.name}] warning: resuming {workdir} (step {ckpt.latest_step}) with a config "
            f"that differs from the one it was started with: {'; '.join(changes)}", flush=True)
  init_params = None
  if ckpt.latest_step is None and config.init_from:
    try:  # before the pipelines and the state: a wrong or untrusted file is refused at once
      init_params = _load_init_from(config, stage)
    except BaseException:
      ckpt.close()
      raise
  # The input pipelines (tracing the degradation chains, the first batches: seconds) are built in
  # a background thread while the state is created and the step compiled.
  inputs = None if first_step > config.total_steps else _Inputs(config, stage, local_batch,
                                                                first_step)
  try:
    return _train(config, workdir, stage, mesh, quiet, ckpt, first_step, inputs, init_params)
  finally:
    if inputs is not None:
      inputs.close()


class _Inputs:
  """The training iterator (started at `first_step`) and the evaluation batch, opened in a
  background thread; `train_iter()` / `eval_batch()` wait for them (and raise its errors)."""

  def __init__(self, config, stage: Stage, local_batch: int, first_step: int):
    from concurrent.futures import ThreadPoolExecutor

    if stage.batches is not None:
      stream = stage.batches
    else:
      from input_pipeline import pipelines

      stream = functools.partial(pipelines.from_config, config.data)

    def open_train():
      it = iter(stream(
          batch_size=local_batch, seed=config.seed, train=True,
          start_step=first_step - 1, process_index=jax.process_index(),
          process_count=jax.process_count()))
      return it, next(it)

    def open_eval():
      # One pass over the held-out split (centre crops), or with `eval_augment` a batch drawn
      # like the training ones (random crops and degradations) from it: small held-out sets.
      batches = stream(
          batch_size=config.eval_batch // jax.process_count(), seed=config.seed + 1,
          train=bool(config.data.eval_augment), split="eval", process_index=jax.process_index(),
          process_count=jax.process_count())
      return next(iter(batches))

    self._pool = ThreadPoolExecutor(1, thread_name_prefix="uir_jax-inputs")
    self._train = self._pool.submit(open_train)
    self._eval = self._pool.submit(open_eval) if stage.evaluate is not None else None

  def train_iter(self):
    import itertools

    it, first = self._train.result()
    return itertools.chain([first], it)

  def eval_batch(self):
    return self._eval.result() if self._eval is not None else None

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)


def _load_init_from(config: ml_collections.ConfigDict, stage: Stage) -> Any:
  """`config.init_from`'s trainable parameters; any failure is one `CheckpointError` line naming
  the file (a PyTorch file is read as data only unless `config.trust_checkpoint`)."""
  from uir_jax.convert.common import checkpoint_errors

  if stage.load_params is None:
    raise ValueError(f"init_from is set, but the {stage.name} stage cannot load parameters")
  with checkpoint_errors(config.init_from, "init_from"):
    return stage.load_params(config.init_from, trust=bool(config.get("trust_checkpoint", False)))


def _train(config, workdir, stage, mesh, quiet, ckpt, first_step, inputs, init_params=None):
  # Imported here: clu's writers and the tf.data pipeline need TensorFlow; the library does not.
  from clu import metric_writers

  strategy = config.strategy
  # ---- State, created sharded; then resume -> init_from -> scratch -------------------------------
  graphdef, init = init_state_fn(stage)
  state, shardings = parallel.create_sharded_state(init, mesh, min_size=config.fsdp_min_size)
  num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info("%s: %.3fM trainable parameters; state %s", stage.name, num_params / 1e6,
               parallel.describe_sharding(state))
  if ckpt.latest_step is not None:
    state = ckpt.restore(abstract_like(state))
    if int(state["step"]) != first_step - 1:
      raise RuntimeError(f"{ckpt.directory}: checkpoint {first_step - 1} holds step "
                         f"{int(state['step'])}")
    origin = f"resumed from step {int(state['step'])} ({ckpt.directory})"
  elif config.init_from:
    from uir_jax.convert.common import CheckpointError

    try:
      check_same_structure(init_params, state["params"], f"init_from {config.init_from}")
    except ValueError as e:  # a file of another architecture: a refusal, not a crash
      raise CheckpointError(str(e)) from e
    params = parallel.place(jax.device_get(init_params), shardings["params"])
    state = dict(state, params=params, ema=jax.tree.map(jnp.copy, params))
    origin = f"parameters from {config.init_from}"
  elif stage.initial_state is not None:
    params, rest = stage.initial_state()
    check_same_structure(params, state["params"], f"{stage.name} initial parameters")
    # Through host copies: a pretrained model may share one array between several variables
    # (DA-CLIP's controller starts as a copy of the CLIP tower), and a donated step must not
    # receive the same buffer twice.
    params = parallel.place(jax.device_get(params), shardings["params"])
    rest = parallel.place(jax.device_get(rest), shardings["rest"])
    state = dict(state, params=params, rest=rest, ema=jax.tree.map(jnp.copy, params))
    origin = "pretrained initial state"
  else:
    origin = f"fresh init (seed {config.seed})"
  if not quiet:
    print(f"[{stage.name}] {num_params / 1e6:.2f}M parameters, {origin}; mesh "
          f"{dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s), "
          f"{jax.process_count()} process(es), strategy {strategy}", flush=True)
  if first_step > config.total_steps:  # a finished run: nothing to train, evaluate or save
    ckpt.close()
    return {"step": first_step - 1, "preempted": False}

  aux_shardings = (parallel.shardings_for(stage.aux, mesh, config.fsdp_min_size)
                   if stage.aux is not None else None)
  aux = parallel.place(stage.aux, aux_shardings) if stage.aux is not None else None
  step_fn = parallel.make_step(make_train_step(graphdef, stage, config.ema_decay), strategy, mesh,
                               shardings, aux_shardings)
  if strategy == "pmap":
    to_device = lambda b: parallel.split_local_batch(b)
    run_state, run_aux = parallel.replicate_local(state), parallel.replicate_local(aux)
    host_state = parallel.unreplicate_local
  else:
    to_device = lambda b: parallel.host_to_global(b, mesh)
    run_state, run_aux = state, aux
    host_state = lambda s: s
  del state
  key = step_key(config.seed)

  def select(batch, keys):
    if stage.prepare is not None:
      batch = stage.prepare(batch)
    # ("mask" only exists in a finite evaluation pass: every row of an augmented batch is real.)
    out = {k: batch[k] for k in keys if k in batch or k != "mask"}
    if "index" in out:  # global example indices (int64 on the host) as int32 for fold_in
      out["index"] = (np.asarray(out["index"]) % (2**31 - 1)).astype(np.int32)
    return out

  # ---- Evaluation --------------------------------------------------------------------------------
  eval_batch = None  # (selected on first use)

  writer = metric_writers.create_default_writer(workdir, just_logging=quiet,
                                                asynchronous=False)
  writer.write_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str))})

  def evaluate(state, step):
    nonlocal eval_batch
    if eval_batch is None:
      eval_batch = select(inputs.eval_batch(), stage.eval_keys)
    if strategy == "pmap":
      batch = {k: jnp.asarray(v) for k, v in eval_batch.items()}
      ev_aux = parallel.unreplicate_local(run_aux) if run_aux is not None else None
    else:
      batch, ev_aux = parallel.host_to_global(eval_batch, mesh), aux
    scalars, images = stage.evaluate(graphdef, state["ema"], state["rest"], ev_aux, batch)
    writer.write_scalars(step, scalars)
    if images:
      writer.write_images(step, {k: v[None] for k, v in images.items()})
      if not quiet:
        for name, image in images.items():
          save_png(os.path.join(workdir, f"{name.replace('/', '_')}_{step:07d}.png"), image)
    if not quiet:
      print(f"[{stage.name}] eval at step {step}: "
            + "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in scalars.items()),
            flush=True)
    return scalars

  # ---- Loop --------------------------------------------------------------------------------------
  train_iter = inputs.train_iter()
  progress = Progress(stage.name, first_step, config.total_steps, quiet)
  result: dict[str, Any] = {"step": first_step - 1, "preempted": False}
  pending = None  # (step, metrics) not yet checked for finiteness

  def checked(step, metrics) -> dict[str, float]:
    scalars = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(scalars["loss"]):
      raise NonFiniteLoss(
          f"non-finite loss ({scalars['loss']}) at step {step}: stopping before it is saved; "
          f"the newest checkpoint ({ckpt.latest_step}) is the last finite state")
    return scalars

  with _StopFlag() as stop, metric_writers.ensure_flushes(writer):
    try:
      for step in range(first_step, config.total_steps + 1):
        t0 = time.perf_counter()
        batch = to_device(select(next(train_iter), stage.batch_keys))
        progress.add_data_wait(time.perf_counter() - t0)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          run_state, metrics = step_fn(run_state, batch, run_aux, key)
        # Every step's loss is checked: the previous step's while this one runs (no stall of the
        # asynchronous dispatch), this one's at once wherever its state could be saved or used.
        if pending is not None:
          checked(*pending)
        pending = (step, metrics)
        last = step == config.total_steps
        log = step % config.log_every == 0 or last
        do_eval = stage.evaluate is not None and (step % config.eval_every == 0 or last)
        stopping = stop.signal is not None or ckpt.reached_preemption(step)
        save = stopping or ckpt.should_save(step)
        if log or do_eval or save:
          scalars, pending = checked(*pending), None
        result["step"] = step
        if log:
          writer.write_scalars(step, {**scalars, **progress.report(step, scalars)})
        if do_eval:
          result.update(evaluate(host_state(run_state), step))
        if save:
          ckpt.maybe_save(step, host_state(run_state), force=stopping)
        if stopping:
          result["preempted"] = True
          if not quiet:
            print(f"[{stage.name}] stop requested at step {step}: checkpoint saved; run the same "
                  "command again to resume", flush=True)
          break
    finally:
      ckpt.close()
  return result


def train_main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`uir-jax train`: the trainer named by `config.trainer`."""
  from uir_jax.train import get_trainer

  return get_trainer(config.trainer)(config, workdir)


def dump_result(result: dict[str, Any], stream=sys.stdout) -> None:
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in result.items()}), file=stream)

"""The training spine's guarantees: every config's :tiny trains, saves and resumes; a run killed
(SIGKILL) or stopped (SIGTERM) and resumed ends bit-equal to an uninterrupted one; a non-finite loss
stops the run before it is saved; the conditioned models learn and their conditioning receives
gradients; `init_from` starts from the file's parameters; two processes equal one."""

import contextlib
import glob
import importlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import irsde_daclip_universal, nafnet_daclip
from uir_jax import parallel
from uir_jax.checkpoint import Checkpointer
from uir_jax.systems.daclip_uir import irsde, nafnet
from uir_jax.train import TRAINERS, get_trainer, loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ["irsde_daclip_universal", "irsde_wild", "irsde", "nafnet_daclip", "nafnet",
           "irsde_quickstart", "daclip_vitb32", "daclip_vitl14_wild"]
# Trained by test_wild_daclip_run_conditions_a_restorer (the DA-CLIP run, then a restorer on it).
CHAINED = ("daclip_vitl14_wild", "irsde_daclip_universal")


def _stage_of(config):
  return importlib.import_module(TRAINERS[config.trainer]).make_stage(config)


def _saved_state(config, workdir, step=None):
  """A checkpoint of `workdir` as numpy (restored onto one device, whatever wrote it)."""
  _, init = loop.init_state_fn(_stage_of(config))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(init))
  ckpt = Checkpointer(workdir, save_every=1)
  try:
    return jax.device_get(ckpt.restore(abstract, step))
  finally:
    ckpt.close()


def _assert_bit_equal(a, b, what):
  for name in ("step", "params", "ema", "opt", "rest"):
    la, lb = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
    assert len(la) == len(lb), f"{what}: {name} structure differs"
    for x, y in zip(la, lb, strict=True):
      assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what}: {name} differs"


def _assert_close(a, b, what):
  """Equal up to the order of floating-point reductions (another all-reduce): parameters within
  1e-6 absolute (three AdamW steps of lr 2e-4 each move them up to ~1e-4), Adam's moments within
  1e-5 of their leaf's scale + 1e-12 (the bounds of tests/train/test_parallel.py)."""
  assert int(a["step"]) == int(b["step"])
  for name in ("params", "ema", "opt", "rest"):
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      if not x.size:
        continue
      tol = 1e-6 if name != "opt" else 1e-5 * float(np.max(np.abs(y))) + 1e-12
      assert float(np.max(np.abs(x - y))) <= tol, f"{what}: {name} {x.shape}"


def _steps(workdir):
  """Committed checkpoint steps (a killed save leaves `<step>.orbax-checkpoint-tmp`)."""
  names = (os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")))
  return sorted(int(n) for n in names if n.isdigit())


# ---- Every config -------------------------------------------------------------------------------

def test_every_config_declares_its_fields_and_rejects_unknown_ones():
  for name in CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config("tiny")
    assert config.trainer in TRAINERS, name
    assert module.__doc__ and "uir-jax train --config configs/" in module.__doc__, name
    full = module.get_config(None)
    assert full.data.keys() == config.data.keys(), name
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")
  full = irsde_daclip_universal.get_config()
  # The paper's universal-ir recipe (spec §8.1).
  assert (full.batch_size, full.data.patch_size, full.total_steps) == (16, 256, 700_000)
  assert (full.optimizer.lr, full.optimizer.b1, full.optimizer.b2) == (2e-4, 0.9, 0.99)
  assert full.optimizer.end_lr == 1e-6 and full.model.context_dim == 512
  assert full.eval.mode == "posterior"


def _trains_saves_resumes(config, workdir):
  """3 steps of `config`: finite final score, config.json, the image PNG, checkpoints 2 and 3;
  the same command again restores step 3 and has nothing left to do."""
  with config.unlocked():
    config.total_steps = 3
  result = get_trainer(config.trainer)(config, workdir)
  assert result["step"] == 3 and not result["preempted"]
  score, image = (("eval/degradation_accuracy", "eval_degradation_confusion")
                  if config.trainer == "daclip" else ("eval/psnr_restored", "eval_lq_restored_gt"))
  assert np.isfinite(result[score])
  assert json.load(open(os.path.join(workdir, "config.json")))["trainer"] == config.trainer
  assert glob.glob(os.path.join(workdir, f"{image}_0000003.png"))
  assert _steps(workdir) == [2, 3]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    again = get_trainer(config.trainer)(config, workdir)
  assert again["step"] == 3 and score not in again
  assert "resumed from step 3" in out.getvalue() and "warning" not in out.getvalue()  # same config
  return result


def test_config_changes_names_every_changed_added_and_removed_field():
  config = irsde_daclip_universal.get_config("tiny")
  saved = json.loads(config.to_json_best_effort())
  assert loop.config_changes(saved, config) == []  # tuples vs JSON lists are not changes
  with config.unlocked():
    config.total_steps += 1
    config.optimizer.lr = 1e-3
    config.extra = "x"
  del saved["seed"]
  changes = loop.config_changes(saved, config)
  assert changes == ["extra: (absent) -> \"x\"",
                     f"optimizer.lr: {saved['optimizer']['lr']} -> 0.001",
                     f"seed: (absent) -> {config.seed}",
                     f"total_steps: {config.total_steps - 1} -> {config.total_steps}"]
  assert loop.config_changes(saved, config, limit=2)[2:] == ["... and 2 more"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in CHAINED])
def test_tiny_config_trains_saves_and_resumes(name, tmp_path, one_device):
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  _trains_saves_resumes(config, str(tmp_path / "wd"))


@pytest.mark.slow
def test_wild_daclip_run_conditions_a_restorer(tmp_path, one_device):
  from uir_jax.convert.clip import load_daclip
  from uir_jax.models.daclip import TRAINABLE

  wild = importlib.import_module("configs.daclip_vitl14_wild").get_config("tiny")
  assert len(wild.eval.words) == 16 and "" in wild.eval.words
  workdir = str(tmp_path / "wild")
  _trains_saves_resumes(wild, workdir)
  # The trained DA-CLIP (its workdir) loads through load_daclip and conditions the IR-SDE stage.
  assert jax.tree.leaves(nnx.state(load_daclip(workdir), TRAINABLE))
  restorer = irsde_daclip_universal.get_config("tiny")
  with restorer.unlocked():
    restorer.daclip.checkpoint = workdir
  _trains_saves_resumes(restorer, str(tmp_path / "restorer"))


# ---- Kill / stop and resume ---------------------------------------------------------------------

def _env(devices=8):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("CI", None)
  return env


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "uir_jax.main", "train",
          "--config", os.path.join(ROOT, "configs", "irsde.py:tiny"), "--workdir", workdir,
          "--config.total_steps=6", "--config.checkpoint_every=2", "--config.eval_every=100",
          *overrides]


def _run_until(cmd, env, marker, sig):
  """Starts `cmd`, sends `sig` once `marker` is printed, returns (exit code, output)."""
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if marker in line:
      proc.send_signal(sig)
      break
  rest, _ = proc.communicate(timeout=300)
  return proc.returncode, "".join(lines) + rest


def _run(cmd, env):
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_bit_equal_to_an_uninterrupted_run(tmp_path):
  env = _env(devices=2)  # a sharded run (data axis 2); more fake devices only cost compile time
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  _run(_train_cmd(straight), env)
  # SIGKILL at a random step between checkpoints (2 and 4, or 4 and 6): nothing gets to clean up.
  kill_at = random.Random().choice([3, 5])
  code, out = _run_until(_train_cmd(broken), env, f"step {kill_at}/6", signal.SIGKILL)
  assert code == -signal.SIGKILL, out[-2000:]
  assert max(_steps(broken), default=0) < 6
  if kill_at == 5:  # resume, then SIGTERM before the end: saves where it stops and exits 143
    _run_until(_train_cmd(broken), env, "resumed from step", signal.SIGTERM)
  else:
    code, out = _run_until(_train_cmd(broken), env, "step 5/6", signal.SIGTERM)
    assert code == 143, out[-2000:]
    assert "stop requested at step" in out
  out = _run(_train_cmd(broken), env)
  assert "resumed from step" in out
  config = importlib.import_module("configs.irsde").get_config("tiny")
  _assert_bit_equal(_saved_state(config, broken, 6), _saved_state(config, straight, 6),
                    f"killed at {kill_at}, stopped, resumed")


# ---- Non-finite loss ----------------------------------------------------------------------------

@pytest.mark.slow  # trains a tiny run twice (~70 CPU-s)
def test_non_finite_loss_stops_before_saving_and_the_run_resumes(tmp_path, one_device):
  config = nafnet_daclip.get_config("tiny")
  with config.unlocked():
    config.checkpoint_every = 1
  workdir = str(tmp_path / "wd")
  bad_step = 3

  def poisoned(config):
    stage = nafnet.make_stage(config)
    clean = stage.loss_fn

    def loss_fn(model, batch, key, aux):
      loss, extra = clean(model, batch, key, aux)
      # Step s holds global examples [(s - 1) B, s B): poison step `bad_step` only.
      first = jnp.min(batch["index"])
      return jnp.where(first == (bad_step - 1) * config.batch_size, jnp.nan, loss), extra

    stage.loss_fn = loss_fn
    return stage

  with pytest.raises(loop.NonFiniteLoss, match=f"at step {bad_step}"):
    loop.train(config, workdir, poisoned)
  assert _steps(workdir) == [1, 2]  # the newest checkpoint is the last finite state
  last = _saved_state(config, workdir)
  assert int(last["step"]) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(last["params"]))
  result = nafnet.train_and_evaluate(config, workdir)  # the same run, resumed, goes on
  assert result["step"] == config.total_steps and np.isfinite(result["eval/psnr_restored"])


# ---- Learning and conditioning ----------------------------------------------------------------

def _fixed_batch(n=8, size=32):
  r = np.random.default_rng(1)
  gt = r.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
  lq = np.clip(gt + r.normal(0, 0.15, gt.shape), 0, 1).astype(np.float32)
  return {"lq": lq, "gt": gt, "index": np.arange(n, dtype=np.int32),
          "clip_lq": r.normal(0, 1, (n, 32, 32, 3)).astype(np.float32)}


def _path_grad_norms(grads):
  out = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    out[jax.tree_util.keystr(path)] = float(jnp.linalg.norm(jnp.ravel(g)))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("module,config_module,factor,conditioning",
                         [(irsde, irsde_daclip_universal, 2.5, ("attn2", "prompt")),
                          (nafnet, nafnet_daclip, 1.8, ("att", "prompt"))],
                         ids=["irsde_daclip", "nafnet_daclip"])
def test_conditioned_model_overfits_a_batch_and_its_conditioning_gets_gradients(
    module, config_module, factor, conditioning):
  config = config_module.get_config("tiny")
  with config.unlocked():
    # Measured on this seed: IR-SDE loss / 3.0 in 140 steps (/ 2.4 at 100, / 3.2 at 200), NAFNet
    # MSE 0.0369 -> 0.0169 (60 steps); the factors asserted leave room for another machine's
    # rounding.
    config.optimizer.lr = 2e-3 if module is nafnet else 3e-3
    config.total_steps = 60 if module is nafnet else 140
  stage = module.make_stage(config)
  graphdef, init = loop.init_state_fn(stage)
  step = jax.jit(lambda s, b, a, k: loop.make_train_step(graphdef, stage, 0.9)(s, b, a, k, None))
  state, batch, key = jax.jit(init)(), _fixed_batch(), loop.step_key(0)
  # The loss at one fixed draw of (t, noise) before and after: the IR-SDE loss of a step is drawn
  # at a random t per example, too noisy to compare step by step.
  fixed = jax.jit(lambda s: stage.loss_fn(nnx.merge(graphdef, s["params"], s["rest"]), batch,
                                          loop.step_key(99), stage.aux)[0])
  first = float(fixed(state))
  for _ in range(config.total_steps):
    state, metrics = step(state, batch, stage.aux, key)
  last = float(fixed(state))
  # The PSNR loss is negative (-PSNR): compare the MSE it stands for (10^(loss/10)).
  if config.loss == "psnr":
    first, last = 10 ** (first / 10), 10 ** (last / 10)
  print(f"{config.trainer}: fixed-draw loss {first:.5f} -> {last:.5f}")
  assert last * factor < first, (first, last)
  grads = jax.grad(lambda p: stage.loss_fn(nnx.merge(graphdef, p, state["rest"]), batch, key,
                                           stage.aux)[0])(state["params"])
  norms = _path_grad_norms(grads)
  for part in conditioning:
    hits = [v for k, v in norms.items() if f"'{part}'" in k]
    assert hits and max(hits) > 0, (part, sorted(norms)[:20])


@pytest.mark.slow  # trains a tiny run (~50 CPU-s)
@pytest.mark.torch
def test_init_from_starts_from_the_files_parameters(tmp_path, one_device):
  import torch

  from uir_jax.convert.nafnet import load_nafnet

  torch_nafnet = pytest.importorskip("torch_nafnet")

  config = importlib.import_module("configs.nafnet").get_config("tiny")
  m = config.model
  torch.manual_seed(0)
  net = torch_nafnet.TorchNAFNet(img_channel=3, width=m.width, middle_blk_num=m.middle_blk_num,
                    enc_blk_nums=list(m.enc_blk_nums), dec_blk_nums=list(m.dec_blk_nums))
  path = str(tmp_path / "nafnet.pth")
  torch.save(net.state_dict(), path)
  with config.unlocked():
    config.init_from = path
    config.total_steps = 1
    config.optimizer.lr = 0.0
    config.optimizer.end_lr = 0.0
  workdir = str(tmp_path / "wd")
  nafnet.train_and_evaluate(config, workdir)
  saved = _saved_state(config, workdir)
  want = jax.tree.leaves(nnx.state(load_nafnet(path), nnx.Param))
  got = jax.tree.leaves(saved["params"])
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):  # lr 0: step 1 keeps the loaded weights exactly
    np.testing.assert_array_equal(a, np.asarray(b))
  with config.unlocked():  # a file of another architecture is refused with the key named
    config.model.width = 16
  with pytest.raises(ValueError, match="init_from .*shape"):
    nafnet.train_and_evaluate(config, str(tmp_path / "wd2"))


# ---- Multi-host ------------------------------------------------------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_as_many_devices(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  common = ["--config.total_steps=3", "--config.checkpoint_every=3"]
  port = _free_port()
  procs = [subprocess.Popen(
      _train_cmd(two, *common, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      env=_env(devices=2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  _run(_train_cmd(one, *common), _env(devices=4))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert "2 process(es)" in outs[0] and "over 4 cpu device(s)" in outs[0]
  config = importlib.import_module("configs.irsde").get_config("tiny")
  # Same program over the same 4 devices; only the cross-process all-reduce (gloo) sums in
  # another order than the in-process one, so equal up to rounding, not bit for bit.
  _assert_close(_saved_state(config, two, 3), _saved_state(config, one, 3), "2 x 2 vs 1 x 4")


def test_parallel_batch_helpers_reject_bad_sizes():
  mesh = parallel.make_mesh((-1, 1))
  with pytest.raises(ValueError, match="divisible"):
    parallel.local_batch_size(6, mesh)
  with pytest.raises(ValueError, match="divisible"):
    parallel.split_local_batch({"x": np.zeros((6, 2))})


# ---- DA-CLIP views ----------------------------------------------------------------------------

def test_window_views_tile_the_lq_like_the_pipelines_crop_view_and_are_averaged():
  import ml_collections
  import tensorflow as tf

  from input_pipeline.pipelines import clip_crop
  from uir_jax.systems.daclip_uir import conditioning as common

  rng = np.random.default_rng(0)
  lq = rng.uniform(0, 1, (2, 96, 80, 3)).astype(np.float32)
  views = np.asarray(common.window_views(jnp.asarray(lq), 32))
  assert views.shape == (2, 9, 32, 32, 3)  # offsets (0, 32, 64) x (0, 24, 48)
  # The centre window is the pipeline's clip_view="crop" (8-bit rounded, OpenAI-normalised).
  centre = np.stack([clip_crop(tf.constant(x), 32).numpy() for x in lq])
  np.testing.assert_allclose(views[:, 4], centre, atol=1e-6)
  # The last window is the bottom-right corner, the second the top row's middle.
  np.testing.assert_allclose(views[:, 8], np.stack([clip_crop(tf.constant(x[64:, 48:]), 32)
                                                    .numpy() for x in lq]), atol=1e-6)
  np.testing.assert_allclose(views[:, 1], np.stack([clip_crop(tf.constant(x[:32, 24:56]), 32)
                                                    .numpy() for x in lq]), atol=1e-6)
  assert common.window_views(jnp.asarray(lq[:, :48, :32]), 32).shape == (2, 2, 32, 32, 3)
  with pytest.raises(ValueError, match="at least the CLIP's 32 pixels"):
    common.window_views(jnp.asarray(lq[:, :31]), 32)
  # The embeddings are the per-image means over that image's windows.
  graphdef, state = common.load_frozen_daclip(
      ml_collections.ConfigDict(dict(checkpoint="random:tiny-p4")), seed=0)
  model = nnx.merge(graphdef, state)
  content, degra = common.daclip_embed(model, None, jnp.asarray(lq), windows=True)
  for b in range(2):
    c, d = model.encode_image(jnp.asarray(views[b]), control=True)
    np.testing.assert_allclose(np.asarray(content[b]), np.asarray(c).mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(degra[b]), np.asarray(d).mean(0), atol=1e-5)
  assert not np.allclose(np.asarray(degra[0]), np.asarray(degra[1]), atol=1e-3)


@pytest.mark.slow  # two stages with DA-CLIP built and differentiated per case (~25 CPU-s)
@pytest.mark.parametrize("config_module", [nafnet_daclip, irsde_daclip_universal],
                         ids=["nafnet", "irsde"])
def test_daclip_windows_condition_the_restorer_on_the_lq_not_the_pipeline_view(config_module):
  """With daclip.windows the stages' DA-CLIP reads the LQ's windows: the loss no longer depends
  on the pipeline's CLIP view (and without it, it does)."""
  batch = _fixed_batch()
  other = dict(batch, clip_lq=batch["clip_lq"][::-1].copy())
  losses = {}
  for windows in (False, True):
    config = config_module.get_config("tiny")
    with config.unlocked():
      config.daclip.windows = windows
    stage = (nafnet if config.trainer == "nafnet" else irsde).make_stage(config)
    graphdef, init = loop.init_state_fn(stage)
    state = jax.jit(init)()
    # Non-zero everywhere (the zero-initialised conditioning paths would ignore any context).
    leaves, tree = jax.tree.flatten(state["params"])
    noisy = [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
             for i, x in enumerate(leaves)]
    state = dict(state, params=jax.tree.unflatten(tree, noisy))
    loss = jax.jit(lambda s, b: stage.loss_fn(nnx.merge(graphdef, s["params"], s["rest"]), b,
                                              loop.step_key(3), stage.aux)[0])
    losses[windows] = (float(loss(state, batch)), float(loss(state, other)))
  assert losses[True][0] == losses[True][1]
  assert losses[False][0] != losses[False][1]

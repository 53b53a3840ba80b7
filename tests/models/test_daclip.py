"""DA-CLIP: parity with a PyTorch DA-CLIP assembled here from open_clip modules per spec §1.4-1.6,
released-checkpoint loading (§9.1), controller init, trainable filter, zero-shot classification."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uir_jax.convert.clip import load_clip, load_daclip
from uir_jax.convert.common import ConversionError, flat_params
from uir_jax.models.clip import get_config
from uir_jax.models.daclip import TRAINABLE, DaCLIP, trainable_state
from uir_jax.systems.daclip_uir.zero_shot import DEGRADATION_WORDS, classify_degradation

TOL = 1e-4
VOCAB = 1000
LAYERS = 3


# ----------------------------------------------------------------------------------------------
# PyTorch reference, written from the spec (not copied from the DA-CLIP repository).
# ----------------------------------------------------------------------------------------------


def _torch_modules():
  import torch
  from torch import nn

  class ControlTransformer(nn.Module):
    """Wraps the copied blocks; one Linear(W, W, bias) per block applied to the block output."""

    def __init__(self, transformer, zero_init):
      super().__init__()
      self.transformer = transformer
      w = transformer.width
      self.zero_modules = nn.ModuleList([nn.Linear(w, w, 1) for _ in transformer.resblocks])
      if zero_init:
        for z in self.zero_modules:
          nn.init.zeros_(z.weight)
          nn.init.zeros_(z.bias)

    def forward(self, x):
      hiddens = []
      for block, zero in zip(self.transformer.resblocks, self.zero_modules, strict=True):
        x = block(x)
        hiddens.append(zero(x))  # the controller stream itself is not modified
      return x, hiddens

  class TorchDaCLIP(nn.Module):
    def __init__(self, clip, zero_init=False):
      super().__init__()
      self.clip = clip
      self.visual = clip.visual  # alias: its keys appear twice in the state_dict
      self.visual_control = copy.deepcopy(clip.visual)
      self.visual_control.transformer = ControlTransformer(self.visual_control.transformer,
                                                           zero_init)
      self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())

    @staticmethod
    def _vision(visual, images, blocks):
      x = visual._embeds(images)  # conv1, CLS, positional embedding, ln_pre; NLD (batch_first)
      assert visual.transformer.__class__.__name__ == "ControlTransformer" or \
          visual.transformer.batch_first
      x, extra = blocks(x)
      return visual.ln_post(x[:, 0]) @ visual.proj, extra

    def encode_image(self, images, order="reversed"):
      degra, hiddens = self._vision(self.visual_control, images, self.visual_control.transformer)

      def frozen(x):
        control = list(hiddens)
        for block in self.clip.visual.transformer.resblocks:
          x = block(x)
          # The reference does `x += control.pop()`: last controller output to the first block.
          x = x + (control.pop() if order == "reversed" else control.pop(0))
        return x, None

      content, _ = self._vision(self.clip.visual, images, frozen)
      return content, degra

    def initial_controller(self):
      """Spec §1.6: positional zip of the two parameter lists (loop A), then the blocks (loop B)."""
      with torch.no_grad():
        for (n1, p1), (_, p2) in zip(self.clip.visual.named_parameters(),
                                     self.visual_control.named_parameters(), strict=False):
          if "transformer" not in n1:
            p2.copy_(p1)  # broadcasts [W] into a [W, W] zero-module weight
        for p1, p2 in zip(self.clip.visual.transformer.parameters(),
                          self.visual_control.transformer.parameters(), strict=False):
          p2.copy_(p1)
        self.logit_scale.copy_(self.clip.logit_scale)

  return TorchDaCLIP


def _small_openclip(seed):
  import open_clip
  import torch
  from open_clip.model import CLIPTextCfg, CLIPVisionCfg

  torch.manual_seed(seed)
  return open_clip.CLIP(
      64, CLIPVisionCfg(layers=LAYERS, width=128, patch_size=8, image_size=32),
      CLIPTextCfg(context_length=77, vocab_size=VOCAB, width=128, heads=2, layers=2)).eval()


def _perturb_(module, seed):
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 and "ln" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _ids(rng, batch):
  ids = np.zeros((batch, 77), np.int64)
  for b in range(batch):
    n = int(rng.integers(1, 20))
    ids[b, :n] = rng.integers(1, VOCAB - 1, n)
    ids[b, n] = VOCAB - 1
  return ids


def _ours(model, images_nchw, ids):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, images, ids):
    m = nnx.merge(graphdef, state)
    content, degra = m.encode_image(images, control=True)
    return content, degra, m.encode_image(images, control=False), m.encode_text(ids)

  out = fn(state, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), jnp.asarray(ids, jnp.int32))
  return [np.asarray(o) for o in out]


@pytest.fixture(scope="module")
def reference():
  """A trained-looking torch DA-CLIP (random non-zero zero-modules) and its outputs."""
  import torch

  rng = np.random.default_rng(0)
  model = _torch_modules()(_small_openclip(0))
  _perturb_(model, 1)  # also perturbs the controller (aliases share tensors: clip.visual == visual)
  images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  ids = _ids(rng, 2)
  with torch.no_grad():
    x = torch.from_numpy(images)
    content, degra = model.encode_image(x)
    content_fwd, _ = model.encode_image(x, order="forward")
    plain = model.clip.encode_image(x)
    # Our hand-written vision forward must agree with open_clip's own when there is no control.
    plain2, _ = model._vision(model.clip.visual, x, lambda t: (model.clip.visual.transformer(t), 0))
    np.testing.assert_allclose(plain2.numpy(), plain.numpy(), atol=1e-5)
    text = model.clip.encode_text(torch.from_numpy(ids))
  outs = {k: v.numpy() for k, v in dict(content=content, degra=degra, content_fwd=content_fwd,
                                         plain=plain, text=text).items()}
  return model, images, ids, outs


@pytest.mark.torch
def test_daclip_parity_reversed_injection(reference):
  model, images, ids, want = reference
  ours = load_daclip(model.state_dict())
  content, degra, plain, text = _ours(ours, images, ids)
  errs = {k: np.abs(a - want[k]).max()
          for k, a in dict(content=content, degra=degra, plain=plain, text=text).items()}
  print("DA-CLIP max |err|:", {k: f"{v:.2e}" for k, v in errs.items()})
  assert max(errs.values()) <= TOL
  # The controller really acts, and the injection order matters: forward order is far off.
  assert np.abs(content - plain).max() > 0.05
  wrong = np.abs(content - want["content_fwd"]).max()
  print(f"reversed vs forward-order injection: max |diff| {wrong:.3f}")
  assert wrong > 0.05


def _checkpoint(state_dict, module_prefix):
  import torch

  sd = {("module." if module_prefix else "") + k: v for k, v in state_dict.items()}
  return {
      "epoch": 50, "name": "daclip_ViT-B-32_b768x4_lr3e-5_e50",
      "state_dict": sd,
      # Numpy scalars in the optimizer state, as in the released files (rejects weights_only=True).
      "optimizer": {"state": {0: {"step": torch.tensor(10.0)}},
                    "param_groups": [{"lr": np.float64(np.cos(0.3) * 3e-5), "betas": (0.9, 0.98),
                                      "eps": 1e-6, "weight_decay": 0.05, "params": [0]}]},
      "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
  }


@pytest.mark.torch
@pytest.mark.parametrize("module_prefix", [False, True])
def test_released_checkpoint_layout(reference, tmp_path, module_prefix):
  import torch

  model, images, ids, want = reference
  sd = model.state_dict()
  assert any(k.startswith("visual.") for k in sd)  # the alias keys are in the file
  path = tmp_path / "daclip.pt"
  torch.save(_checkpoint(sd, module_prefix), path)
  with pytest.raises(Exception):  # noqa: B017 - the numpy globals make weights_only loading fail
    torch.load(path, weights_only=True)
  ours = load_daclip(str(path))
  content, degra, _, text = _ours(ours, images, ids)
  assert np.abs(content - want["content"]).max() <= TOL
  assert np.abs(degra - want["degra"]).max() <= TOL
  assert np.abs(text - want["text"]).max() <= TOL
  np.testing.assert_allclose(float(ours.logit_scale[...]), float(model.logit_scale.detach()),
                             rtol=1e-6)


@pytest.mark.torch
def test_checkpoint_errors_name_the_key(reference):
  model, *_ = reference
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = dict(sd)
  del missing["visual_control.transformer.zero_modules.1.bias"]
  with pytest.raises(ConversionError, match=r"visual_control\.transformer\.zero_modules\.1\.bias"):
    load_daclip(missing)
  missing = dict(sd)
  del missing["clip.ln_final.weight"]
  with pytest.raises(ConversionError, match=r"clip\.ln_final\.weight"):
    load_daclip(missing)
  bad = dict(sd)
  key = "visual_control.transformer.transformer.resblocks.2.mlp.c_fc.bias"
  bad[key] = np.zeros((3,), np.float32)
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    load_daclip(bad)
  # A DDP prefix only counts when the FIRST key has it (open_clip's rule): here it does not.
  mixed = {"logit_scale": sd["logit_scale"], **{"module." + k: v for k, v in sd.items()
                                                if k != "logit_scale"}}
  with pytest.raises(ConversionError, match=r"clip\.visual\.conv1\.weight"):
    load_daclip(mixed)


@pytest.mark.torch
@pytest.mark.parametrize("quirk", [True, False])
def test_from_clip_matches_reference_initial_controller(quirk):
  import torch

  rng = np.random.default_rng(3)
  # As in the reference: DaCLIP is built (deep copy, zero modules) BEFORE pretrained weights load.
  ref = _torch_modules()(_small_openclip(5), zero_init=True)
  _perturb_(ref.clip, 6)  # "load pretrained" into the CLIP only
  clip = load_clip(ref.clip.state_dict())
  ours = DaCLIP.from_clip(clip, reference_init_quirk=quirk)
  images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  ids = _ids(rng, 2)
  content, degra, plain, _ = _ours(ours, images, ids)
  if quirk:
    ref.initial_controller()
    with torch.no_grad():
      want_content, want_degra = (t.numpy() for t in ref.encode_image(torch.from_numpy(images)))
    kernel = np.asarray(ours.visual_control.transformer.zero_modules[0].kernel[...])
    g = ref.clip.visual.ln_post.weight.detach().numpy()
    np.testing.assert_array_equal(kernel, np.broadcast_to(g[:, None], kernel.shape))
    assert np.abs(content - want_content).max() <= TOL
    assert np.abs(degra - want_degra).max() <= TOL
    assert np.abs(content - plain).max() > 1e-3  # not a no-op at step 0 (spec §1.6)
  else:
    # Intended init: the controller is an exact no-op and a copy of the CLIP vision tower.
    np.testing.assert_allclose(content, plain, atol=1e-6)
    np.testing.assert_allclose(degra, plain, atol=1e-5)


def test_trainable_filter_and_optimizer_step():
  model = DaCLIP(get_config("tiny"), rngs=nnx.Rngs(0))
  trainable = flat_params(trainable_state(model))
  all_params = flat_params(nnx.state(model, nnx.Param))
  assert "logit_scale" in trainable and "clip.logit_scale" not in trainable
  assert not any(k.startswith("clip.") for k in trainable)
  assert set(trainable) == {k for k in all_params
                            if k.startswith("visual_control.") or k == "logit_scale"}
  before = {k: np.asarray(v) for k, v in all_params.items()}
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=TRAINABLE)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(np.eye(2, 77, k=3, dtype=np.int32) * 49407)

  def loss_fn(m):
    out = m(images, ids, ids)
    return -jnp.sum(out["image_features"] * out["text_features"]) - out["logit_scale"] - jnp.sum(
        out["image_degra_features"] * out["text_degra_features"])

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE))(model)
  opt.update(model, grads)
  after = flat_params(nnx.state(model, nnx.Param))
  changed = {k for k in after if not np.array_equal(np.asarray(after[k]), before[k])}
  assert "logit_scale" in changed and not any(k.startswith("clip.") for k in changed)
  assert any(k.startswith("visual_control.transformer.zero_modules") for k in changed)


def test_zero_shot_probabilities_and_crafted_argmax():
  model = DaCLIP(get_config("tiny"), rngs=nnx.Rngs(0))
  # Non-zero zero-modules: the degradation path is exercised like a trained model's.
  for z in model.visual_control.transformer.zero_modules:
    z.kernel[...] = 0.05 * jax.random.normal(jax.random.key(1), z.kernel.shape)
  images = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
  probs = np.asarray(classify_degradation(model, images))  # default tokenizer
  assert probs.shape == (3, len(DEGRADATION_WORDS))
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  from uir_jax.tokenizer import tokenize

  ids = tokenize(list(DEGRADATION_WORDS))
  np.testing.assert_allclose(np.asarray(classify_degradation(model, images, ids)), probs, atol=1e-6)
  text = np.asarray(model.encode_text(jnp.asarray(ids)))
  # Craft the controller head so every image's degradation feature IS the text feature of word k:
  # ln_post outputs the constant e_0 (scale 0, bias e_0) and row 0 of proj is that text feature.
  w = model.config.vision_width
  model.visual_control.ln_post.scale[...] = jnp.zeros((w,))
  model.visual_control.ln_post.bias[...] = jnp.zeros((w,)).at[0].set(1.0)
  for k in (DEGRADATION_WORDS.index("noisy"), DEGRADATION_WORDS.index("hazy")):
    proj = np.zeros((w, model.config.embed_dim), np.float32)
    proj[0] = text[k]
    model.visual_control.proj[...] = jnp.asarray(proj)
    probs = np.asarray(classify_degradation(model, images, ids))
    assert (probs.argmax(-1) == k).all()
  with pytest.raises(ValueError, match="sequence of strings"):
    classify_degradation(model, images, "noisy")


@pytest.mark.torch
def test_safetensors_export_of_a_released_checkpoint(reference, tmp_path):
  import torch
  from safetensors.numpy import load_file

  from uir_jax.convert.to_safetensors import to_safetensors

  model, images, ids, want = reference
  src = tmp_path / "daclip.pt"
  torch.save(_checkpoint(model.state_dict(), True), src)
  dest = str(tmp_path / "daclip.safetensors")
  assert to_safetensors(str(src), dest) == "daclip"
  stored = load_file(dest)
  assert not any(k.startswith("module.") for k in stored)  # unwrapped: no optimizer, no prefix
  ours = load_daclip(dest)
  content, degra, _, text = _ours(ours, images, ids)
  assert np.abs(content - want["content"]).max() <= TOL
  assert np.abs(degra - want["degra"]).max() <= TOL
  assert np.abs(text - want["text"]).max() <= TOL

"""CLIP: shapes, dtype paths, config inference, and parity with open_clip / transformers (fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uir_jax.convert.clip import infer_config, load_clip, openclip_keys
from uir_jax.convert.common import ConversionError
from uir_jax.models.clip import CLIP, CLIPConfig, get_config

TOL = 1e-4


def _ids(rng, batch, vocab, context=77):
  """open_clip-style rows: random tokens, EOT (= vocab - 1, the largest id), zero padding."""
  ids = np.zeros((batch, context), np.int64)
  for b in range(batch):
    n = int(rng.integers(1, context - 1))
    ids[b, :n] = rng.integers(1, vocab - 1, n)
    ids[b, n] = vocab - 1
  return ids


def _encode(model, images, ids):
  """Jitted encode_image / encode_text over the split state (as the hot paths do)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, images, ids):
    m = nnx.merge(graphdef, state)
    return m.encode_image(images), m.encode_text(ids)

  img, txt = fn(state, jnp.asarray(images), jnp.asarray(ids, jnp.int32))
  return np.asarray(img), np.asarray(txt)


def _perturb_(torch_model, seed=0):
  """Make LayerNorm params and biases non-trivial so a dropped or swapped one is caught."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias") or "ln" in name or "norm" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _openclip_parity(name, batch, rng):
  import open_clip
  import torch

  torch.manual_seed(0)
  ref = open_clip.create_model(name, pretrained=None).eval()
  _perturb_(ref)
  cfg = get_config(name)
  images = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
  ids = _ids(rng, batch, cfg.vocab_size)
  with torch.no_grad():
    want_img = ref.encode_image(torch.from_numpy(images)).numpy()
    want_txt = ref.encode_text(torch.from_numpy(ids)).numpy()
  sd = ref.state_dict()
  del ref
  model = load_clip(sd)
  assert model.config == cfg  # inferred from shapes
  got_img, got_txt = _encode(model, images.transpose(0, 2, 3, 1), ids)
  err_img, err_txt = np.abs(got_img - want_img).max(), np.abs(got_txt - want_txt).max()
  print(f"{name}: max |err| image {err_img:.2e} text {err_txt:.2e}")
  assert np.abs(want_img).max() > 0.1 and np.abs(want_txt).max() > 0.1  # unit-scale features
  assert err_img <= TOL and err_txt <= TOL


@pytest.mark.torch
def test_openclip_vit_b32_parity(rng):
  _openclip_parity("ViT-B-32", 2, rng)


@pytest.mark.torch
@pytest.mark.slow
def test_openclip_vit_l14_parity(rng):
  _openclip_parity("ViT-L-14", 1, rng)


@pytest.mark.torch
def test_hf_clip_parity(rng):
  import torch
  import transformers

  vocab = 1000
  hf_cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=128, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                       bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0),
      vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      projection_dim=64)
  torch.manual_seed(0)
  ref = transformers.CLIPModel(hf_cfg).eval()
  _perturb_(ref, seed=1)
  images = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  ids = _ids(rng, 2, vocab)
  with torch.no_grad():
    img = ref.get_image_features(pixel_values=torch.from_numpy(images))
    txt = ref.get_text_features(input_ids=torch.from_numpy(ids))
  # transformers >= 5 returns model outputs whose pooler_output holds the projected features.
  want_img = getattr(img, "pooler_output", img).numpy()
  want_txt = getattr(txt, "pooler_output", txt).numpy()
  model = load_clip(ref.state_dict())
  assert model.config.act == "quick_gelu" and model.config.vision_heads == 2
  got_img, got_txt = _encode(model, images.transpose(0, 2, 3, 1), ids)
  err = max(np.abs(got_img - want_img).max(), np.abs(got_txt - want_txt).max())
  print(f"HF tiny CLIP: max |err| {err:.2e}")
  assert err <= TOL
  # The activation matters: the same weights with exact GELU give different features.
  gelu = load_clip(ref.state_dict(), dataclasses.replace(model.config, act="gelu"))
  assert np.abs(_encode(gelu, images.transpose(0, 2, 3, 1), ids)[0] - want_img).max() > 1e-3


def test_shapes_and_bf16_path(rng):
  cfg = get_config("tiny")
  model = CLIP(cfg, rngs=nnx.Rngs(0))
  images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  ids = _ids(rng, 3, cfg.vocab_size)
  img, txt = _encode(model, images, ids)
  assert img.shape == (3, cfg.embed_dim) and txt.shape == (3, cfg.embed_dim)
  # Same params, bf16 compute: params stay fp32, outputs fp32, close to the fp32 path.
  bf16 = CLIP(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(model, nnx.Param))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  img16, txt16 = _encode(bf16, images, ids)
  assert img16.dtype == np.float32
  dev = max(np.abs(img16 - img).max() / np.abs(img).max(), np.abs(txt16 - txt).max() / np.abs(
      txt).max())
  print(f"bf16 vs fp32 max relative deviation: {dev:.3e}")
  assert 0 < dev < 0.1


def test_text_pools_at_eot_and_is_causal(rng):
  cfg = get_config("tiny")
  model = CLIP(cfg, rngs=nnx.Rngs(1))
  ids = _ids(rng, 1, cfg.vocab_size)
  eot = int(ids[0].argmax())
  changed_after = ids.copy()
  changed_after[0, eot + 1] = 5  # tokens after EOT cannot reach it through the causal mask
  changed_before = ids.copy()
  changed_before[0, 0] = (ids[0, 0] % 100) + 1
  base = np.asarray(model.encode_text(jnp.asarray(ids)))
  np.testing.assert_allclose(np.asarray(model.encode_text(jnp.asarray(changed_after))), base,
                             atol=1e-6)
  assert np.abs(np.asarray(model.encode_text(jnp.asarray(changed_before))) - base).max() > 1e-4


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown CLIP config"):
    get_config("ViT-H-99")
  with pytest.raises(ValueError, match="act"):
    dataclasses.replace(get_config("tiny"), act="relu")
  with pytest.raises(ValueError, match="divisible"):
    dataclasses.replace(get_config("tiny"), vision_heads=3)
  model = CLIP(get_config("tiny"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expected images"):
    model.encode_image(jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="token ids"):
    model.encode_text(jnp.zeros((1, 78), jnp.int32))


def _fake_openclip_sd(cfg: CLIPConfig):
  """A state_dict with every open_clip key at the right shape (zeros)."""
  w_v, w_t, e, p = cfg.vision_width, cfg.text_width, cfg.embed_dim, cfg.patch_size
  shapes = {
      "positional_embedding": (cfg.context_length, w_t), "text_projection": (w_t, e),
      "logit_scale": (), "token_embedding.weight": (cfg.vocab_size, w_t),
      "ln_final.weight": (w_t,), "ln_final.bias": (w_t,),
      "visual.class_embedding": (w_v,),
      "visual.positional_embedding": (cfg.grid_size ** 2 + 1, w_v),
      "visual.proj": (w_v, e), "visual.conv1.weight": (w_v, 3, p, p),
  }
  sd = {}
  for key in openclip_keys(cfg):
    if key in shapes:
      sd[key] = np.zeros(shapes[key], np.float32)
      continue
    w = w_v if key.startswith("visual.") else w_t
    leaf = key.split("resblocks.")[-1].split(".", 1)[-1] if "resblocks" in key else key
    sd[key] = np.zeros({
        "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w), "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
        "mlp.c_proj.weight": (w, 4 * w),
    }.get(leaf, (w,)), np.float32)
  return sd


def test_config_inference_and_key_errors():
  cfg = get_config("tiny")
  sd = _fake_openclip_sd(cfg)
  assert infer_config(sd) == cfg
  assert load_clip(sd).config == cfg
  missing = dict(sd)
  del missing["visual.ln_post.bias"]
  with pytest.raises(ConversionError, match=r"visual\.ln_post\.bias"):
    load_clip(missing)
  bad = dict(sd)
  bad["transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros((7,), np.float32)
  with pytest.raises(ConversionError, match=r"transformer\.resblocks\.1\.mlp\.c_fc\.bias"):
    load_clip(bad)
  extra = dict(sd, **{"visual.attnpool.weight": np.zeros((3,), np.float32)})
  with pytest.raises(ConversionError, match=r"visual\.attnpool\.weight"):
    load_clip(extra)

"""ViT-H/14-style image tower hidden states (TextualDegRemoval's image encoder, spec §1.2).

`VisionTransformer.hidden_states` against open_clip's `forward_intermediates` (every block's token
states, the embedding) and transformers' `CLIPVisionModelWithProjection(output_hidden_states=True)`
(TDR reads `last_hidden_state`: before `post_layernorm`), on tiny random towers with ViT-H's head
width 80 (built from configs, no download). Max error <= 1e-5 of the output's scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch

WIDTH, HEAD_WIDTH, LAYERS, PATCH, SIZE, EMBED = 160, 80, 3, 8, 32, 48


def _perturb_(model, seed=1):
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # non-trivial LayerNorms and biases, so a skipped one shows
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


def _close(got, want, what=""):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  assert err <= 1e-5 * scale, f"{what}: max |err| {err:.3g} > 1e-5 x scale {scale:.3g}"


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)


def test_vision_hidden_states_match_open_clip(images):
  open_clip = pytest.importorskip("open_clip")
  import torch

  from uir_jax.convert.clip_towers import load_vision_tower

  torch.manual_seed(0)
  ref = open_clip.model._build_vision_tower(
      EMBED, dict(image_size=SIZE, patch_size=PATCH, width=WIDTH, head_width=HEAD_WIDTH,
                  layers=LAYERS))
  ref.eval()
  _perturb_(ref)
  x = torch.from_numpy(images)
  with torch.no_grad():
    want = ref.forward_intermediates(x, normalize_intermediates=False, output_fmt="NLC",
                                     output_extra_tokens=True)
    embeds0 = ref._embeds(x).numpy()
  # A whole open_clip CLIP's `visual.*` keys (its text half is not needed).
  sd = {"visual." + k: v.numpy() for k, v in ref.state_dict().items()}
  sd["token_embedding.weight"] = np.zeros((8, 4), np.float32)
  vis = load_vision_tower(sd, heads=WIDTH // HEAD_WIDTH)
  out = vis.hidden_states(jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert len(out.hidden_states) == LAYERS + 1
  _close(out.hidden_states[0], embeds0, "embeddings")
  for k, (cls, patches) in enumerate(zip(want["image_intermediates_prefix"],
                                         want["image_intermediates"], strict=True)):
    _close(out.hidden_states[k + 1], torch.cat([cls, patches], 1).numpy(), f"block {k}")
  np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])
  early = vis.hidden_states(jnp.asarray(images.transpose(0, 2, 3, 1)), num_blocks=2)
  assert len(early.hidden_states) == 3
  np.testing.assert_array_equal(early.last_hidden_state, out.hidden_states[2])
  _close(out.image_embeds, want["image_features"].numpy(), "image_embeds")


def test_vision_hidden_states_match_transformers(images, tmp_path):
  import torch
  from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

  from uir_jax.convert.clip_towers import load_vision_tower

  torch.manual_seed(0)
  cfg = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=WIDTH // HEAD_WIDTH, image_size=SIZE,
                         patch_size=PATCH, projection_dim=EMBED, hidden_act="gelu")
  ref = CLIPVisionModelWithProjection(cfg).eval()
  _perturb_(ref)
  ref.save_pretrained(tmp_path)
  with torch.no_grad():
    want = ref(torch.from_numpy(images), output_hidden_states=True)
  vis = load_vision_tower(tmp_path)  # heads and activation from config.json
  out = vis.hidden_states(jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert len(out.hidden_states) == len(want.hidden_states) == LAYERS + 1
  for k, (a, b) in enumerate(zip(out.hidden_states, want.hidden_states, strict=True)):
    _close(a, b.numpy(), f"hidden_states[{k}]")
  _close(out.last_hidden_state, want.last_hidden_state.numpy(), "last_hidden_state")
  _close(out.image_embeds, want.image_embeds.numpy(), "image_embeds")

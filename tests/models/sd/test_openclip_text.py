"""SD 2.x's OpenCLIP text tower: penultimate layer + final LayerNorm, from open_clip's layout.

Oracles (PyTorch, tiny random models built from configs, no download): open_clip's own
`TextTransformer.forward_intermediates(normalize_intermediates=True)` (the layer's states through
`ln_final`, what Stability's `FrozenOpenCLIPEmbedder(layer="penultimate")` computes), and
diffusers' single-file converter (`convert_open_clip_checkpoint`) feeding a transformers
`CLIPTextModel` with one block fewer, as diffusers stores SD 2.x. Max error <= 1e-5 of the
output's scale.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.convert.common import ConversionError, flat_params

pytestmark = pytest.mark.torch

WIDTH, HEADS, LAYERS = 128, 2, 4  # head width 64, as every open_clip text tower
PREFIX = "cond_stage_model.model."


@pytest.fixture(scope="module")
def tower():
  """(open_clip TextTransformer, its state_dict as numpy, token ids [2, 77] SD-2-style)."""
  open_clip = pytest.importorskip("open_clip")
  import torch

  torch.manual_seed(0)
  ref = open_clip.model._build_text_tower(
      32, dict(context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS))
  ref.eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # non-trivial LayerNorms and biases, so a skipped one shows
    for p in ref.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  rng = np.random.default_rng(0)
  ids = np.zeros((2, 77), np.int64)  # SD 2.x pads with "!" = 0
  ids[:, 0] = 49406
  ids[0, 1:6], ids[0, 6] = rng.integers(300, 40000, 5), 49407
  ids[1, 1:30], ids[1, 30] = rng.integers(300, 40000, 29), 49407
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  return ref, sd, ids


def _close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  assert err <= 1e-5 * scale, f"max |err| {err:.3g} > 1e-5 x scale {scale:.3g}"


def _intermediate(ref, ids, index):
  """open_clip: the stream after block `index` (0-based) through ln_final, [B, 77, W]."""
  import torch

  with torch.no_grad():
    out = ref.forward_intermediates(torch.from_numpy(ids), indices=[index],
                                    normalize_intermediates=True, intermediates_only=True,
                                    output_fmt="NLC")
  return out["text_intermediates"][0].numpy()


def test_openclip_text_layers_match_open_clip(tower):
  import torch

  from uir_jax.convert.clip_towers import load_openclip_text

  ref, sd, ids = tower
  penult = _intermediate(ref, ids, LAYERS - 2)
  # SD 2.x single-file layout; the penultimate tower has one block fewer.
  ours = load_openclip_text({PREFIX + k: v for k, v in sd.items()}, layer="penultimate")
  assert len(ours.transformer.resblocks) == LAYERS - 1
  _close(ours(jnp.asarray(ids)), penult)
  # The full tower: every layer choice, by name and by HF hidden-states index.
  full = load_openclip_text(sd)
  assert len(full.transformer.resblocks) == LAYERS
  _close(full(jnp.asarray(ids), layer="penultimate"), penult)
  _close(full(jnp.asarray(ids), layer=-2), penult)
  _close(full(jnp.asarray(ids), layer=1), _intermediate(ref, ids, 0))
  ref.output_tokens = True
  with torch.no_grad():
    _, tokens = ref(torch.from_numpy(ids))  # ln_final of the last block: open_clip's own path
  ref.output_tokens = False
  _close(full(jnp.asarray(ids)), tokens.numpy())
  _close(full(jnp.asarray(ids), layer=LAYERS), tokens.numpy())
  with pytest.raises(ValueError, match="outside"):
    full(jnp.asarray(ids), layer=LAYERS + 1)


def test_single_file_and_diffusers_folder_load_the_same_tower(tower, tmp_path):
  """An SD 2.x single file (24 open_clip blocks) and its diffusers text_encoder/ (23 HF layers):
  the same parameters and outputs through our loaders; transformers agrees with open_clip."""
  import torch
  from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
  from safetensors.numpy import save_file
  from transformers import CLIPTextConfig, CLIPTextModel

  from uir_jax.convert.sd import load_text_encoder

  ref, sd, ids = tower
  single = {PREFIX + k: v for k, v in sd.items()}
  single["model.diffusion_model.time_embed.0.weight"] = np.zeros((4, 4), np.float32)  # not text
  save_file(single, str(tmp_path / "sd2.safetensors"))
  # diffusers' own conversion; it drops block 23 of the real model, we drop our last by hand.
  hf = convert_open_clip_checkpoint(None, {k: torch.from_numpy(v) for k, v in single.items()})
  hf = {k.removeprefix("text_model."): v for k, v in hf.items()  # transformers 5: no prefix
        if f"encoder.layers.{LAYERS - 1}." not in k and k != "text_projection.weight"}
  cfg = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                       num_hidden_layers=LAYERS - 1, num_attention_heads=HEADS,
                       max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
                       pad_token_id=0)
  model = CLIPTextModel(cfg).eval()
  model.load_state_dict(hf, strict=False)  # the position_ids buffer is not in the file
  missing = set(model.state_dict()) - set(hf)
  assert all("position_ids" in k for k in missing), missing
  model.save_pretrained(tmp_path / "pipe" / "text_encoder")
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).last_hidden_state.numpy()
  _close(want, _intermediate(ref, ids, LAYERS - 2))  # the oracles agree

  a = load_text_encoder(tmp_path / "sd2.safetensors")  # default: penultimate for open_clip
  b = load_text_encoder(tmp_path / "pipe")  # default: every layer of the HF model
  pa, pb = (flat_params(__import__("flax").nnx.state(m)) for m in (a, b))
  assert set(pa) == set(pb)
  assert all(np.array_equal(np.asarray(pa[k]), np.asarray(pb[k])) for k in pa)
  out_a, out_b = np.asarray(a(jnp.asarray(ids))), np.asarray(b(jnp.asarray(ids)))
  assert np.array_equal(out_a, out_b)
  _close(out_b, want)


def test_openclip_text_bad_input_is_one_line_naming_the_key(tower):
  from uir_jax.convert.clip_towers import load_openclip_text

  _, sd, _ = tower
  bad = dict(sd, **{"ln_final.weight": sd["ln_final.weight"][:-1]})
  with pytest.raises(ConversionError, match=r"^[^\n]*ln_final\.weight[^\n]*expects[^\n]*$"):
    load_openclip_text(bad)
  bad = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.attn.in_proj_bias"}
  with pytest.raises(ConversionError, match=r"^[^\n]*resblocks\.1\.attn\.q_proj\.bias[^\n]*$"):
    load_openclip_text(bad)
  with pytest.raises(ConversionError, match=r"^[^\n]*transformer\.extra\.weight[^\n]*$"):
    load_openclip_text(dict(sd, **{"transformer.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ConversionError, match="not an open_clip text tower"):
    load_openclip_text({"foo.weight": np.zeros(3, np.float32)})

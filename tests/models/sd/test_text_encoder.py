"""SD text encoders (uir_jax.models.clip.CLIPTextTower) against transformers' CLIPTextModel.

Tiny random CLIPTextModels (no download), parameters perturbed, written with `save_pretrained`
and read by `uir_jax.convert.sd.load_text_encoder`; max error <= 1e-5 of the output's scale.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.convert.common import ConversionError

pytestmark = pytest.mark.torch

# SD 1.x: ViT-L/14 style (quick_gelu); SD 2.x: OpenCLIP ViT-H/14 style (gelu), pad token 0.
STYLES = {"sd15": dict(hidden_act="quick_gelu", pad_token_id=49407),
          "sd2": dict(hidden_act="gelu", pad_token_id=0)}


def _tiny(tmp_path, style: str):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel

  torch.manual_seed(0)
  cfg = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                       **STYLES[style])
  model = CLIPTextModel(cfg).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  model.save_pretrained(tmp_path / "text_encoder")
  return model


@pytest.mark.parametrize("style", list(STYLES))
def test_text_encoder_matches_transformers(tmp_path, rng, style):
  import torch

  from uir_jax.convert.sd import load_text_encoder

  ref = _tiny(tmp_path, style)
  ours = load_text_encoder(tmp_path)  # the pipeline folder: text_encoder/ is found
  ids = np.full((2, 77), STYLES[style]["pad_token_id"], np.int64)
  ids[:, 0] = 49406
  ids[0, 1:6] = rng.integers(300, 40000, 5)
  ids[0, 6] = 49407
  ids[1, 1:20] = rng.integers(300, 40000, 19)
  ids[1, 20] = 49407
  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
  last, hiddens = ours(jnp.asarray(ids), output_hidden_states=True)
  want = out.last_hidden_state.numpy()
  scale = float(np.abs(want).max())
  assert float(np.abs(np.asarray(last) - want).max()) <= 1e-5 * scale
  assert len(hiddens) == len(out.hidden_states) == 4
  for i, (a, b) in enumerate(zip(hiddens, out.hidden_states, strict=True)):
    b = b.numpy()
    assert float(np.abs(np.asarray(a) - b).max()) <= 1e-5 * float(np.abs(b).max()), i
  # A chosen layer through the final LayerNorm (diffusers' clip skip: hidden_states[-2]).
  with torch.no_grad():
    want = ref.final_layer_norm(out.hidden_states[-2]).numpy()
  got = np.asarray(ours(jnp.asarray(ids), layer="penultimate"))
  assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
  cut = load_text_encoder(tmp_path, layer=-2)  # the last block dropped at load
  assert len(cut.transformer.resblocks) == 2
  np.testing.assert_array_equal(np.asarray(cut(jnp.asarray(ids))), got)
  if style == "sd15":  # an SD 1.x single file: HF names under cond_stage_model.transformer.
    single = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
              for k, v in ref.state_dict().items()}
    single["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4)  # not text: ignored
    heads = dict(num_attention_heads=4)  # not 64 channels a head: not readable off shapes
    np.testing.assert_array_equal(
        np.asarray(load_text_encoder(single, config=heads)(jnp.asarray(ids))), np.asarray(last))


def test_token_embeddings_replace_the_given_positions(tmp_path, rng):
  import torch

  from uir_jax.convert.sd import load_text_encoder

  ref = _tiny(tmp_path, "sd2")
  ours = load_text_encoder(tmp_path / "text_encoder")
  ids = np.zeros((2, 77), np.int64)
  ids[:, 0], ids[:, 1:5], ids[:, 5] = 49406, rng.integers(300, 40000, (2, 4)), 49407
  pos = np.array([[2, 3], [4, 1]])
  vec = rng.standard_normal((2, 2, 64)).astype(np.float32)

  def inject(module, inputs, output):  # the oracle: transformers with its embedding output edited
    output = output.clone()
    for b in range(2):
      output[b, torch.from_numpy(pos[b])] = torch.from_numpy(vec[b])
    return output

  hook = ref.get_input_embeddings().register_forward_hook(inject)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
  hook.remove()
  got = np.asarray(ours(jnp.asarray(ids), token_embeddings=(jnp.asarray(pos), jnp.asarray(vec))))
  assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
  plain = np.asarray(ours(jnp.asarray(ids)))
  assert float(np.abs(plain - want).max()) > 1e-2  # the injection changed the states


def test_text_encoder_bad_input(tmp_path):
  from safetensors.numpy import load_file, save_file

  from uir_jax.convert.sd import load_text_encoder

  _tiny(tmp_path, "sd15")
  folder = tmp_path / "text_encoder"
  sd = load_file(str(folder / "model.safetensors"))
  good = dict(sd)
  key = next(k for k in sd if k.endswith("encoder.layers.0.mlp.fc1.bias"))
  sd[key] = sd[key][:-1]
  save_file(sd, str(folder / "model.safetensors"))
  with pytest.raises(ConversionError, match=r"^[^\n]*layers\.0\.mlp\.fc1\.bias[^\n]*expects"
                                            r"[^\n]*$"):  # one line naming the key
    load_text_encoder(folder)
  sd = good
  key = next(k for k in sd if k.endswith("encoder.layers.1.mlp.fc2.weight"))
  sd.pop(key)
  save_file(sd, str(folder / "model.safetensors"))
  with pytest.raises(ConversionError, match=r"transformer\.resblocks\.1\.mlp\.c_proj\.kernel"):
    load_text_encoder(folder)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="clip_vision_model")))
  with pytest.raises(ConversionError, match="not a CLIPTextModel config"):
    load_text_encoder(folder)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    load_text_encoder(tmp_path / "nowhere")

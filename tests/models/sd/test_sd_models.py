"""Stable Diffusion networks (uir_jax.models.sd) and their converter against diffusers (PyTorch).

Each parity test builds a tiny diffusers model from a config (no download), perturbs every
parameter (so norms have non-trivial scales/biases and zero-initialised layers are not zero),
writes it with `save_pretrained` (safetensors) and loads it with `uir_jax.convert.sd`: that tests
the converter and the network together. Tolerance: max |ours - diffusers| <= 1e-5 of the output's
scale (max |diffusers|), fp32 at `jax_default_matmul_precision=highest`.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from uir_jax.convert.common import ConversionError

pytestmark = pytest.mark.torch

TOL = 1e-5

# SD 1.5 style: 1x1-conv projections, attention_head_dim = number of heads (2 -> 16, 32 channels).
SD15 = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=24, attention_head_dim=2, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# SD 2.x style: Linear projections, a per-block head list giving a constant head size (16 here,
# 64 in SD 2.x) and cross-attention in every block but the first up/last down.
SD2 = dict(SD15, use_linear_projection=True, attention_head_dim=(2, 4), cross_attention_dim=40,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _perturb(model, seed: int):
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t) -> np.ndarray:
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _close(ours, ref: np.ndarray, what: str = "output"):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  scale = float(np.abs(ref).max())
  err = float(np.abs(ours - ref).max())
  assert err <= TOL * scale, f"{what}: max error {err:.3g} > {TOL} x scale {scale:.3g}"


def _torch_unet(config: dict, seed: int = 0):
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(seed)
  return _perturb(TorchUNet(**config), seed)


def _inputs(rng, h: int, w: int, ctx_dim: int, batch: int = 2):
  x = rng.standard_normal((batch, h, w, 4)).astype(np.float32)
  ctx = rng.standard_normal((batch, 7, ctx_dim)).astype(np.float32)
  t = np.array([999.0, 10.0][:batch], np.float32)
  return x, ctx, t


def _unet_parity(tmp_path, rng, config: dict, sizes=((16, 16),)):
  import torch

  from uir_jax.convert.sd import load_unet

  ref = _torch_unet(config)
  ref.save_pretrained(tmp_path / "unet")
  ours = load_unet(tmp_path / "unet")
  for h, w in sizes:
    x, ctx, t = _inputs(rng, h, w, config["cross_attention_dim"])
    with torch.no_grad():
      want = _nhwc(ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    _close(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)), want, f"UNet at {h}x{w}")
  return ref, ours


def test_unet_sd15_style_matches_diffusers(tmp_path, rng):
  # 15 x 13 latents: the upsampler resizes to the skip's size, as diffusers' upsample_size does.
  _unet_parity(tmp_path, rng, SD15, sizes=((16, 16), (15, 13)))


@pytest.mark.parametrize("upcast", [False, True], ids=["sd2-base", "sd2-768-upcast"])
def test_unet_sd2_style_matches_diffusers(tmp_path, rng, upcast):
  _, ours = _unet_parity(tmp_path, rng, dict(SD2, upcast_attention=upcast))
  assert ours.config.use_linear_projection and ours.config.upcast_attention == upcast
  # Head size constant across blocks (the SD 2.x semantics of the per-block list).
  block = ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1
  assert (block.heads, block.dim_head) == (4, 16)


def test_vae_encode_decode_match_diffusers(tmp_path, rng):
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  from uir_jax.convert.sd import load_vae

  torch.manual_seed(0)
  ref = _perturb(TorchVAE(**VAE), 1)
  ref.save_pretrained(tmp_path / "vae")
  ours = load_vae(tmp_path / "vae")
  assert ours.scaling_factor == ref.config.scaling_factor
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  feats = []
  hooks = [b.resnets[-1].register_forward_hook(lambda m, i, o: feats.append(_nhwc(o)))
           for b in ref.encoder.down_blocks]
  hooks.append(ref.encoder.mid_block.register_forward_hook(lambda m, i, o: feats.append(_nhwc(o))))
  with torch.no_grad():
    post = ref.encode(_nchw(x)).latent_dist
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    dec = _nhwc(ref.decode(_nchw(z)).sample)
  for hk in hooks:
    hk.remove()
  mean, logvar, features = ours.encode(jnp.asarray(x), return_features=True)
  _close(mean, _nhwc(post.mean), "posterior mean")
  _close(logvar, _nhwc(post.logvar), "posterior logvar")
  assert len(features) == len(feats) == 3
  for i, (f, want) in enumerate(zip(features, feats, strict=True)):
    _close(f, want, f"encoder feature {i}")
  _close(ours.decode(jnp.asarray(z)), dec, "decode")


def test_vae_legacy_attention_names_load(tmp_path):
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  from safetensors.numpy import save_file

  from uir_jax.convert.common import flat_params
  from uir_jax.convert.sd import load_vae

  torch.manual_seed(0)
  ref = _perturb(TorchVAE(**VAE), 2)
  ref.save_pretrained(tmp_path / "vae")
  new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  sd = {}
  for k, v in ref.state_dict().items():
    for a, b in new.items():
      k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
    sd[k] = v.numpy()
  assert any(".query." in k for k in sd) and any(".proj_attn." in k for k in sd)
  save_file(sd, str(tmp_path / "legacy.safetensors"))
  legacy = load_vae(tmp_path / "legacy.safetensors", config=dict(ref.config))
  want = flat_params(nnx_state(load_vae(tmp_path / "vae")))
  got = flat_params(nnx_state(legacy))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def nnx_state(model):
  from flax import nnx

  return nnx.state(model, nnx.Param)


def test_controlnet_residuals_into_unet_match_diffusers(tmp_path, rng):
  import torch
  from diffusers import ControlNetModel

  from uir_jax.convert.sd import load_controlnet, load_unet
  from uir_jax.models.sd import ControlNet

  ref_unet = _torch_unet(SD15)
  ref_cn = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16))
  fresh = tmp_path / "fresh"
  ref_cn.save_pretrained(fresh)
  _perturb(ref_cn, 3)
  ref_unet.save_pretrained(tmp_path / "unet")
  ref_cn.save_pretrained(tmp_path / "controlnet")
  unet = load_unet(tmp_path / "unet")
  cn = load_controlnet(tmp_path / "controlnet")

  x, ctx, t = _inputs(rng, 16, 16, SD15["cross_attention_dim"])
  cond = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    down, mid = ref_cn(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), _nchw(cond),
                       conditioning_scale=0.7, return_dict=False)
    want = _nhwc(ref_unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                          down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample)
  our_down, our_mid = cn(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(cond),
                         conditioning_scale=0.7)
  assert len(our_down) == len(down) == 4
  for i, (a, b) in enumerate(zip(our_down, down, strict=True)):
    _close(a, _nhwc(b), f"down residual {i}")
  _close(our_mid, _nhwc(mid), "mid residual")
  got = unet(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), down_residuals=our_down,
             mid_residual=our_mid)
  _close(got, want, "UNet with ControlNet residuals")

  # from_unet: the UNet's encoder copied, every output convolution zero (as diffusers' from_unet).
  from uir_jax.convert.common import flat_params

  ours = flat_params(nnx_state(ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8,
                                                                                             16))))
  theirs = flat_params(nnx_state(load_controlnet(fresh)))
  assert ours.keys() == theirs.keys()
  for k in ours:
    if not k.startswith("controlnet_cond_embedding.") or k.startswith(
        "controlnet_cond_embedding.conv_out"):
      np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
  path = tmp_path_factory.mktemp("sd") / "unet"
  _torch_unet(SD15).save_pretrained(path)
  return path


def _rewrite(src, dst, edit):
  from safetensors.numpy import load_file, save_file

  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  sd = load_file(str(src / "diffusion_pytorch_model.safetensors"))
  edit(sd)
  save_file(sd, str(dst / "diffusion_pytorch_model.safetensors"))
  return dst


def test_missing_key_is_named(saved_unet, tmp_path):
  from uir_jax.convert.sd import load_unet

  bad = _rewrite(saved_unet, tmp_path / "bad",
                 lambda sd: sd.pop("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
                                   ".weight"))
  with pytest.raises(ConversionError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks"
                                            r"\.0\.attn2\.to_k\.kernel"):
    load_unet(bad)


def test_misshaped_key_is_named(saved_unet, tmp_path):
  from uir_jax.convert.sd import load_unet

  def edit(sd):
    sd["mid_block.resnets.0.conv1.weight"] = sd["mid_block.resnets.0.conv1.weight"][:, :32]

  with pytest.raises(ConversionError, match=r"mid_block\.resnets\.0\.conv1\.weight.*expects"):
    load_unet(_rewrite(saved_unet, tmp_path / "bad", edit))


def test_unexpected_key_is_named(saved_unet, tmp_path):
  from uir_jax.convert.sd import load_unet

  def edit(sd):
    sd["add_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)

  with pytest.raises(ConversionError, match=r"add_embedding\.linear_1\.weight"):
    load_unet(_rewrite(saved_unet, tmp_path / "bad", edit))


def test_other_model_families_are_refused(saved_unet, tmp_path):
  from uir_jax.convert.sd import load_controlnet, load_unet, load_vae

  with pytest.raises(ConversionError, match="UNet2DConditionModel.*not a AutoencoderKL"):
    load_vae(saved_unet)
  with pytest.raises(ConversionError, match="not a ControlNetModel"):
    load_controlnet(saved_unet)
  # An SDXL UNet: same class, added time/text embeddings we do not implement.
  sdxl = dict(json.loads((saved_unet / "config.json").read_text()),
              addition_embed_type="text_time", addition_time_embed_dim=256)
  with pytest.raises(ConversionError, match="addition_embed_type='text_time'"):
    load_unet(saved_unet, config=sdxl)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    load_unet(tmp_path / "nowhere")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
    load_unet(empty)


def test_pipeline_folder_finds_its_subfolder(saved_unet, tmp_path):
  import shutil

  from uir_jax.convert.sd import load_unet

  shutil.copytree(saved_unet, tmp_path / "pipe" / "unet")
  (tmp_path / "pipe" / "model_index.json").write_text("{}")
  assert load_unet(tmp_path / "pipe").config.block_out_channels == (32, 64)


# ----------------------------------------------------------------------------------------------
# Single-file CompVis / LDM checkpoints.
# ----------------------------------------------------------------------------------------------

# LDM files always use 32 norm groups; SD 1.x style: 8 heads, 1x1-conv projections.
LDM_UNET = dict(SD15, norm_num_groups=32, attention_head_dim=8)
LDM_VAE = dict(VAE, norm_num_groups=32)
_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}


def _swap(rest: str, table: dict) -> str:
  head, _, tail = rest.partition(".")
  return f"{table.get(head, head)}.{tail}"


def _unet_to_ldm(sd: dict, layers: int, prefix: str = "model.diffusion_model.") -> dict:
  """diffusers UNet keys -> LDM keys (the inverse of spec §3.7's table, written for this test and
  checked against diffusers' own `convert_ldm_unet_checkpoint`)."""
  import re

  from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

  fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
  has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
  out = {}
  for k, v in sd.items():
    if k in fixed:
      new = fixed[k]
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
      i = 1 + int(m.group(1)) * (layers + 1) + int(m.group(3))
      new = (f"input_blocks.{i}.0." + _swap(m.group(4), _RESNET_TO_LDM) if m.group(2) == "resnets"
             else f"input_blocks.{i}.1.{m.group(4)}")
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
      new = f"input_blocks.{1 + int(m.group(1)) * (layers + 1) + layers}.0.op.{m.group(2)}"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", k):
      if m.group(1) == "attentions":
        new = f"middle_block.1.{m.group(3)}"
      else:
        new = f"middle_block.{2 * int(m.group(2))}." + _swap(m.group(3), _RESNET_TO_LDM)
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
      i = int(m.group(1)) * (layers + 1) + int(m.group(3))
      new = (f"output_blocks.{i}.0." + _swap(m.group(4), _RESNET_TO_LDM) if m.group(2) == "resnets"
             else f"output_blocks.{i}.1.{m.group(4)}")
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
      b = int(m.group(1))
      j = 2 if b in has_attn else 1
      new = f"output_blocks.{b * (layers + 1) + layers}.{j}.conv.{m.group(2)}"
    else:
      raise AssertionError(f"no LDM name for {k}")
    out[prefix + new] = v
  return out


def _vae_to_ldm(sd: dict, levels: int) -> dict:
  """diffusers AutoencoderKL keys -> LDM keys (1x1-conv attention weights, reversed decoder)."""
  import re

  from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

  fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
  out = {}
  for k, v in sd.items():
    if k in fixed:
      new = fixed[k]
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
      new = f"encoder.down.{m.group(1)}.block.{m.group(2)}." + _swap(
          m.group(3), {"conv_shortcut": "nin_shortcut"})
    elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
      new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
      new = f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}." + _swap(
          m.group(3), {"conv_shortcut": "nin_shortcut"})
    elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
      new = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", k):
      new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
    elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(.+)", k):
      new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
      if v.ndim == 2:
        v = v[:, :, None, None]
    else:
      raise AssertionError(f"no LDM name for {k}")
    out["first_stage_model." + new] = v
  return out


def test_single_file_ldm_checkpoint_converts_to_the_same_parameters(tmp_path):
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  from diffusers.loaders.single_file_utils import (
      convert_ldm_unet_checkpoint,
      convert_ldm_vae_checkpoint,
  )
  from safetensors.torch import save_file

  from uir_jax.convert.common import flat_params
  from uir_jax.convert.sd import load_unet, load_vae

  unet = _torch_unet(LDM_UNET)
  torch.manual_seed(1)
  vae = _perturb(TorchVAE(**LDM_VAE), 4)
  unet.save_pretrained(tmp_path / "unet")
  vae.save_pretrained(tmp_path / "vae")
  usd, vsd = unet.state_dict(), vae.state_dict()
  ldm = {**_unet_to_ldm(usd, 1), **_vae_to_ldm(vsd, 2),
         "cond_stage_model.transformer.x": torch.zeros(1)}
  # The fixture is the LDM layout: diffusers' own single-file converters give the weights back.
  back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
  assert back.keys() == usd.keys() and all(torch.equal(back[k], usd[k]) for k in usd)
  back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
  assert back.keys() == vsd.keys()
  assert all(torch.equal(back[k].reshape(vsd[k].shape), vsd[k]) for k in vsd)
  save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd.safetensors"))

  for load, folder in ((load_unet, "unet"), (load_vae, "vae")):
    single = load(tmp_path / "sd.safetensors")  # config inferred from the shapes
    want = flat_params(nnx_state(load(tmp_path / folder)))
    got = flat_params(nnx_state(single))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    assert single.config == load(tmp_path / folder).config


def test_single_file_ldm_controlnet_converts_to_the_same_parameters(tmp_path):
  import re

  import torch
  from diffusers import ControlNetModel
  from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
  from safetensors.torch import save_file

  from uir_jax.convert.common import flat_params
  from uir_jax.convert.sd import load_controlnet

  cn = _perturb(ControlNetModel.from_unet(_torch_unet(LDM_UNET)), 5)  # SD's (16, 32, 96, 256)
  cn.save_pretrained(tmp_path / "controlnet")
  csd = cn.state_dict()
  ldm = _unet_to_ldm({k: v for k, v in csd.items() if not k.startswith("controlnet_")}, 1,
                     "control_model.")
  for k, v in csd.items():
    if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)", k):
      i = 0 if m.group(1) == "conv_in" else 14 if m.group(1) == "conv_out" else \
          2 * int(m.group(2)) + 2
      ldm[f"control_model.input_hint_block.{i}.{m.group(3)}"] = v
    elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", k):
      ldm[f"control_model.zero_convs.{m.group(1)}.0.{m.group(2)}"] = v
    elif m := re.fullmatch(r"controlnet_mid_block\.(.+)", k):
      ldm[f"control_model.middle_block_out.0.{m.group(1)}"] = v
  back = convert_controlnet_checkpoint(ldm, dict(cn.config))
  assert back.keys() == csd.keys() and all(torch.equal(back[k], csd[k]) for k in csd)
  save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "cn.safetensors"))
  # Standalone ControlNet files also come without the prefix (e.g. thibaud/controlnet-sd21).
  save_file({k[len("control_model."):]: v.contiguous() for k, v in ldm.items()},
            str(tmp_path / "bare.safetensors"))
  want_model = load_controlnet(tmp_path / "controlnet")
  want = flat_params(nnx_state(want_model))
  for name in ("cn.safetensors", "bare.safetensors"):
    single = load_controlnet(tmp_path / name)
    got = flat_params(nnx_state(single))
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    assert single.config == want_model.config, name


def test_repo_id_is_found_in_the_local_hf_cache(saved_unet, tmp_path, monkeypatch):
  import shutil

  import huggingface_hub.constants

  from uir_jax.convert.sd import load_unet

  repo = tmp_path / "hub" / "models--someone--tiny-sd"
  shutil.copytree(saved_unet, repo / "snapshots" / ("a" * 40) / "unet")
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("a" * 40)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert load_unet("someone/tiny-sd").config.block_out_channels == (32, 64)
  with pytest.raises(FileNotFoundError, match="not-cached/model.*nothing is downloaded"):
    load_unet("not-cached/model")

"""diffusers `config.json` dicts -> validated, normalised configs for the SD networks.

Each reader takes the dict diffusers writes (`UNet2DConditionModel`, `AutoencoderKL`,
`ControlNetModel`), fills diffusers' defaults for absent keys, turns per-block values into tuples
and refuses, naming the key, every setting that changes the architecture in a way we do not
implement (SDXL's added embeddings, class embeddings, scale-shift time conditioning, ...), so a
config of another model family fails at once instead of producing a different network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Keys diffusers writes that do not change the network we build.
_METADATA = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
             "sample_size", "dropout", "force_upcast")


class ConfigError(ValueError):
  """A diffusers config this package cannot build: names the key and the value."""


def _per_block(value: Any, n: int, key: str) -> tuple:
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != n:
      raise ConfigError(f"config key {key!r} has {len(value)} entries for {n} blocks: {value!r}")
    return tuple(value)
  return (value,) * n


def _check(cfg: Mapping[str, Any], cls: str, defaults: Mapping[str, Any],
           fixed: Mapping[str, Any]) -> dict[str, Any]:
  """Defaults filled, unknown keys refused, keys of `fixed` required at their only value."""
  name = cfg.get("_class_name", cls)
  if name != cls:
    raise ConfigError(f"this is a {name} config, not a {cls} config (_class_name={name!r})")
  out = dict(defaults)
  for key, value in cfg.items():
    if key in _METADATA:
      continue
    if key in fixed:
      allowed = fixed[key]
      allowed = allowed if isinstance(allowed, tuple) else (allowed,)
      if value not in allowed and not (isinstance(value, list) and tuple(value) in allowed):
        raise ConfigError(f"{cls} config key {key}={value!r} is not supported (only "
                          f"{' or '.join(repr(a) for a in allowed)}): not an SD 1.x/2.x network")
      continue
    if key not in defaults:
      raise ConfigError(f"unknown {cls} config key {key!r} (value {value!r})")
    out[key] = value
  return out


# Architecture settings of UNet2DConditionModel / ControlNetModel we do not implement, with the only
# value(s) accepted. SDXL sets addition_embed_type="text_time"; SD 2.x-unclip sets class_embed_type.
_UNET_FIXED = {
    "center_input_sample": False, "only_cross_attention": (False, None),
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64, "act_fn": ("silu", "swish"),
}

_UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1.0, "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "use_linear_projection": False, "upcast_attention": False, "time_embedding_dim": None,
}

_CONTROLNET_DEFAULTS = {
    **{k: v for k, v in _UNET_DEFAULTS.items() if k not in ("out_channels", "up_block_types")},
    "conditioning_channels": 3, "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": (16, 32, 96, 256), "global_pool_conditions": False,
}
_CONTROLNET_FIXED = {k: v for k, v in _UNET_FIXED.items()
                     if k not in ("center_input_sample", "reverse_transformer_layers_per_block",
                                  "dual_cross_attention", "resnet_skip_time_act",
                                  "resnet_out_scale_factor", "time_embedding_type",
                                  "time_embedding_dim", "time_embedding_act_fn",
                                  "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel",
                                  "conv_out_kernel", "attention_type", "class_embeddings_concat",
                                  "mid_block_only_cross_attention", "cross_attention_norm")}

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """UNet2DConditionModel (and ControlNetModel encoder) settings, one entry per block.

  `heads[i]` is diffusers' legacy `attention_head_dim[i]`: the number of heads (SD 1.5: 8; SD 2.x:
  (5, 10, 20, 20), i.e. 64 channels per head); each attention's head size is channels // heads.
  """

  in_channels: int
  out_channels: int
  flip_sin_to_cos: bool
  freq_shift: float
  down_block_types: tuple[str, ...]
  mid_block_type: str | None
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  downsample_padding: int
  mid_block_scale_factor: float
  norm_num_groups: int
  norm_eps: float
  cross_attention_dim: tuple[int, ...]
  transformer_layers_per_block: tuple[int, ...]
  heads: tuple[int, ...]
  use_linear_projection: bool
  upcast_attention: bool
  time_embed_dim: int
  # ControlNet only.
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
  conditioning_channel_order: str = "rgb"
  global_pool_conditions: bool = False

  def to_diffusers(self, cls: str = "UNet2DConditionModel") -> dict[str, Any]:
    """The diffusers config dict of this network (`ControlNetModel` adds its own keys)."""
    d = dict(
        in_channels=self.in_channels, flip_sin_to_cos=self.flip_sin_to_cos,
        freq_shift=self.freq_shift, down_block_types=list(self.down_block_types),
        mid_block_type=self.mid_block_type, block_out_channels=list(self.block_out_channels),
        layers_per_block=list(self.layers_per_block), downsample_padding=self.downsample_padding,
        mid_block_scale_factor=self.mid_block_scale_factor, norm_num_groups=self.norm_num_groups,
        norm_eps=self.norm_eps, cross_attention_dim=list(self.cross_attention_dim),
        transformer_layers_per_block=list(self.transformer_layers_per_block),
        attention_head_dim=list(self.heads), use_linear_projection=self.use_linear_projection,
        upcast_attention=self.upcast_attention)
    if cls == "ControlNetModel":
      d.update(conditioning_channels=self.conditioning_channels,
               conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
               controlnet_conditioning_channel_order=self.conditioning_channel_order,
               global_pool_conditions=self.global_pool_conditions)
    else:
      d.update(out_channels=self.out_channels, up_block_types=list(self.up_block_types),
               time_embedding_dim=self.time_embed_dim)
    return d


def unet_config(cfg: Mapping[str, Any] | UNetConfig, cls: str = "UNet2DConditionModel"
                ) -> UNetConfig:
  """Validates a diffusers UNet2DConditionModel (or, with `cls`, ControlNetModel) config dict."""
  if isinstance(cfg, UNetConfig):
    return cfg
  controlnet = cls == "ControlNetModel"
  c = _check(cfg, cls, _CONTROLNET_DEFAULTS if controlnet else _UNET_DEFAULTS,
             _CONTROLNET_FIXED if controlnet else _UNET_FIXED)
  down = tuple(c["down_block_types"])
  up = () if controlnet else tuple(c["up_block_types"])
  n = len(down)
  channels = tuple(int(x) for x in c["block_out_channels"])
  if len(channels) != n or (not controlnet and len(up) != n):
    raise ConfigError(f"{cls}: block_out_channels {channels}, down_block_types {down} and "
                      f"up_block_types {up} must have the same length")
  for t in down:
    if t not in _DOWN:
      raise ConfigError(f"{cls}: down block type {t!r} is not supported (only {_DOWN})")
  for t in up:
    if t not in _UP:
      raise ConfigError(f"{cls}: up block type {t!r} is not supported (only {_UP})")
  if c["mid_block_type"] not in ("UNetMidBlock2DCrossAttn", None):
    raise ConfigError(f"{cls}: mid_block_type {c['mid_block_type']!r} is not supported "
                      "(only 'UNetMidBlock2DCrossAttn' or None)")
  heads = tuple(int(h) for h in _per_block(c["attention_head_dim"], n, "attention_head_dim"))
  for ch, h, t in zip(channels, heads, down, strict=True):
    if t.startswith("CrossAttn") and ch % h:
      raise ConfigError(f"{cls}: {ch} channels do not split into attention_head_dim={h} heads")
  groups = int(c["norm_num_groups"])
  if any(ch % groups for ch in channels):
    raise ConfigError(f"{cls}: block_out_channels {channels} are not multiples of "
                      f"norm_num_groups={groups}")
  order = c.get("controlnet_conditioning_channel_order", "rgb")
  if order not in ("rgb", "bgr"):
    raise ConfigError(f"{cls}: unknown controlnet_conditioning_channel_order {order!r}")
  return UNetConfig(
      in_channels=int(c["in_channels"]), out_channels=int(c.get("out_channels", c["in_channels"])),
      flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
      down_block_types=down, mid_block_type=c["mid_block_type"], up_block_types=up,
      block_out_channels=channels,
      layers_per_block=tuple(int(x) for x in _per_block(c["layers_per_block"], n,
                                                        "layers_per_block")),
      downsample_padding=int(c["downsample_padding"]),
      mid_block_scale_factor=float(c["mid_block_scale_factor"]), norm_num_groups=groups,
      norm_eps=float(c["norm_eps"]),
      cross_attention_dim=tuple(int(x) for x in _per_block(c["cross_attention_dim"], n,
                                                           "cross_attention_dim")),
      transformer_layers_per_block=tuple(
          int(x) for x in _per_block(c["transformer_layers_per_block"], n,
                                     "transformer_layers_per_block")),
      heads=heads, use_linear_projection=bool(c["use_linear_projection"]),
      upcast_attention=bool(c["upcast_attention"]),
      time_embed_dim=int(c.get("time_embedding_dim") or 4 * channels[0]),
      conditioning_channels=int(c.get("conditioning_channels", 3)),
      conditioning_embedding_out_channels=tuple(
          int(x) for x in c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
      conditioning_channel_order=order,
      global_pool_conditions=bool(c.get("global_pool_conditions", False)))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL settings."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # diffusers' `tile_sample_min_size` for tiled encode/decode (no effect on the network).
  sample_size: int = 32


_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def vae_config(cfg: Mapping[str, Any] | VAEConfig) -> VAEConfig:
  """Validates a diffusers AutoencoderKL config dict."""
  if isinstance(cfg, VAEConfig):
    return cfg
  c = _check(cfg, "AutoencoderKL", _VAE_DEFAULTS, {"act_fn": ("silu", "swish")})
  channels = tuple(int(x) for x in c["block_out_channels"])
  for key, want in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(c[key])
    if len(types) != len(channels) or any(t != want for t in types):
      raise ConfigError(f"AutoencoderKL config key {key}={list(types)!r}: expected "
                        f"{len(channels)} x {want!r}")
  if c["latents_mean"] is not None or c["latents_std"] is not None:
    raise ConfigError("AutoencoderKL config keys latents_mean/latents_std are not supported "
                      "(not an SD 1.x/2.x VAE)")
  if any(ch % int(c["norm_num_groups"]) for ch in channels):
    raise ConfigError(f"AutoencoderKL: block_out_channels {channels} are not multiples of "
                      f"norm_num_groups={c['norm_num_groups']}")
  sample = cfg.get("sample_size", 32)
  return VAEConfig(
      in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
      block_out_channels=channels, layers_per_block=int(c["layers_per_block"]),
      latent_channels=int(c["latent_channels"]), norm_num_groups=int(c["norm_num_groups"]),
      scaling_factor=float(c["scaling_factor"]),
      shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
      use_quant_conv=bool(c["use_quant_conv"]), use_post_quant_conv=bool(c["use_post_quant_conv"]),
      mid_block_add_attention=bool(c["mid_block_add_attention"]),
      sample_size=int(sample[0] if isinstance(sample, Sequence) else sample))

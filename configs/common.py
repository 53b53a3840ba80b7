"""Pieces every experiment config shares. Each experiment file calls `base(...)` and sets what
differs; every field a user may override (`--config.a.b=v`) is declared here or there, and the
code reads no undeclared field.

Top-level fields (see `base`):
  trainer            which stage trains: "irsde" | "nafnet" (`uir_jax.train.TRAINERS`)
  seed               one seed for the model init, the data stream and every step's randomness
  total_steps        optimizer steps of the whole run (the cosine schedule ends there); -1: from
                     `num_epochs` and the size of the training set
  batch_size         the global batch (split over all devices and hosts)
  dtype              compute dtype, "float32" | "bfloat16" (parameters stay float32)
  mesh               (data, fsdp) device mesh sizes, one may be -1 (= the rest): (-1, 1) is pure
                     data parallelism, (-1, 8) shards parameters over groups of 8 devices
  fsdp_min_size      parameters (and their optimizer state / EMA) of at least this many elements
                     are sharded along `fsdp`; smaller ones are replicated
  strategy           "jit" (one program over the mesh; any mesh) | "pmap" (pure data parallel)
  init_from          "" or a weights file (PyTorch .pth or its .safetensors): parameters only,
                     used when the workdir has no checkpoint yet
  trust_checkpoint   False: PyTorch files (init_from, daclip.checkpoint, clip.checkpoint) are read
                     as data only and a pickle that asks for more is refused; True (or `uir-jax
                     train --trust_checkpoint`) loads it with plain pickle, which RUNS CODE FROM
                     THE FILE: only for files whose source you trust
  ema_decay          EMA of the parameters (the evaluated weights)
  loss               the stage's loss ("l1" | "l2" for irsde, "l1" | "psnr" for nafnet)
  log_every, eval_every, checkpoint_every, keep_checkpoints, eval_batch
  distributed        coordinator_address / num_processes / process_id / local_device_ids: set to
                     start several processes by hand; empty = read a TPU pod / SLURM environment
  data               the input pipeline (`data_config`)
  optimizer          AdamW + warmup + cosine (`optimizer_config`)
  daclip.checkpoint  "" (unconditioned), a DA-CLIP file (.pt / .safetensors), or "random:tiny"
  daclip.windows     False: DA-CLIP reads the pipeline's CLIP view; True: its embeddings are
                     averaged over full-resolution CLIP-size windows tiling the LQ (a small CLIP
                     trained on `clip_view="crop"` centres then sees the whole image)
"""

from __future__ import annotations

import ml_collections

# The ten degradation folders of the universal set (spec §3.2), in the reference's order.
UNIVERSAL_TASKS = ("motion-blurry", "hazy", "jpeg-compressed", "low-light", "noisy",
                   "raindrop", "rainy", "shadowed", "snowy", "uncompleted")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"tiny" or "tiny=True,foo=3" -> ConfigDict of the declared variant options (unknown: error)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown variant {key!r} (expected one of {sorted(defaults)})")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("", "1", "true", "yes")) if kind is bool else kind(value)
  return out


def data_config(source: str, **overrides) -> ml_collections.ConfigDict:
  """Every field `input_pipeline.pipelines.from_config` / `readers.source_from_config` read."""
  d = ml_collections.ConfigDict()
  d.source = source  # quickstart | folder | universal | csv
  d.root = ""  # folder / universal: the data root
  d.csv_path = ""  # csv: DA-CLIP's captions file
  d.captions = ""  # folder: optional JSON {relative path: caption} (DA-CLIP on clean photos)
  d.holdout = ()  # quickstart: names of photos that form the evaluation split, never trained on
  d.eval_augment = False  # evaluate on a training-like batch (random crops) of the eval split
  d.split = "train"  # universal: the training split folder
  d.val_split = "val"
  d.val_root = ""  # folder: held-out clean images ("" = the training folder's eval order)
  d.val_csv_path = ""
  d.match_names = True  # universal: pair LQ and GT by file name
  d.validate = True  # scan every file once before training; skip and count bad ones
  d.memory_budget = 256 << 20  # bytes of decoded images a source may cache
  d.patch_size = 256
  d.gray_prob = 0.0  # unpaired sources: probability of a grayscale GT (wild-IR: 0.1)
  d.use_flip = True
  d.use_rot = True
  d.clip_lq = False  # add the 224² CLIP view of the LQ (DA-CLIP-conditioned models need it)
  # unpaired sources: the degradation chain (an input_pipeline.registry name, or a spec)
  d.chain = overrides.pop("chain", "wild")
  # ... or a mixture of named tasks ((name, chain spec), ...): one per example, its name the
  # example's degradation text (a synthetic universal set from clean photos)
  d.tasks = ()
  d.clip_gt = False  # add the CLIP view of the GT (DA-CLIP's robust term)
  d.clip_size = 224  # side of the CLIP views: the CLIP's input size (224 for released models)
  d.clip_view = "resize"  # the reference's resize of the patch, or "crop": its full-res centre
  d.degrade_probs = ml_collections.ConfigDict()  # overrides of the chain's parameters
  d.update(overrides)
  return d


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """AdamW with linear warmup then cosine annealing to `end_lr` (spec §8.1: no warmup)."""
  o = ml_collections.ConfigDict(dict(lr=2e-4, end_lr=1e-6, warmup_steps=0, b1=0.9, b2=0.99,
                                     eps=1e-8, weight_decay=0.0, grad_clip=0.0))
  o.update(overrides)
  return o


def sde_config() -> ml_collections.ConfigDict:
  """The released models' SDE (spec §8.1)."""
  return ml_collections.ConfigDict(dict(max_sigma=50.0, T=100, schedule="cosine", eps=0.005))


def eval_config(mode: str = "posterior", num_steps: int | None = None,
                clip_x0: bool = False) -> ml_collections.ConfigDict:
  """IR-SDE evaluation sampler: mode, network calls (None: T), and x̂₀ clamping."""
  e = ml_collections.ConfigDict()
  e.mode = mode
  e.num_steps = ml_collections.config_dict.placeholder(int)
  e.num_steps = num_steps
  e.clip_x0 = clip_x0
  return e


def unet_config(**overrides) -> ml_collections.ConfigDict:
  """The released ConditionalUNet (daclip-sde `train.yml`, spec §4.1, §8.1)."""
  m = ml_collections.ConfigDict(dict(name="unet", in_nc=3, out_nc=3, nf=64, ch_mult=(1, 2, 4, 8),
                                     context_dim=512, use_degra_context=True,
                                     use_image_context=True, scale=1.0))
  m.update(overrides)
  return m


def nafnet_config(**overrides) -> ml_collections.ConfigDict:
  """Direct-regression NAFNet (NAFNet-width32 layout of Chen et al. 2022 by default)."""
  m = ml_collections.ConfigDict(dict(name="nafnet", img_channel=3, width=32, middle_blk_num=12,
                                     enc_blk_nums=(2, 2, 4, 8), dec_blk_nums=(2, 2, 2, 2),
                                     context_dim=512, use_degra_context=True,
                                     use_image_context=True, norm="layernorm2d"))
  m.update(overrides)
  return m


def clip_config(arch: str, exact_noop_start: bool) -> ml_collections.ConfigDict:
  """The CLIP a DA-CLIP controller is trained on: `arch` ("ViT-B-32" | "ViT-L-14" | "tiny" |
  "tiny-p4"), the weights file (`checkpoint`: open_clip / OpenAI / Hugging Face;
  "random:<arch>" for tests and the quickstart), and the controller's start: the reference's
  initialisation quirk, or the exact no-op (`exact_noop_start`: content features equal the plain
  CLIP's at step 0)."""
  return ml_collections.ConfigDict(dict(arch=arch, checkpoint="",
                                        exact_noop_start=exact_noop_start))


def daclip_loss_config(robust: bool, distinct_texts: bool = False) -> ml_collections.ConfigDict:
  """DA-CLIP loss options (see uir_jax/systems/daclip_uir/daclip.py): `distinct_texts` counts
  each distinct degradation text of a batch once in the degradation term (False: the reference's
  InfoNCE, a text repeated n_c times enters the softmax n_c times); `robust` adds the wild
  paper's L1 term, weighted by `robust_weight`."""
  return ml_collections.ConfigDict(dict(distinct_texts=distinct_texts, robust=robust,
                                        robust_weight=1.0))


def daclip_eval_config(words) -> ml_collections.ConfigDict:
  """Zero-shot degradation classification over `words` (the texts the evaluation scores)."""
  return ml_collections.ConfigDict(dict(words=tuple(words)))


# Held-out quickstart photos (textured, so few flat crops) for the runs that evaluate on photos
# training never saw.
QUICKSTART_HOLDOUT = ("chelsea", "coffee")

# Distinguishable synthetic degradations of clean photos, named with the universal set's words
# where they match (spec §3.2): the quickstart's set and the DA-CLIP tests' data.
SYNTHETIC_TASKS = (
    ("noisy", [{"op": "gaussian_noise", "sigma_range": [15.0, 35.0], "gray_prob": 0.0}]),
    ("blurry", [{"op": "blur", "max_radius": 5, "sinc_prob": 0.0, "deblur_prob": 0.0,
                 "blur_range": [1.5, 3.0]}]),
    ("jpeg-compressed", [{"op": "jpeg", "quality_range": [8, 20]}]),
    ("low-light", [{"op": "low_light", "gamma_range": [1.2, 1.8], "gain_range": [0.5, 0.8]}]),
    ("hazy", [{"op": "haze"}]),
    ("low-resolution", [{"op": "resize", "scale_range": [2.5, 4.0]},
                        {"op": "resize", "size": "input"}]),
)


def base(trainer: str) -> ml_collections.ConfigDict:
  """The fields every experiment has (see the module docstring), at the paper's values."""
  c = ml_collections.ConfigDict()
  c.trainer = trainer
  c.seed = 0
  c.total_steps = 700_000
  c.num_epochs = 0  # with total_steps = -1: that many passes over the training set instead
  c.batch_size = 16
  c.dtype = "float32"
  c.mesh = (-1, 1)
  c.fsdp_min_size = 2**18
  c.strategy = "jit"
  c.init_from = ""
  c.trust_checkpoint = False
  c.ema_decay = 0.995
  c.loss = "l1"
  c.log_every = 100
  c.eval_every = 10_000
  c.eval_batch = 16
  c.checkpoint_every = 10_000
  c.keep_checkpoints = 3
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1,
                                                 process_id=0, local_device_ids=()))
  c.daclip = ml_collections.ConfigDict(dict(checkpoint="", windows=False))
  c.optimizer = optimizer_config()
  return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:tiny` part every experiment shares: a few steps on the embedded photos, 32² crops,
  batch 8 (divisible by the 8 fake devices the tests use), a random tiny DA-CLIP if any."""
  c.total_steps = 4
  c.batch_size = 8
  c.eval_batch = 8
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 3
  c.data.source = "quickstart"
  c.data.root = ""
  c.data.patch_size = 32
  c.data.clip_size = 32  # the tiny CLIP's input size
  if c.daclip.checkpoint:
    c.daclip.checkpoint = "random:tiny"
    c.model.context_dim = 64  # the tiny CLIP's embedding width
  return c


# ---- TextualDegRemoval's guided restoration (trainer "tdr") ------------------------------------

def guided_data_config(source: str, **overrides) -> ml_collections.ConfigDict:
  """`data_config` plus the guided-restoration fields (`input_pipeline.guidance`):
  guidance_root       a folder of guidance images, one per photo under the photo's key (its path
                      relative to the photo folder without the extension; `<degradation>/<stem>`
                      in the ten-task layout), its `<split>/` subfolder if present; photos
                      without one are skipped and counted
  synthetic_guidance  > 0: no files, each GT's centre square at this side is its guidance (tests)
  lq_folder, gt_folder  the "paired" source's folder names under `root/<split>/`
  """
  d = data_config(source)
  d.guidance_root = ""
  d.synthetic_guidance = 0
  d.lq_folder = "LQ"
  d.gt_folder = "GT"
  d.update(overrides)
  return d


def guided_optimizer_config(lr: float, guidance_lr: float) -> ml_collections.ConfigDict:
  """The paper's AdamW + cosine with separate initial rates for the backbone (`lr`) and the
  guidance module (`guidance_lr`); betas, weight decay and the final rate as the released
  YAMLs (0.9 / 0.999, 1e-4, eta_min 1e-6). No gradient clipping (the YAMLs' 0.01 global norm is
  not in the paper; set `grad_clip` to use one)."""
  o = optimizer_config(lr=lr, end_lr=1e-6, b2=0.999, weight_decay=1e-4)
  o.guidance_lr = guidance_lr
  return o


def guided_nafnet_config(width: int, fusion: str) -> ml_collections.ConfigDict:
  """The paper's guided NAFNet (`002_nafnet_single_image_motion_deblurring.yml`, spec §1.7 (f)):
  NAFNet [1, 1, 1, 28] / 1 / [1, 1, 1, 1] of `width`, a matching encoder of the same width with
  4 residual blocks per level, 2 fusion blocks per encoder level and 1 at the bottleneck;
  `fusion`: "encoder+bottleneck" (the code) or "encoder+decoder" (the paper's best, Table 10)."""
  return ml_collections.ConfigDict(dict(
      arch="nafnet", img_channel=3, width=width, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 28),
      dec_blk_nums=(1, 1, 1, 1), nf=width, ext_n_blocks=(4, 4, 4, 4),
      reffusion_n_blocks=(2, 2, 2, 2), reffusion_n_blocks_middle=1, lr_block_size=8,
      ref_down_block_size=1.5, dilations=(1, 2, 3), fusion=fusion))


def guided_restormer_config(arch: str, fusion: str) -> ml_collections.ConfigDict:
  """The paper's Restormer / PromptIR backbone (suppl.: 8 stages, blocks [4, 6, 6, 8] and 4
  refinement blocks, width 48, heads [1, 2, 4, 8]; Restormer's GDFN 2.66, bias-free convs,
  WithBias norms) with a matching encoder of width 48 (4 residual blocks per level) and one
  fusion block per fusion point (the code's `RestormerRefFusion`)."""
  m = ml_collections.ConfigDict(dict(
      arch=arch, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
      num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False,
      layernorm_type="WithBias", nf=48, ext_n_blocks=(4, 4, 4, 4),
      reffusion_n_blocks=(1, 1, 1, 1), lr_block_size=8, ref_down_block_size=1.5,
      dilations=(1, 2, 3), fusion=fusion))
  if arch == "promptir":  # the released all-in-one prompts
    m.prompt_dims, m.prompt_sizes, m.prompt_len = (64, 128, 320), (64, 32, 16), 5
  return m


def shrink_guided_restormer(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tests' guided Restormer / PromptIR: width 8, one block everywhere, small prompts."""
  m.dim = m.nf = 8
  m.num_blocks = m.ext_n_blocks = m.reffusion_n_blocks = (1, 1, 1, 1)
  m.num_refinement_blocks, m.heads = 1, (1, 1, 1, 1)
  if m.arch == "promptir":
    m.prompt_dims, m.prompt_sizes, m.prompt_len = (8, 16, 24), (12, 6, 5), 3
  return m


def shrink_guided_nafnet(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tests' guided NAFNet: width 8, one block everywhere."""
  m.width = m.nf = 8
  m.enc_blk_nums = m.dec_blk_nums = m.ext_n_blocks = m.reffusion_n_blocks = (1, 1, 1, 1)
  m.middle_blk_num = m.reffusion_n_blocks_middle = 1
  return m


def shrink_guided_for_tests(c: ml_collections.ConfigDict,
                            tasks: tuple = ()) -> ml_collections.ConfigDict:
  """The `:tiny` part of every tdr config: `shrink_for_tests` on the embedded photos (two held
  out for evaluation), synthetic guidance and the degradation `tasks` ((name, chain spec), ...)
  on the fly; each config shrinks its own network."""
  shrink_for_tests(c)
  c.data.holdout = QUICKSTART_HOLDOUT
  c.data.synthetic_guidance = 128
  c.data.guidance_root = ""
  c.data.tasks = tasks
  return c

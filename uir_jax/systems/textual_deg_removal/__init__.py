"""TextualDegRemoval (Lin et al., CVPR 2024): guided restoration (the image half).

A restoration network is steered by a guidance image (generated offline by Stable Diffusion in
the paper; any image serves here) through coarse-to-fine feature matching (paper §3.3, Eq. 4):

  * `guidance.py`: the shared matching encoder, coarse block search, fine 3x3 patch search,
    soft attention and transfer of the guidance to every scale;
  * `guided_nafnet.py` (`GuidedNAFNet`), `guided_restormer.py` (`GuidedRestormer`,
    `GuidedPromptIR`): the backbones with fusion blocks;
  * `networks.py`: `build_guided(arch, **options)`, `ARCHS`, `FUSIONS`;
  * `convert.py`: `load_guided(path)` from the official fusion checkpoints.

Design note (facts: mrluin/TextualDegRemoval@e755c39, `sd_systems_spec.md` §1.7-1.10).

Follows the paper: the backbones (NAFNet, Restormer, PromptIR), MASA-style matching with one
encoder shared by photo and guidance (width = backbone width, one stage per downsampling),
coarse block size 8, dilations (1, 2, 3), fine patch size 3, fusion by concatenation + blocks
with a scale α (Eq. 4); `fusion="encoder+decoder"`, the paper's best ablation (Table 10, 31.57
dB vs 31.37 for the encoder alone), is offered although the code has no decoder fusion (D1): we
fuse G_l before each decoder level's blocks, after the skip merge, with the fusion block of
that backbone at that width, on top of the code's points.

Follows the code: everything the paper leaves open. Padding to multiples of 128 (NAFNet) or 64
(Restormer family) before matching, the guidance-block diameter rule (ref_down_block_size 1.5),
top-1 everywhere, soft attention = the top-1 cosine; fusion points: NAFNet encoder levels 0-3 +
middle (NAFBlocks of width 2c, first c channels kept), Restormer / PromptIR before
encoder_level1-3 + latent (a Restormer block of width 2c with a scalar α: α·T(z) + z, first c
kept); α is learnable and zero-initialised (D2: per-channel β/γ in NAFNet's blocks, a scalar in
the Restormer family), so at init each network IS its plain backbone and pretrained backbone
weights are a valid start. PromptIR is the released decoder=True model. Parameter names are the
code's, so the converter is a key map.

Bugs of the code fixed here (the tests' PyTorch copies carry the same fixes, marked):
  * B6: NAFNet's middle fusion is built with `reffusion_n_blocks[4]` (IndexError);
    `reffusion_n_blocks_middle` is used.
  * B7: the Restormer-family forward indexes `feat_lq[4]`, `feat_ref[4..1]` of a 4-level encoder
    (IndexError; levels off by one); the deepest level is 3 and the transfers use levels 3..0.
  * B8: the x16 level's batch index uses d_y twice (crash whenever d_x != d_y, e.g. non-square
    photos); d_x and d_y are used where they belong, so any photo size runs.
  * A guidance block larger than the guidance map (a photo of one block row/column) makes the
    code index outside the map (negative indices wrap); the block is shrunk to fit, which
    changes nothing where the code works.
B9 (parameter freezing never happens) belongs to the trainer; B1-B5, B10, B11 concern the text
half, the evaluation script and SFNet, not built here.
"""

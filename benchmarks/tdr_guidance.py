"""Is TextualDegRemoval's guidance really used? (issue 24, "must show").

A tiny GuidedNAFNet is trained on synthetic reference-based restoration, the setting the MASA
matcher was built for: the LQ keeps the coarse structure (so the coarse search at /16 can find
the right place) but has lost the fine detail that the guidance holds.

  * Images (`textures`): a smooth random colour field (cubic-interpolated normals on a 16-px
    lattice, x 0.3, around 0.5) plus fine grey texture (uniform ±0.15 on 2 x 2-px cells), clipped
    to [0, 1]; the LQ is the image ×4 down-sampled (antialiased bilinear) and up-sampled again
    (bilinear): the colour field survives, the texture does not.
  * Photo = the centre 64² crop of a 128² scene; guidance = the whole 128² scene (the photo's
    surroundings too, as a reference image would hold them). With lr_block_size 4 the photo is one
    block of 4 x 4 cells at /16; the guidance map is 8 x 8 cells, the searched block 7 x 7 cells,
    the fine search 5 x 5 positions (chance 1/25 per cell). The photo sits 2 cells in, so every
    photo cell has its true guidance cell inside the block (with a guidance of the photo's own
    size the border cells could never be matched: the block stays inside the guidance map).
  * The tiny net (`TINY`): width 8, no NAFNet blocks (enc/middle/dec 0), no residual blocks in
    the matching encoder, one fusion NAFBlock per level and in the middle, coarse-search dilation
    1 only (dilations (1, 2) matched fewer cells at initialisation: 36 % vs 55 % on average over
    8 seeds; dilation 3 does not fit a 4-cell block, see below).
  * Trained with the GT scene as guidance (L1, Adam); evaluated on held-out scenes with
    guidance = GT scene and guidance = LQ scene (the same network, the same photo): the gap is
    what the guidance's content adds.
  * `--matchers random`: coarse and fine indices drawn at random (soft attention = the cosine of the
    drawn pair) in training and evaluation, by swapping `guidance.coarse_search` / `fine_search`
    for random ones (`random_matcher()`); no production option. Its gap is what the guidance adds
    without matching.
  * Matching accuracy: the share of photo cells whose fine match (LQ photo vs GT guidance) is
    their true guidance cell, at initialisation and after training.

The matching encoder (`masa_enc`) trains at `--encoder-lr` (default 2e-4, a tenth of `--lr`;
0 freezes it), everything else at `--lr`. At the fusion's rate, in runs this short, the encoder
learns to pass the guidance's texture on and its /16 features of the textured GT and the smooth LQ
drift apart: matching falls from 52-82 % to 18-20 % of the cells and the gap to 0.8-1.0 dB; at a
tenth of it matching improves for seeds whose random encoder matched poorly (RESULTS.md,
"Issue 24"). How well a random encoder matches depends on its seed (52-82 % for seeds 0-2).

  python benchmarks/tdr_guidance.py          # learned and random matcher, seeds 0-2, 150 steps
  python benchmarks/tdr_guidance.py --encoder-lr 2e-3 --matchers learned

Prints JSON lines: one per (matcher, seed) with psnr_lq_input, psnr_gt_guided, psnr_lq_guided,
gap_db, match_acc_init, match_acc, steps, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uir_jax.systems.textual_deg_removal import guidance as guidance_mod
from uir_jax.systems.textual_deg_removal.guided_nafnet import GuidedNAFNet

PHOTO, SCENE = 64, 128  # photo = the centre PHOTO² crop of a SCENE² scene (the guidance)
OFFSET = (SCENE - PHOTO) // 2  # 32 px = 2 cells at /16
TINY = dict(width=8, enc_blk_nums=(0, 0, 0, 0), dec_blk_nums=(0, 0, 0, 0), middle_blk_num=0,
            ext_n_blocks=(0, 0, 0, 0), reffusion_n_blocks=(1, 1, 1, 1),
            reffusion_n_blocks_middle=1, lr_block_size=4, dilations=(1,))


def textures(rng: np.random.Generator, n: int, side: int = SCENE, *, colour: float = 0.3,
             texture: float = 0.15, grain: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """n scenes: (GT, LQ), float32 [n, side, side, 3] in [0, 1] (module docstring)."""
  cell, m = 16, side // 16 + 3
  lattice = jnp.asarray(rng.normal(size=(n, m, m, 3)), jnp.float32)
  field = jax.image.resize(lattice, (n, m * cell, m * cell, 3), "cubic")[:, cell:cell + side,
                                                                         cell:cell + side]
  fine = rng.uniform(-texture, texture, size=(n, side // grain, side // grain, 1))
  fine = np.repeat(np.repeat(fine.astype(np.float32), grain, axis=1), grain, axis=2)
  gt = np.clip(0.5 + colour * np.asarray(field) + fine, 0, 1)
  small = jax.image.resize(jnp.asarray(gt), (n, side // 4, side // 4, 3), "linear", antialias=True)
  lq = np.clip(np.asarray(jax.image.resize(small, gt.shape, "linear")), 0, 1)
  return gt, lq


def crop(x: np.ndarray) -> np.ndarray:
  return x[:, OFFSET:OFFSET + PHOTO, OFFSET:OFFSET + PHOTO]


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
  """Mean over images of the PSNR (peak 1) of the clipped prediction."""
  mse = np.mean((np.clip(pred, 0, 1) - target) ** 2, axis=(1, 2, 3))
  return float(np.mean(-10 * np.log10(mse)))


# --- the broken matcher ----------------------------------------------------------------------

def _key_of(x: jax.Array) -> jax.Array:
  """A PRNG key that changes with the batch (traced: the draws differ from call to call)."""
  s = jnp.sum(jax.lax.stop_gradient(x)).astype(jnp.float32)
  return jax.random.key(jax.lax.bitcast_convert_type(s, jnp.uint32))


def _random_coarse(where, search):
  def coarse(blocks, f5_ref, g, dilations=(1, 2, 3)):
    index = search(blocks, f5_ref, g, dilations)
    n, hr, wr = f5_ref.shape[:3]
    drawn = jax.random.randint(_key_of(blocks), (n, g.py * g.px), 0, hr * wr)
    return jnp.where(where, drawn, index)
  return coarse


def _random_fine(where, search):
  def fine(lq_blocks, ref_blocks):
    """As `fine_search`, the index drawn at random where `where`; soft_att its pair's cosine."""
    index, att = search(lq_blocks, ref_blocks)
    m, k = lq_blocks.shape[0], lq_blocks.shape[1] - 2
    q = guidance_mod._normalize(guidance_mod._patches3x3(lq_blocks)).reshape(m, k * k, -1)
    r = guidance_mod._normalize(guidance_mod._patches3x3(ref_blocks)).reshape(m, -1, q.shape[-1])
    corr = jnp.einsum("mqc,mrc->mqr", q, r)
    drawn = jax.random.randint(_key_of(ref_blocks), (m, k * k, 1), 0, corr.shape[-1])
    drawn_att = jnp.take_along_axis(corr, drawn, axis=-1)
    return (jnp.where(where, drawn.reshape(m, k, k), index),
            jnp.where(where, drawn_att.reshape(m, k, k), att))
  return fine


@contextlib.contextmanager
def random_matcher(where=True):
  """While active (including while a jitted function is traced), `match_and_transfer` draws its
  coarse and fine indices at random where `where` (a boolean, may be traced: one compiled
  function then serves both matchers) and keeps the real matcher's choices elsewhere."""
  saved = guidance_mod.coarse_search, guidance_mod.fine_search
  guidance_mod.coarse_search = _random_coarse(where, saved[0])
  guidance_mod.fine_search = _random_fine(where, saved[1])
  try:
    yield
  finally:
    guidance_mod.coarse_search, guidance_mod.fine_search = saved


# --- matching accuracy -----------------------------------------------------------------------

def matched_cells(net: GuidedNAFNet, lq: jax.Array, guide: jax.Array) -> tuple[jax.Array, ...]:
  """The guidance cell (y, x) at /16 that each photo cell's fine match is centred on, as
  `match_and_transfer` finds it: [N, H/16, W/16] each."""
  m = net.pad_multiple
  lq, guide = guidance_mod.pad_to(lq, m), guidance_mod.pad_to(guide, m)
  g = guidance_mod.geometry(lq.shape[1:3], guide.shape[1:3], lr_block_size=net.lr_block_size,
                            ref_down_block_size=net.ref_down_block_size)
  f5, f5_ref = net.masa_enc(lq)[-1], net.masa_enc(guide)[-1]
  n, hr, wr = f5_ref.shape[:3]
  blocks = guidance_mod._lq_blocks(f5, g)
  index = guidance_mod.coarse_search(blocks, f5_ref, g, net.dilations)
  y0 = guidance_mod._block_origin(index // wr, g.d_y, hr)
  x0 = guidance_mod._block_origin(index % wr, g.d_x, wr)
  fine, _ = guidance_mod.fine_search(blocks, guidance_mod._ref_blocks(f5_ref, y0, x0, g, 1))
  k = g.k
  cy = y0.reshape(n, g.py, g.px, 1, 1) + fine.reshape(n, g.py, g.px, k, k) // g.d_x + 1
  cx = x0.reshape(n, g.py, g.px, 1, 1) + fine.reshape(n, g.py, g.px, k, k) % g.d_x + 1
  to_map = lambda t: t.transpose(0, 1, 3, 2, 4).reshape(n, g.py * k, g.px * k)
  return to_map(cy), to_map(cx)


def accuracy(cy: np.ndarray, cx: np.ndarray, offset_cells: int) -> float:
  """Share of photo cells matched to their own guidance cell (the photo sits `offset_cells`
  cells into the guidance). Cells of the padding count too (none here: 64 px is a multiple)."""
  iy, ix = np.indices(cy.shape[1:])
  return float(np.mean((cy == iy + offset_cells) & (cx == ix + offset_cells)))


# --- the experiment --------------------------------------------------------------------------

class Experiment:
  """Tiny GuidedNAFNets trained with GT guidance, evaluated on held-out scenes. One compiled
  training step (and evaluation) serves both matchers: the matcher is a traced flag."""

  def __init__(self, *, batch: int = 4, lr: float = 2e-3, encoder_lr: float = 2e-4,
               n_eval: int = 32, eval_seed: int = 12345, compiler_options: dict | None = None,
               **options):
    """`options` override TINY; `compiler_options` go to XLA (the test's
    {"xla_backend_optimization_level": 0} compiles ~2.5x faster, runs ~1.3x slower)."""
    self.batch, self.lr, self.encoder_lr = batch, lr, encoder_lr
    self.config = dict(TINY, **options)
    graphdef, params = nnx.split(GuidedNAFNet(**self.config, rngs=nnx.Rngs(0)))
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "encoder" if any(getattr(k, "key", None) == "masa_enc" for k in path)
        else "rest", params)
    self.tx = tx = optax.multi_transform(
        {"encoder": optax.adam(encoder_lr) if encoder_lr else optax.set_to_zero(),
         "rest": optax.adam(lr)}, labels)
    net = lambda p: nnx.merge(graphdef, p)

    def step(p, o, lq, gt, guide, randomize):
      def loss_fn(p):
        with random_matcher(randomize):
          return jnp.mean(jnp.abs(net(p)(lq, guide) - gt))
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, o = tx.update(grads, o, p)
      return optax.apply_updates(p, updates), o, loss

    def evaluate(p, photo, gt_scene, lq_scene, randomize):
      with random_matcher(randomize):
        return (net(p)(photo, gt_scene), net(p)(photo, lq_scene),
                matched_cells(net(p), photo, gt_scene))

    gt_ev, lq_ev = textures(np.random.default_rng(eval_seed), n_eval)
    self.eval_batch = jnp.asarray(crop(lq_ev)), jnp.asarray(gt_ev), jnp.asarray(lq_ev)
    self.target = crop(gt_ev)
    self.psnr_input = psnr(crop(lq_ev), self.target)
    flag = jnp.asarray(False)
    photo = jax.ShapeDtypeStruct((batch, PHOTO, PHOTO, 3), jnp.float32)
    scene = jax.ShapeDtypeStruct((batch, SCENE, SCENE, 3), jnp.float32)
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), photo, photo, scene, flag).compile(compiler_options)
    self.evaluate = jax.jit(evaluate).lower(params, *self.eval_batch, flag).compile(
        compiler_options)

  def measure(self, params, randomize: bool) -> dict:
    out_gt, out_lq, (cy, cx) = self.evaluate(params, *self.eval_batch, randomize)
    p_gt, p_lq = psnr(np.asarray(out_gt), self.target), psnr(np.asarray(out_lq), self.target)
    return dict(psnr_gt_guided=round(p_gt, 3), psnr_lq_guided=round(p_lq, 3),
                gap_db=round(p_gt - p_lq, 3),
                match_acc=round(accuracy(np.asarray(cy), np.asarray(cx), OFFSET // 16), 3))

  def run(self, *, matcher: str = "learned", seed: int = 0, steps: int = 300) -> dict:
    """Trains from seed `seed` for `steps` steps with the given matcher; the held-out figures."""
    if matcher not in ("learned", "random"):
      raise ValueError(f"matcher must be 'learned' or 'random', got {matcher!r}")
    randomize = jnp.asarray(matcher == "random")
    params = nnx.state(GuidedNAFNet(**self.config, rngs=nnx.Rngs(seed)))
    opt = self.tx.init(params)
    acc_init = self.measure(params, randomize)["match_acc"]
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    loss = jnp.nan
    for _ in range(steps):
      gt, lq = textures(rng, self.batch)
      params, opt, loss = self.step(params, opt, jnp.asarray(crop(lq)), jnp.asarray(crop(gt)),
                                    jnp.asarray(gt), randomize)
    loss = float(loss)
    seconds = time.perf_counter() - t0
    return dict(matcher=matcher, seed=seed, psnr_lq_input=round(self.psnr_input, 3),
                **self.measure(params, randomize), match_acc_init=acc_init,
                final_loss=round(loss, 4), steps=steps, batch=self.batch, lr=self.lr,
                encoder_lr=self.encoder_lr, seconds=round(seconds, 1))

def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--encoder-lr", type=float, default=2e-4, help="0: frozen")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--matchers", nargs="+", default=["learned", "random"])
  ap.add_argument("--eval", type=int, default=32, help="held-out scenes")
  ap.add_argument("--fast-compile", action="store_true",
                  help="XLA backend optimisation level 0 (as the test)")
  args = ap.parse_args()
  from bench_util import device_name, emit

  t0 = time.perf_counter()
  exp = Experiment(batch=args.batch, lr=args.lr, encoder_lr=args.encoder_lr, n_eval=args.eval,
                   compiler_options={"xla_backend_optimization_level": 0}
                   if args.fast_compile else None)
  emit(name="tdr_guidance_compile", device=device_name(),
       seconds=round(time.perf_counter() - t0, 1))
  for matcher in args.matchers:
    for seed in args.seeds:
      emit(name="tdr_guidance", device=device_name(),
           **exp.run(matcher=matcher, seed=seed, steps=args.steps))


if __name__ == "__main__":
  main()

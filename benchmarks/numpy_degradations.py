"""NumPy/OpenCV reference of the wild-IR synthetic degradation chain (spec §7.2-7.4).

An independent implementation of the chain that `input_pipeline.degradations.random_degrade` runs in
TensorFlow: the same three shuffled stages, probabilities, kernel families and parameter ranges. It
serves as the per-core speed baseline for `benchmarks/input_pipeline.py` and as a statistical
cross-check of the TF ops (`tests/input_pipeline/test_numpy_degradations.py`).

Images are float32 HWC **RGB** in [0, 1] (the project's convention). The reference works on cv2's
BGR; the only colour-order-dependent steps (JPEG's YCbCr conversion, the gray Poisson noise) convert
accordingly, so an RGB image here sees exactly what its BGR twin sees there.

Deliberately left out (no data shipped with the reference code):
  * the `psf` kernel family (needs the pickled bank `data/psf.pkl`): its 0.03 probability is spread
    over the other families in proportion (the remaining probabilities are renormalised);
  * `under_display_filter` (needs `data/ucdpsf.pkl`): those branches leave the image unchanged.

  python benchmarks/numpy_degradations.py --num-examples 200     # examples/s on one core

Prints a JSON line: name, device, shape, value, unit.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import cv2
import numpy as np

DEGRADATION_WORDS = ("blur", "ringing artifact", "noise", "jpeg block")
_BLUR, _RINGING, _NOISE, _JPEG = range(4)

_RESIZE_MODES = (cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LINEAR)

# `predefined_mixed_kernel` family probabilities (spec §7.3); `psf` (0.03) is dropped and the rest
# renormalised because the PSF bank is not shipped.
_KERNEL_FAMILIES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                    "plateau_aniso", "defocus", "box", "line")
_KERNEL_PROBS = np.array([0.35, 0.20, 0.10, 0.03, 0.10, 0.03, 0.10, 0.03, 0.03])
_KERNEL_PROBS = _KERNEL_PROBS / _KERNEL_PROBS.sum()


# -------------------------------------------------------------------------------------------------
# Bessel J1 (sinc kernels)
# -------------------------------------------------------------------------------------------------

def _j1_integral(x: np.ndarray, num: int = 256) -> np.ndarray:
  """J1(x) = (1/π) ∫_0^π cos(τ − x sin τ) dτ; the midpoint rule on this periodic integrand
  converges geometrically once `num` exceeds |x|, and sinc kernels need |x| ≤ π·√2·9 < 41."""
  x = np.asarray(x, np.float64)
  tau = (np.arange(num) + 0.5) * (math.pi / num)  # midpoint rule: same accuracy, no end weights
  return np.cos(tau - x[..., None] * np.sin(tau)).mean(axis=-1)


try:  # scipy ships with scikit-image; the fallback keeps this file runnable without it.
  from scipy.special import j1 as bessel_j1
except ImportError:  # pragma: no cover
  bessel_j1 = _j1_integral


# -------------------------------------------------------------------------------------------------
# Kernels (spec §7.3). All are float64 [k, k] and sum to 1.
# -------------------------------------------------------------------------------------------------

def _grid(k: int) -> tuple[np.ndarray, np.ndarray]:
  ax = np.arange(k, dtype=np.float64) - (k - 1) / 2
  return np.meshgrid(ax, ax)  # (x: columns, y: rows)


def sinc_kernel(k: int, omega_c: float) -> np.ndarray:
  """Circular low-pass: ω_c·J1(ω_c·r)/(2π r), centre ω_c²/(4π) (the r→0 limit); [k, k]."""
  xx, yy = _grid(k)
  r = np.hypot(xx, yy)
  with np.errstate(divide="ignore", invalid="ignore"):
    kern = omega_c * bessel_j1(omega_c * r) / (2 * np.pi * r)
  kern[r == 0] = omega_c ** 2 / (4 * np.pi)
  return kern / kern.sum()


def _quad_form(k: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
  """xᵀΣ⁻¹x over the centred grid, Σ = R·diag(σx², σy²)·Rᵀ."""
  c, s = math.cos(theta), math.sin(theta)
  rot = np.array([[c, -s], [s, c]])
  sigma = rot @ np.diag([sig_x ** 2, sig_y ** 2]) @ rot.T
  inv = np.linalg.inv(sigma)
  xx, yy = _grid(k)
  return inv[0, 0] * xx ** 2 + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy ** 2


def disk_kernel(k: int) -> np.ndarray:
  """Defocus: a disk of radius k//2+1 (x²+y² ≤ r²) seen through a k×k window; for k ≤ 5 that window
  is all inside the disk, so the corners are zeroed to keep it round."""
  xx, yy = _grid(k)
  r = k // 2 + 1
  kern = (xx ** 2 + yy ** 2 <= r * r).astype(np.float64)
  if k in (3, 5):
    kern[0, 0] = kern[0, -1] = kern[-1, 0] = kern[-1, -1] = 0.0
  return kern / kern.sum()


def _draw_line(r0: int, c0: int, r1: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
  """Integer pixels of the segment (Bresenham-equivalent: one pixel per step on the major axis)."""
  n = max(abs(r1 - r0), abs(c1 - c0)) + 1
  t = np.linspace(0.0, 1.0, n)
  rows = np.rint(r0 + t * (r1 - r0)).astype(int)
  cols = np.rint(c0 + t * (c1 - c0)).astype(int)
  return rows, cols


def line_kernel(k: int, angle_index: int) -> np.ndarray:
  """Motion blur: a full-length line through the centre at angle angle_index·180°/(4·(k//2))."""
  num_angles = 4 * (k // 2)
  theta = math.pi * angle_index / num_angles
  c = k // 2
  dx, dy = math.cos(theta), math.sin(theta)
  scale = c / max(abs(dx), abs(dy))  # reach the kernel's border along the major axis
  ex, ey = round(dx * scale), round(dy * scale)
  rows, cols = _draw_line(c - ey, c - ex, c + ey, c + ex)
  kern = np.zeros((k, k))
  kern[rows, cols] = 1.0
  return kern / kern.sum()


def mixed_kernel(k: int, blur_range: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
  """`predefined_mixed_kernel`: one family drawn with the spec's probabilities; [k', k'] (k' = k
  except motion lines for k > 15, which use k − 10)."""
  family = _KERNEL_FAMILIES[rng.choice(len(_KERNEL_FAMILIES), p=_KERNEL_PROBS)]
  lo, hi = blur_range
  if family == "defocus":
    return disk_kernel(k)
  if family == "box":
    return np.full((k, k), 1.0 / (k * k))
  if family == "line":
    k_line = k - 10 if k > 15 else k
    return line_kernel(k_line, int(rng.integers(4 * (k_line // 2))))

  iso = family.endswith("_iso") or family == "iso"
  sig_x = rng.uniform(lo, hi)
  if iso:
    sig_y, theta = sig_x, 0.0
  else:
    sig_y, theta = rng.uniform(lo, hi), rng.uniform(-np.pi, np.pi)
  q = _quad_form(k, sig_x, sig_y, theta)
  if family in ("iso", "aniso"):
    kern = np.exp(-0.5 * q)
  elif family.startswith("generalized"):
    beta = rng.uniform(0.5, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, 2.0)
    kern = np.exp(-0.5 * q ** beta)
  else:  # plateau: β ~ U(1, 1) (= 1) or U(1, 1.5)
    beta = rng.uniform(1.0, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, 1.5)
    kern = 1.0 / (q ** beta + 1.0)
  if not family.startswith("plateau"):  # multiplicative kernel noise, not for plateau kernels
    kern = kern * rng.uniform(0.9, 1.1, size=kern.shape)
  return kern / kern.sum()


# -------------------------------------------------------------------------------------------------
# Operators (spec §7.3-7.4). Images float32 [H, W, 3].
# -------------------------------------------------------------------------------------------------

def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def wiener_deconv(img: np.ndarray, kernel: np.ndarray, k_reg: float = 0.006,
                  pad: int = 20) -> np.ndarray:
  """Per-channel Wiener filter conj(F_k)/(|F_k|² + K) on the symmetric-padded image; [H, W, 3]."""
  h, w = img.shape[:2]
  x = np.pad(img.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
  ph, pw = x.shape[:2]
  kern = np.zeros((ph, pw))
  kh, kw = kernel.shape
  # Centre the kernel at (ph//2, pw//2) so ifftshift moves its centre to the origin.
  top, left = ph // 2 - kh // 2, pw // 2 - kw // 2
  kern[top:top + kh, left:left + kw] = kernel / kernel.sum()
  fk = np.fft.rfft2(np.fft.ifftshift(kern))
  filt = np.conj(fk) / (np.abs(fk) ** 2 + k_reg)
  out = np.fft.irfft2(np.fft.rfft2(x, axes=(0, 1)) * filt[..., None], s=(ph, pw), axes=(0, 1))
  return out[pad:pad + h, pad:pad + w].astype(np.float32)


def random_blur(img, rng, words, *, max_radius, sinc_prob, deblur_prob, blur_range):
  """Random kernel blur, optional Wiener deconvolution (ringing); sets words in place."""
  k = 2 * int(rng.integers(2, max_radius)) + 1  # {5, 7, ..., 2·max_radius − 1}
  words[_BLUR] = True
  if rng.uniform() < sinc_prob:
    omega_c = rng.uniform(np.pi / 3, np.pi) if k < 13 else rng.uniform(np.pi / 5, np.pi)
    words[_RINGING] = True
    return filter2d(img, sinc_kernel(k, omega_c))
  kernel = mixed_kernel(k, blur_range, rng)
  blurred = filter2d(img, kernel)
  if k < 8 and rng.uniform() < deblur_prob:
    words[_RINGING] = True
    out = wiener_deconv(blurred, kernel)
    if rng.uniform() < 0.1:
      p = rng.uniform(0.1, 0.5)
      out = p * blurred + (1 - p) * out
    return out
  return blurred


def random_resize(img, rng, words, size_hw=None):
  """Resize by 1/s, s ~ U(0.5, 1.4), or to `size_hw`; interpolation AREA/CUBIC/LINEAR."""
  h, w = img.shape[:2]
  if size_hw is None:
    s = rng.uniform(0.5, 1.4)
    size_hw = (int(h / s), int(w / s))
  mode = _RESIZE_MODES[int(rng.integers(3))]
  words[_BLUR] = True  # the reference folds resizing into "blur"
  return cv2.resize(img, (size_hw[1], size_hw[0]), interpolation=mode)


def random_noise(img, rng, words, gauss_prob=0.6):
  """Gaussian (σ ~ U(1, 5)/255) and, independently, Poisson noise; then uint8-quantised."""
  words[_NOISE] = True
  h, w, c = img.shape
  if rng.uniform() < gauss_prob:
    sigma = rng.uniform(1.0, 5.0) / 255.0
    if rng.uniform() < 0.4:  # gray: one noise channel for all colours
      noise = np.repeat(rng.standard_normal((h, w, 1)), c, axis=2)
    else:
      noise = rng.standard_normal((h, w, c))
    img = np.clip(img + (sigma * noise).astype(np.float32), 0.0, 1.0)
  if rng.uniform() < 0.4:
    scale = rng.uniform(0.01, 0.5)
    gray = rng.uniform() < 0.4
    src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if gray else img
    src = np.clip(np.round(src * 255.0), 0, 255) / 255.0
    vals = 2.0 ** math.ceil(math.log2(max(len(np.unique(src)), 1)))
    noise = rng.poisson(src * vals) / vals - src
    img = np.clip(img + (scale * noise).astype(np.float32), 0.0, 1.0)
  return (np.clip(np.round(img * 255.0), 0, 255) / 255.0).astype(np.float32)


def jpeg(img, rng, words, q_range):
  """cv2 JPEG at quality int(U(q_range)); RGB→BGR around it so cv2's YCbCr sees the right order."""
  words[_JPEG] = True
  quality = int(rng.uniform(*q_range))
  u8 = np.clip(img, 0.0, 1.0) * 255.0
  # The reference hands cv2 a float image, which cv2 converts to uint8 by rounding (saturate_cast).
  bgr = np.ascontiguousarray(np.round(u8[..., ::-1])).astype(np.uint8)
  ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
  if not ok:  # pragma: no cover
    raise RuntimeError("cv2.imencode failed")
  return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


# -------------------------------------------------------------------------------------------------
# The chain (spec §7.2)
# -------------------------------------------------------------------------------------------------

def random_degrade_np(img: np.ndarray, rng: np.random.Generator, blur_prob: float = 0.8,
                      resize_prob: float = 0.8, noise_prob: float = 0.4,
                      jpeg_prob: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
  """Three shuffled degradation stages; img float32 [H, W, 3] RGB in [0, 1].

  Returns (lq float32 [H, W, 3] in [0, 1] on the /255 grid, words bool [4] over DEGRADATION_WORDS).
  """
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
  h, w = img.shape[:2]
  x = np.ascontiguousarray(img, dtype=np.float32)
  words = np.zeros(len(DEGRADATION_WORDS), bool)
  resize_flag = rng.uniform() < resize_prob

  # Stage 1.
  for op in rng.permutation(["blur", "resize", "noise", "jpeg"]):
    if op == "blur":
      if rng.uniform() < blur_prob:
        x = random_blur(x, rng, words, max_radius=10, sinc_prob=0.1, deblur_prob=0.1,
                        blur_range=(0.2, 2.2))
      else:
        rng.uniform()  # under_display_filter draw (p 0.2): the filter itself is skipped
    elif op == "resize":
      if resize_flag:
        x = random_resize(x, rng, words)
    elif op == "noise":
      if rng.uniform() < noise_prob:
        x = random_noise(x, rng, words)
    elif rng.uniform() < jpeg_prob:
      x = jpeg(x, rng, words, (60, 95))

  # Stage 2.
  for op in rng.permutation(["blur", "noise"]):
    if op == "blur":
      if rng.uniform() < 0.4:
        x = random_blur(x, rng, words, max_radius=5, sinc_prob=0.1, deblur_prob=0.1,
                        blur_range=(0.2, 1.5))
      else:
        rng.uniform()  # under_display_filter draw, skipped
    elif rng.uniform() < 0.2:
      x = random_noise(x, rng, words)

  # Stage 3.
  for op in rng.permutation(["blur", "resize", "jpeg"]):
    if op == "blur":
      if rng.uniform() < 0.8:
        x = random_blur(x, rng, words, max_radius=10, sinc_prob=0.8, deblur_prob=0.1,
                        blur_range=(0.2, 1.0))
    elif op == "resize":
      if resize_flag:
        x = random_resize(x, rng, words, size_hw=(h, w))
    elif rng.uniform() < 0.4:
      x = jpeg(x, rng, words, (80, 100))

  lq = (np.clip(np.round(x * 255.0), 0, 255) / 255.0).astype(np.float32)
  return lq, words


def degradation_text_np(words: np.ndarray) -> str:
  """The set words joined with ", " (e.g. "blur, noise")."""
  return ", ".join(w for w, on in zip(DEGRADATION_WORDS, words, strict=True) if on)


def clip_input_np(img: np.ndarray) -> np.ndarray:
  """CLIP branch as the reference's `clip_transform` (spec §3.4): 8-bit image, PIL bicubic resize
  of the shortest side to 224, centre crop, OpenAI normalisation; [224, 224, 3]."""
  from PIL import Image

  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  h, w = img.shape[:2]
  new_h, new_w = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
  u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  x = np.asarray(Image.fromarray(u8).resize((new_w, new_h), Image.BICUBIC), np.float32) / 255.0
  top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
  return (x[top:top + 224, left:left + 224] - mean) / std


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num-examples", type=int, default=200)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  cv2.setNumThreads(1)
  rng = np.random.default_rng(args.seed)
  img = rng.uniform(size=(args.size, args.size, 3)).astype(np.float32)
  img = cv2.GaussianBlur(img, (0, 0), 2.0)  # photo-like smoothness, so JPEG costs what it would
  random_degrade_np(img, rng)
  t0 = time.perf_counter()
  for _ in range(args.num_examples):
    random_degrade_np(img, rng)
  dt = time.perf_counter() - t0
  print(json.dumps({"name": "numpy_degradations", "device": "cpu",
                    "shape": [args.size, args.size, 3], "value": args.num_examples / dt,
                    "unit": "examples/s", "cores": 1}))


if __name__ == "__main__":
  main()

"""CLIP preprocessing: matches PIL resize + torchvision crop/normalise on real photos."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
from PIL import Image

from uir_jax import preprocess as pp

skimage_data = pytest.importorskip("skimage.data")

# Pillow 13 changed which pass runs first for tall shrinks; compare with the installed one.
PASS_ORDER = "pillow" if int(PIL.__version__.split(".")[0]) >= 13 else "horizontal"
# (photo, H, W): crops/resizes of real photos covering wide, tall (H > 2W), near-square and
# upsampled (short side < 224) inputs.
CASES = [("astronaut", 512, 512), ("coffee", 300, 500), ("chelsea", 257, 224),
         ("rocket", 1000, 240), ("astronaut", 150, 180), ("coffee", 400, 600)]


def _photo(name, h, w):
  """A real photo resized with PIL to (h, w), as float32 [0, 1] like the restoration loaders."""
  img = getattr(skimage_data, name)()
  u8 = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
  return u8.astype(np.float32) / 255.0


def _reference(x):
  """open_clip's eval transform on PIL: truncating uint8, Resize(224), CenterCrop, ToTensor."""
  img = Image.fromarray((x * 255).astype(np.uint8))
  w, h = img.size
  new_h, new_w = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
  img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
  return np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0


@pytest.mark.parametrize("name,h,w", CASES)
def test_clip_preprocess_matches_pil(name, h, w):
  x = _photo(name, h, w)
  got = jax.jit(lambda im: pp.clip_preprocess(im, pass_order=PASS_ORDER))(x[None])[0]
  assert got.shape == (224, 224, 3) and got.dtype == jnp.float32
  unnorm = np.asarray(got) * np.asarray(pp.OPENAI_STD) + np.asarray(pp.OPENAI_MEAN)
  np.testing.assert_allclose(unnorm, _reference(x), atol=1.0 / 255 + 1e-6)
  # Bit-exactness is what the int32 implementation promises: no pixel is off by a level.
  assert np.abs(unnorm - _reference(x)).max() < 0.5 / 255


@pytest.mark.torch
def test_matches_open_clip_transform():
  open_clip = pytest.importorskip("open_clip")
  transform = open_clip.image_transform(224, is_train=False)
  xs = np.stack([_photo("chelsea", 300, 451), _photo("astronaut", 300, 451)])
  got = np.asarray(pp.clip_preprocess(xs, pass_order=PASS_ORDER))
  for x, g in zip(xs, got, strict=True):
    ref = transform(Image.fromarray((x * 255).astype(np.uint8))).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(g, ref, atol=1e-5)


@pytest.mark.parametrize("out_hw", [(97, 301), (31, 40), (500, 77)])
def test_resize_matches_pil_both_pass_orders(out_hw):
  """Every resize direction mix, including ones where Pillow >= 13 runs the vertical pass first."""
  u8 = (_photo("coffee", 200, 130) * 255).astype(np.uint8)
  out_h, out_w = out_hw
  ref = np.asarray(Image.fromarray(u8).resize((out_w, out_h), Image.BICUBIC))
  got = np.asarray(pp.resize_bicubic_pil(u8, out_h, out_w, pass_order=PASS_ORDER))
  np.testing.assert_array_equal(got, ref)


def test_pass_order_rule_and_effect():
  assert pp.vertical_first(1000, 240, 933, 224)  # height loses 67 px > 2 * 16
  assert not pp.vertical_first(240, 1000, 224, 933)
  assert not pp.vertical_first(1000, 240, 933, 224, "horizontal")
  u8 = (_photo("rocket", 1000, 240) * 255).astype(np.uint8)
  a = pp.resize_bicubic_pil(u8, 233, 56, pass_order="horizontal")
  b = pp.resize_bicubic_pil(u8, 233, 56, pass_order="vertical")
  assert np.any(np.asarray(a) != np.asarray(b))  # the order is observable, so it must be chosen


def test_weights_and_crop_helpers():
  w = pp.pil_bicubic_weights(512, 224)
  # Every row sums to 1.0 in 22-bit fixed point (up to per-tap rounding).
  assert np.all(np.abs(w.sum(1) - (1 << 22)) <= w.shape[1])
  np.testing.assert_array_equal(pp.pil_bicubic_weights(7, 7), np.eye(7, dtype=np.int32) << 22)
  assert pp.shortest_side_size(300, 500, 224) == (224, 373)
  assert pp.shortest_side_size(1000, 240, 224) == (933, 224)
  assert pp.center_crop_offsets(257, 224, 224) == (16, 0)  # round(16.5) = 16, half to even


def test_truncating_uint8_conversion():
  x = jnp.array([0.0, 0.999 / 255, 1.0 / 255, 0.5, 1.0, 1.2, -0.1])
  ref = (np.clip(np.asarray(x), 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(pp.to_uint8(x), ref)


def test_bad_inputs():
  with pytest.raises(ValueError, match="B,H,W,3"):
    pp.clip_preprocess(jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match="pass_order"):
    pp.resize_bicubic_pil(jnp.zeros((8, 8, 3), jnp.uint8), 4, 5, pass_order="diagonal")
  with pytest.raises(ValueError, match="output size"):
    pp.resize_bicubic_pil(jnp.zeros((8, 8, 3), jnp.uint8), 0, 5)

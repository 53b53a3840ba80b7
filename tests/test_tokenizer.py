"""CLIP tokenizer: ids identical to open_clip.tokenize, from every vocabulary source."""

import gzip
import json

import numpy as np
import pytest

from uir_jax import tokenizer as tok

DEGRADATIONS = ("motion-blurry", "hazy", "jpeg-compressed", "low-light", "noisy", "raindrop",
                "rainy", "shadowed", "snowy", "uncompleted")
WILD_WORDS = ("blur", "ringing artifact", "noise", "jpeg block")


def _texts(n=300, seed=0):
  """A deterministic mix of the text kinds the tokenizer must get right."""
  fixed = [
      "", " ", "\t\n  ", "a", "A photo of a CAT.", "it's don't we're I've I'm you'll he'd",
      "IT'S  DON'T", "café naïve résumé Über façade", "日本語のテキスト", "中文 测试 句子",
      "한국어 문장",
      "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "math ∑∫√∞ ≠ ≤", "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "ﬁ ligature ﬂ",
      "&amp; &lt;b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39; &copy; &nbsp;x",
      "mojibake: Ã©tÃ© â€œquotesâ€\x9d", "numbers 1234567890 3.14159 1e-10 -42 12,345",
      "punctuation!!! ??? ... --- ((x)) [y] {z} <w> @#$%^&*_+=|\\/~`",
      "tabs\tand\nnewlines\r\nhere",
      "non\u00a0breaking\u2003spaces\u200bzero width", "<start_of_text> inside <end_of_text> text",
      "<|startoftext|> hf specials <|endoftext|>", "word" * 60, "x " * 200,
      "a long caption " * 30, "Ωμέγα Ελληνικά Кириллица русский עברית العربية हिन्दी",
      "\u0301 combining acute e\u0301 and A\u030a", "control\x00\x01\x07chars",
      "    leading/trailing  ",
  ]
  fixed += list(DEGRADATIONS) + list(WILD_WORDS)
  fixed += [f"a photo of a street at night: {d}" for d in DEGRADATIONS]
  fixed += ["an image with " + ", ".join(WILD_WORDS[:k]) for k in range(1, 5)]
  rng = np.random.default_rng(seed)
  pieces = ["the", "a", "dog", "Cat", "running", "blurry", "photo", "of", "a", "man", "'s", "'ll",
            "don't", "42", "3.5", "!", "?", ",", ".", "&amp;", "é", "ü", "ß", "日本", "猫", "😀",
            "  ",
            "\t", "JPEG", "jpeg-compressed", "low-light", "x" * 30, "—", "…", "“", "”", "«", "»",
            "Ø", "ñ", "ç", "İ", "ﬀ", "²", "½", "١٢٣", "₤", "™", ":", ";"]
  out = list(fixed)
  while len(out) < n:
    k = int(rng.integers(1, 40))
    words = rng.choice(pieces, size=k)
    seps = rng.choice(["", " ", " ", " ", "  "], size=k)
    out.append("".join(w + s for w, s in zip(words, seps, strict=True)))
  return out


@pytest.fixture(scope="module")
def open_clip_ids():
  open_clip = pytest.importorskip("open_clip")
  texts = _texts()
  return texts, open_clip.tokenize(texts).numpy()


@pytest.mark.torch
def test_matches_open_clip(open_clip_ids):
  texts, ref = open_clip_ids
  ids = tok.tokenize(texts)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), 77)
  bad = [t for t, a, b in zip(texts, ids, ref, strict=True) if not np.array_equal(a, b)]
  assert not bad, f"{len(bad)} texts differ from open_clip, e.g. {bad[:3]!r}"
  # The sample must exercise truncation and multi-token words, or the test proves little.
  assert (ref[:, -1] == tok.EOT_TOKEN).sum() >= 3
  assert (ref != 0).sum(axis=1).max() == 77


@pytest.mark.torch
def test_short_context_matches_open_clip(open_clip_ids):
  open_clip = pytest.importorskip("open_clip")
  texts = _texts()[:60]
  for length in (1, 2, 5):
    np.testing.assert_array_equal(tok.tokenize(texts, length),
                                  open_clip.tokenize(texts, context_length=length).numpy())


def _write_hf_dir(path):
  """A Hugging Face style vocab.json + merges.txt built from open_clip's merges file."""
  with gzip.open(tok.default_vocab_path(), "rb") as f:
    lines = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  symbols = list(tok.bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  (path / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")


def test_hf_directory_gives_same_ids(tmp_path):
  _write_hf_dir(tmp_path)
  texts = _texts(120, seed=1)
  hf = tok.tokenize(texts, vocab_path=tmp_path)
  np.testing.assert_array_equal(hf, tok.tokenize(texts))
  assert tok.get_tokenizer(tmp_path).vocab_size == 49406  # + 2 specials held separately


def test_explicit_merges_file_and_cache():
  path = tok.default_vocab_path()
  assert path.endswith("bpe_simple_vocab_16e6.txt.gz")
  assert tok.get_tokenizer(path) is tok.get_tokenizer(None)  # built once, then cached
  ids = tok.tokenize("a photo of a cat", vocab_path=path)
  assert ids.shape == (1, 77)
  assert ids[0, 0] == tok.SOT_TOKEN and ids[0, 6] == tok.EOT_TOKEN and not ids[0, 7:].any()


def test_truncation_forces_eot():
  ids = tok.tokenize(["word " * 100, "short"])
  assert ids[0, -1] == tok.EOT_TOKEN and (ids[0] != 0).all()
  assert ids[1, 2] == tok.EOT_TOKEN and not ids[1, 3:].any()


def test_decode_roundtrip():
  t = tok.get_tokenizer()
  assert t.decode(tok.tokenize("A Blurry, noisy photo of 2 cats!")[0]) == \
      "a blurry , noisy photo of 2 cats !"


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="item 1"):
    tok.tokenize(["ok", 3])
  with pytest.raises(ValueError, match="context_length"):
    tok.tokenize("x", 0)
  with pytest.raises(FileNotFoundError, match="not found"):
    tok.tokenize("x", vocab_path=tmp_path / "missing.txt.gz")
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tok.tokenize("x", vocab_path=tmp_path)
  (tmp_path / "bad.txt").write_text("#version\na b\n")
  with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
    tok.tokenize("x", vocab_path=tmp_path / "bad.txt")

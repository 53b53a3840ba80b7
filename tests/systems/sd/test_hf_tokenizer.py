"""`tokenizer.load_hf_tokenizer`: ids identical to transformers' `CLIPTokenizer` (the oracle) as
SD pipelines call it (padding="max_length", max_length=77, truncation), for a tiny vocabulary
written here and CLIP's own vocabulary (open_clip's merges file), with SD 1.x's pad token
("<|endoftext|>") and SD 2.x's ("!", which transformers also splits out of the text as a special
token), from vocab.json + merges.txt and from the tokenizer.json transformers 5 saves."""

import json
import os
import warnings

import numpy as np
import pytest

from uir_jax import tokenizer as tok

TRICKY = [
    "", " ", "a photo of a cat", "A Photo OF a CAT.", "it's don't we're I've I'm you'll he'd",
    "  leading and   trailing\t\nwhitespace  ", "café naïve e\u0301 A\u030a (NFC composes)",
    "&amp; &lt;b&gt; (no HTML unescape)", "hi! !! bang!", "ﬁ ligature Ｆｕｌｌ",
    "emoji 😀🎉 日本語",
    "numbers 1234567890 3.14", "a<|endoftext|>b x<<|endoftext|> <|startoftext|>",
    "<|EndOfText|> upper-case specials are text", "<start_of_text> open_clip's are text",
    "non\u00a0breaking\u2003spaces\u200bzero width", "punctuation!!! ??? ... <w> @#$%^&*_+=|\\/~`",
]


def bpe_vocab(corpus, num_merges):
  """CLIP-style vocabulary: 256 byte symbols, their "</w>" forms, merges learnt on `corpus`
  (most frequent adjacent pair first), the two specials."""
  syms = list(tok.bytes_to_unicode().values())
  words = {}
  for w in " ".join(corpus).lower().split():
    enc = [tok.bytes_to_unicode()[b] for b in w.encode()]
    key = tuple(enc[:-1] + [enc[-1] + "</w>"])
    words[key] = words.get(key, 0) + 1
  merges = []
  for _ in range(num_merges):
    counts = {}
    for w, n in words.items():
      for pair in zip(w[:-1], w[1:], strict=False):
        counts[pair] = counts.get(pair, 0) + n
    if not counts:
      break
    best = max(counts, key=lambda p: (counts[p], p))
    merges.append(best)
    new = {}
    for w, n in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(w[i] + w[i + 1])
          i += 2
        else:
          out.append(w[i])
          i += 1
      new[tuple(out)] = n
    words = new
  vocab = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges]
  return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


def write_tokenizer(folder, vocab, merges):
  """vocab.json + merges.txt as in the SD repositories."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({s: i for i, s in enumerate(vocab)}, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def tiny_tokenizer_folder(folder, pad_token=None):
  """A tiny CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) saved by
  transformers; returns the transformers tokenizer."""
  from transformers import CLIPTokenizer

  vocab, merges = bpe_vocab(TRICKY * 2 + ["a photo of a cat and a dog in the snow"] * 5, 60)
  write_tokenizer(folder, vocab, merges)
  kw = {} if pad_token is None else {"pad_token": pad_token}
  return CLIPTokenizer.from_pretrained(folder, model_max_length=77, **kw), vocab


def _hf_ids(hf, texts):
  return np.asarray(hf(texts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.mark.parametrize("pad", [None, "!"], ids=["sd15_pad_eos", "sd2_pad_bang"])
def test_tiny_vocab_matches_transformers(tmp_path, pad):
  pytest.importorskip("transformers")
  folder = str(tmp_path / "tokenizer")
  hf, _ = tiny_tokenizer_folder(folder, pad)
  hf.save_pretrained(folder)  # writes tokenizer_config.json (pad token) and tokenizer.json
  texts = TRICKY + ["a photo of a cat " * 30]
  want = _hf_ids(hf, texts)
  with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    ours = tok.load_hf_tokenizer(folder)
    np.testing.assert_array_equal(ours(texts), want)
    assert ours.pad_id == (0 if pad else ours.eot_id)
    # transformers 5 saves tokenizer.json only: the same ids from it.
    os.remove(os.path.join(folder, "vocab.json"))
    np.testing.assert_array_equal(tok.load_hf_tokenizer(folder)(texts), want)


def test_clip_vocab_matches_transformers(tmp_path):
  """The real 49408-entry vocabulary (open_clip's merges file), 300 mixed texts, SD 2.x's pad."""
  pytest.importorskip("transformers")
  from transformers import CLIPTokenizer

  from tests.test_tokenizer import _texts

  try:
    base = tok.get_tokenizer()
  except FileNotFoundError:
    pytest.skip("open_clip's merges file is not installed")
  inv = {i: s for s, i in base.encoder.items()}
  vocab = [inv[i] for i in range(len(inv))] + ["<|startoftext|>", "<|endoftext|>"]
  merges = sorted(base.ranks, key=base.ranks.get)
  folder = str(tmp_path / "tokenizer")
  write_tokenizer(folder, vocab, merges)
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": "!", "model_max_length": 77}, f)
  texts = TRICKY + _texts(300)
  hf = CLIPTokenizer.from_pretrained(folder)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    np.testing.assert_array_equal(tok.load_hf_tokenizer(folder)(texts), _hf_ids(hf, texts))


def test_long_prompt_truncated_with_one_warning(tmp_path):
  pytest.importorskip("transformers")
  folder = str(tmp_path / "tokenizer")
  tiny_tokenizer_folder(folder)
  ours = tok.load_hf_tokenizer(folder)
  n = len(ours.encode("a photo of a cat " * 30)) + 2
  with pytest.warns(UserWarning) as record:
    ids = ours(["a cat", "a photo of a cat " * 30])
  assert len(record) == 1 and f"prompt 1 is {n} tokens long" in str(record[0].message)
  assert ids.shape == (2, 77) and ids[1, -1] == ours.eot_id


def test_bad_tokenizer_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    tok.load_hf_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="neither vocab.json"):
    tok.load_hf_tokenizer(tmp_path)
  write_tokenizer(tmp_path, ["a", "b"], [("a", "b")])
  with pytest.raises(ValueError, match="not in the vocabulary"):
    tok.load_hf_tokenizer(tmp_path)

"""CLIP byte-level BPE tokenizer giving exactly `open_clip.tokenize`'s ids, without torch.

Pipeline per text (spec §1.3): `ftfy.fix_text`, HTML-unescape twice, collapse whitespace,
lower-case, split with CLIP's pre-tokenisation regex, map UTF-8 bytes to printable unicode symbols,
apply the BPE merges (each word ends with the "</w>" marker), look the symbols up in the vocabulary.
Each row is `[SOT, tokens..., EOT]` padded with 0 to `context_length`; longer rows are truncated and
their last token is forced to EOT.

The vocabulary comes from, in order:
  * `vocab_path`: the `bpe_simple_vocab_16e6.txt.gz` merges file (gzip or plain text), or a Hugging
    Face CLIP tokenizer directory holding `vocab.json` + `merges.txt`;
  * the merges file shipped inside an installed `open_clip_torch` (found without importing it, since
    importing open_clip imports torch).

`load_hf_tokenizer(folder)` instead gives transformers' `CLIPTokenizer` ids (`HFTokenizer`), as
Stable Diffusion pipelines tokenize: NFC + whitespace collapse + lower-case (no ftfy, no HTML
unescape), the special tokens (bos, eos, unk, pad) split out of the raw text first, `[BOS, tokens,
EOS]` padded with the folder's pad token (SD 1.x: "<|endoftext|>"; SD 2.x: "!", id 0).

Attributes:
  SOT_TOKEN, EOT_TOKEN: ids of the start/end-of-text tokens in the CLIP vocabulary.
  DEFAULT_CONTEXT_LENGTH: 77, the context of every CLIP text tower.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import ftfy
import numpy as np
import regex

SOT_TOKEN = 49406
EOT_TOKEN = 49407
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's vocabulary is 256 byte symbols, their 256 "</w>" forms, the first 48,894 merges and 2
# special tokens = 49,408 entries; the merges file holds more lines than are used.
_NUM_MERGES = 49152 - 256 - 2
_MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# open_clip spells its special tokens like this (Hugging Face uses "<|startoftext|>"); its regex
# matches these literal strings inside the text, so "<start_of_text>" in a caption becomes SOT.
_SPECIAL_TEXTS = ("<start_of_text>", "<end_of_text>")
_HF_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WORD_END = "</w>"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """Byte -> printable unicode symbol table of GPT-2/CLIP byte-level BPE.

  Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...) map to
  code points 256, 257, ... in byte order, so that no BPE symbol is whitespace or a control char.
  The dict order (printable bytes first, then the rest) is the order of the first 256 vocab ids.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in keep}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _clean(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy, double HTML unescape, whitespace collapse, lower-case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  # str.split() (not a regex) decides what counts as whitespace, as in open_clip.
  return " ".join(text.split()).lower()


class Tokenizer:
  """CLIP BPE tokenizer with its vocabulary loaded once; call it like `tokenize`.

  Args:
    encoder: symbol string -> id (byte symbols, "</w>" forms and merged symbols).
    merges: ordered BPE merges (rank = position).
    sot_id, eot_id: ids of the start/end-of-text tokens.
  """

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], sot_id: int,
               eot_id: int):
    self.encoder = encoder
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.sot_id = sot_id
    self.eot_id = eot_id
    self.byte_encoder = bytes_to_unicode()
    self._specials = {_SPECIAL_TEXTS[0]: sot_id, _SPECIAL_TEXTS[1]: eot_id}
    words = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    self._pattern = regex.compile("|".join([*_SPECIAL_TEXTS, words]), regex.IGNORECASE)
    # Word -> ids; BPE of a word is deterministic and captions repeat words a lot.
    self._cache: dict[str, tuple[int, ...]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def _bpe(self, word: str) -> list[str]:
    """Merges the symbols of one byte-encoded word, lowest-ranked adjacent pair first."""
    symbols = [*word[:-1], word[-1] + _WORD_END]
    while len(symbols) > 1:
      best, best_rank = None, None
      for pair in zip(symbols[:-1], symbols[1:], strict=True):
        rank = self.ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best, best_rank = pair, rank
      if best is None:
        break
      # Merge every non-overlapping occurrence of the best pair, left to right.
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(best[0] + best[1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids(self, word: str) -> tuple[int, ...]:
    ids = self._cache.get(word)
    if ids is None:
      if word in self._specials:
        ids = (self._specials[word],)
      else:
        encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        ids = tuple(self.encoder[s] for s in self._bpe(encoded))
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT."""
    ids = []
    for word in self._pattern.findall(_clean(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode` up to cleaning (special and padding ids are dropped)."""
    decoder = getattr(self, "_decoder", None)
    if decoder is None:
      decoder = self._decoder = {v: k for k, v in self.encoder.items()}
    byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    skip = {0, self.sot_id, self.eot_id}
    text = "".join(decoder[int(i)] for i in ids if int(i) not in skip)
    raw = bytearray(byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace(_WORD_END, " ").strip()

  def __call__(self, texts: str | Sequence[str],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """Tokenizes a string or a list of strings -> int32 [N, context_length]."""
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f"tokenize expects str or a list of str; item {i} is {type(t).__name__}")
    if int(context_length) < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}")
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_id, *self.encode(text), self.eot_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_id
      out[i, :len(ids)] = ids
    return out


def _from_merges_file(path: str) -> Tokenizer:
  """Builds the tokenizer from CLIP's `bpe_simple_vocab_16e6.txt[.gz]` merges file."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    lines = f.read().decode("utf-8").split("\n")
  # Line 0 is a version header; CLIP uses exactly the next _NUM_MERGES lines.
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path} is not a CLIP BPE merges file (need {_NUM_MERGES} 'a b' lines)")
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + _WORD_END for s in symbols] + ["".join(m) for m in merges]
  vocab += list(_SPECIAL_TEXTS)
  encoder = {s: i for i, s in enumerate(vocab)}
  return Tokenizer(encoder, merges, encoder[_SPECIAL_TEXTS[0]], encoder[_SPECIAL_TEXTS[1]])


def _from_hf_dir(path: str) -> Tokenizer:
  """Builds the tokenizer from a Hugging Face CLIP tokenizer directory (vocab.json + merges.txt)."""
  with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
    encoder = json.load(f)
  with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines
            if line.strip() and not line.startswith("#version")]
  if any(len(m) != 2 for m in merges):
    raise ValueError(f"{path}/merges.txt has lines that are not 'a b' merges")
  specials = []
  for hf_name, oc_name in zip(_HF_SPECIALS, _SPECIAL_TEXTS, strict=True):
    if hf_name in encoder:
      specials.append(encoder.pop(hf_name))
    elif oc_name in encoder:
      specials.append(encoder.pop(oc_name))
    else:
      raise ValueError(f"{path}/vocab.json has no {hf_name!r} entry; is it a CLIP tokenizer?")
  return Tokenizer(encoder, merges, *specials)


class HFTokenizer(Tokenizer):
  """transformers' `CLIPTokenizer` (the tokenizers-backed one of transformers 5) without it.

  `tokenizer(texts)` equals `CLIPTokenizer(texts, padding="max_length", max_length=77,
  truncation=True).input_ids`: per text, the special-token strings are split out of the raw text
  (case-sensitive, leftmost-longest), each remaining piece is NFC-normalised, its whitespace runs
  collapsed to one space and lower-cased, then split by CLIP's regex and byte-level BPE'd;
  symbols missing from the vocabulary become `unk_id`. Rows are `[bos, tokens[:L - 2], eos]`
  padded with `pad_id`.

  Args:
    encoder, merges: as `Tokenizer` (the vocabulary without the special tokens is fine).
    specials: special-token string -> id (bos, eos, unk, pad and any added tokens).
    bos, eos, pad, unk: the special token strings (keys of `specials` or of `encoder`).
    model_max_length: default row length (77).
  """

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]],
               specials: dict[str, int], *, bos: str, eos: str, pad: str, unk: str,
               model_max_length: int = DEFAULT_CONTEXT_LENGTH):
    ids = {**encoder, **specials}
    for role, name in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
      if name not in ids:
        raise ValueError(f"{role} token {name!r} is not in the vocabulary")
    super().__init__(encoder, merges, ids[bos], ids[eos])
    self.pad_id, self.unk_id = ids[pad], ids[unk]
    self.pad_token = pad
    self.model_max_length = int(model_max_length)
    self._specials = {}  # pieces never match special strings: those are split out beforehand
    self._added = {name: ids[name] for name in {*specials, bos, eos, pad, unk}}
    alternatives = sorted(self._added, key=len, reverse=True)  # leftmost-longest
    self._split = re.compile("|".join(re.escape(a) for a in alternatives))
    words = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    self._pattern = regex.compile(words)

  def _word_ids(self, word: str) -> tuple[int, ...]:
    ids = self._cache.get(word)
    if ids is None:
      encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
      ids = tuple(self.encoder.get(s, self.unk_id) for s in self._bpe(encoded))
      self._cache[word] = ids
    return ids

  def _segment(self, text: str) -> list[int]:
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    ids = []
    for word in self._pattern.findall(text):
      ids.extend(self._word_ids(word))
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without the bos/eos added around it."""
    ids, start = [], 0
    for m in self._split.finditer(text):
      ids += self._segment(text[start:m.start()])
      ids.append(self._added[m.group()])
      start = m.end()
    return ids + self._segment(text[start:])

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None, *,
               warn: bool = True) -> np.ndarray:
    """int32 [N, context_length (default model_max_length)]; a text longer than the row is
    truncated (as transformers) with a warning naming its length, if `warn`."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.model_max_length if context_length is None else int(context_length)
    if length < 2:
      raise ValueError(f"context_length must be >= 2, got {length}")
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"tokenizer expects str or a list of str; item {i} is "
                         f"{type(text).__name__}")
      tokens = self.encode(text)
      if len(tokens) + 2 > length:
        if warn:
          kept = self.decode(tokens[:length - 2])
          warnings.warn(f"prompt {i} is {len(tokens) + 2} tokens long; CLIP takes {length}: "
                        f"truncated to {kept!r}", stacklevel=2)
        tokens = tokens[:length - 2]
      row = [self.sot_id, *tokens, self.eot_id]
      out[i, :len(row)] = row
    return out


def _token_name(value: Any) -> str | None:
  """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
  return value.get("content") if isinstance(value, dict) else value


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
  """transformers' CLIPTokenizer from a tokenizer folder (or a diffusers pipeline folder holding
  `tokenizer/`): `vocab.json` + `merges.txt` or `tokenizer.json`; the special tokens and
  `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json` (transformers'
  defaults "<|startoftext|>", "<|endoftext|>" when absent)."""
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"CLIP tokenizer: no such folder: {folder}")
  if os.path.isdir(os.path.join(folder, "tokenizer")):
    folder = os.path.join(folder, "tokenizer")
  join = lambda name: os.path.join(folder, name)
  names = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>",
           "unk": "<|endoftext|>"}
  max_length = DEFAULT_CONTEXT_LENGTH
  for cfg_name in ("special_tokens_map.json", "tokenizer_config.json"):
    if os.path.isfile(join(cfg_name)):
      with open(join(cfg_name), encoding="utf-8") as f:
        cfg = json.load(f)
      for role in names:
        if _token_name(cfg.get(f"{role}_token")):
          names[role] = _token_name(cfg[f"{role}_token"])
      if cfg_name == "tokenizer_config.json" and \
          int(cfg.get("model_max_length", 10**9)) <= 10**6:
        max_length = int(cfg["model_max_length"])
  specials: dict[str, int] = {}
  if os.path.isfile(join("vocab.json")) and os.path.isfile(join("merges.txt")):
    with open(join("vocab.json"), encoding="utf-8") as f:
      encoder = json.load(f)
    with open(join("merges.txt"), encoding="utf-8") as f:
      merges = [tuple(line.split()) for line in f.read().split("\n")
                if line.strip() and not line.startswith("#version")]
    source = join("merges.txt")
  elif os.path.isfile(join("tokenizer.json")):
    with open(join("tokenizer.json"), encoding="utf-8") as f:
      tj = json.load(f)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
      raise ValueError(f"{join('tokenizer.json')}: model type {model.get('type')!r} is not BPE")
    encoder = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = {t["content"]: int(t["id"]) for t in tj.get("added_tokens", [])}
    source = join("tokenizer.json")
  else:
    raise FileNotFoundError(f"CLIP tokenizer: {folder} has neither vocab.json + merges.txt nor "
                            "tokenizer.json")
  if any(len(m) != 2 for m in merges):
    raise ValueError(f"{source} has merges that are not pairs 'a b'")
  try:
    return HFTokenizer(encoder, merges, specials, model_max_length=max_length, **names)
  except ValueError as e:
    raise ValueError(f"CLIP tokenizer {folder}: {e}") from None


def default_vocab_path() -> str:
  """Path of the merges file inside an installed open_clip_torch, located without importing it."""
  spec = importlib.util.find_spec("open_clip")
  for location in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(location, _MERGES_FILENAME)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
      f"No CLIP BPE vocabulary found: pass vocab_path= pointing at {_MERGES_FILENAME} (from the "
      "open_clip or OpenAI CLIP repositories) or at a Hugging Face CLIP tokenizer directory "
      "(vocab.json + merges.txt), or `pip install open_clip_torch`, which ships the file.")


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Tokenizer:
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "vocab.json")):
      raise FileNotFoundError(f"{path} is a directory without vocab.json + merges.txt")
    return _from_hf_dir(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
  return _from_merges_file(path)


def get_tokenizer(vocab_path: str | os.PathLike | None = None) -> Tokenizer:
  """The (cached) tokenizer for `vocab_path` (file or HF directory; None: open_clip's file)."""
  path = default_vocab_path() if vocab_path is None else os.fspath(vocab_path)
  return _load(os.path.abspath(path))


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, *,
             vocab_path: str | os.PathLike | None = None) -> np.ndarray:
  """CLIP token ids, identical to `open_clip.tokenize`.

  Args:
    texts: one string or a list of strings.
    context_length: row length (77 for all CLIP models).
    vocab_path: merges file or Hugging Face tokenizer directory; None uses open_clip's file.

  Returns:
    np.int32 [N, context_length]: SOT, tokens, EOT, zero padding (truncated rows end with EOT).
  """
  return get_tokenizer(vocab_path)(texts, context_length)

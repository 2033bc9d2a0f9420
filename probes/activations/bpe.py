"""A faster encoder for byte-level BPE tokenizers (GPT-2's scheme; SmolLM2's): tiktoken's, on the tokenizer's own
vocabulary and merges, giving the ids the Hugging Face tokenizer gives.

The Rust tokenizer was the worker's largest cost on the host: 1.1–3.5 µs per token (docs/deployment.md,
"Host-side ceiling"), most of it the pre-tokenizer's regex. tiktoken runs the same split (GPT-2's pattern) and the
same merges in about a third of the time. It is used only where it is the same function:

- the tokenizer is a plain byte-level BPE: no normalizer, GPT-2's split and nothing else before it, no dropout,
  no unknown token, no byte fallback, merges applied as listed (``ignore_merges`` off), and merge order is id order
  (tiktoken ranks a merge by the id of what it makes; ``from_backend`` checks that every merge's result has a
  larger id than the one before);
- added tokens are matched on the raw text with no stripping, and none is a prefix of another (tiktoken's special
  tokens, tried in no set order);
- a text holding a byte the vocabulary lacks (a few ASCII control characters in SmolLM2's) goes to the Hugging Face
  tokenizer: it drops such a byte and merges across it, which tiktoken does not. So does one with a lone surrogate.

``from_backend`` returns None for anything else, and for a tokenizer that encodes its self-check texts otherwise
(tests/probes/test_bpe.py compares the two on every shared source and on random text).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

import tiktoken
from transformers.convert_slow_tokenizer import bytes_to_unicode

from probes.logs import get_logger

log = get_logger(__name__)

# GPT-2's pre-tokenizer split: what the Hugging Face ByteLevel pre-tokenizer applies with use_regex.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Encoded both ways when the encoder is built: scripts, digits, contractions, whitespace runs, specials.
SELF_CHECK_TEXTS = (
    "Hello world! It's 2026, isn't it? They'll say we've   done   it.\n\n\tTabs\tand  spaces  ",
    "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café — «quotes» 日本語のテキスト 한국어 русский текст عربى 😀👍🏽 x² ½ ｆｕｌｌ",
    "1234567890 3.14159 -42 +7e10 0x1F 1,000,000 ...!!!??? ''' \"\"\" ```code``` ::->",
)


def _unsupported(spec: dict[str, Any]) -> str | None:
    """Why a tokenizer.json is not a plain byte-level BPE that tiktoken encodes alike (None: it is)."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')}"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return f"pre-tokenizer {pre.get('type')}"
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return key
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "byte_fallback or ignore_merges"
    added = spec.get("added_tokens") or []
    for token in added:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} strips or matches whole words"
    contents = sorted(str(token.get("content", "")) for token in added)
    for shorter, longer in itertools.pairwise(contents):
        if longer.startswith(shorter):
            # tiktoken tries its specials in no set order, the Hugging Face tokenizer takes the longest match
            return f"added token {shorter!r} is a prefix of {longer!r}"
    return None


def _char_class(missing: Sequence[int]) -> str | None:
    """A regex class of the characters whose UTF-8 holds one of ``missing`` bytes, and of lone surrogates (which
    tiktoken replaces where the Hugging Face tokenizer refuses them); None if a continuation byte is missing (every
    non-ASCII character would have to be checked)."""
    parts = ["\\ud800-\\udfff"]
    for b in missing:
        if b < 0x80:
            lo = hi = b
        elif b < 0xC0:
            return None
        elif b < 0xC2 or b > 0xF4:
            continue  # never in UTF-8
        elif b < 0xE0:
            lo = (b & 0x1F) << 6
            hi = lo + 0x3F
        elif b < 0xF0:
            lo = (b & 0x0F) << 12
            hi = lo + 0xFFF
        else:
            lo = (b & 0x07) << 18
            hi = min(lo + 0x3FFFF, 0x10FFFF)
        parts.append(f"\\U{lo:08x}-\\U{hi:08x}")
    return "[" + "".join(parts) + "]"


class ByteLevelBPE:
    """tiktoken over a Hugging Face byte-level BPE's vocabulary: ``encode_batch`` gives the ids ``backend``
    (``tokenizers.Tokenizer``) would without special tokens added."""

    def __init__(self, encoding: tiktoken.Encoding, backend: Any, unknown: re.Pattern[str]) -> None:
        self.encoding = encoding
        self.backend = backend
        self._unknown = unknown  # characters the vocabulary lacks a byte of: encoded by ``backend``
        self._specials = frozenset(encoding.special_tokens_set)

    @classmethod
    def from_backend(cls, backend: Any) -> ByteLevelBPE | None:
        """The encoder for ``backend`` (a ``tokenizers.Tokenizer``), or None where it would not give the same ids."""
        spec = json.loads(backend.to_str())
        reason = _unsupported(spec)
        if reason is not None:
            log.debug("bpe.not_used", reason=reason)
            return None
        # GPT-2's byte-level alphabet: the printable character each byte is written as in the vocabulary.
        alphabet = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab: dict[str, int] = spec["model"]["vocab"]

        def as_bytes(token: str) -> bytes:
            return bytes(alphabet[c] for c in token)

        ranks: dict[bytes, int] = {}
        for token, token_id in vocab.items():
            if len(token) == 1 and token in alphabet:
                ranks[as_bytes(token)] = token_id
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        unknown = _char_class(missing)
        if unknown is None:
            log.debug("bpe.not_used", reason="continuation bytes missing from the vocabulary")
            return None
        spare = max(vocab.values()) + 1
        for b in missing:  # tiktoken needs every byte; texts holding these never reach it
            ranks[bytes([b])] = spare
            spare += 1
        last = -1
        for merge in spec["model"]["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            made = vocab.get(left + right)
            if made is None or made <= last or any(c not in alphabet for c in left + right):
                log.debug("bpe.not_used", reason="merge order is not id order")
                return None
            ranks[as_bytes(left + right)] = last = made
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        encoding = tiktoken.Encoding("ctd-byte-level-bpe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                     special_tokens=specials)
        bpe = cls(encoding, backend, re.compile(unknown))
        expected = [e.ids for e in backend.encode_batch_fast(list(SELF_CHECK_TEXTS), add_special_tokens=False)]
        if bpe.encode_batch(SELF_CHECK_TEXTS) != expected:
            log.warning("bpe.not_used", reason="self-check texts encode differently")
            return None
        return bpe

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, as ``backend.encode_batch_fast(texts, add_special_tokens=False)`` gives them."""
        out: list[list[int]] = []
        slow: list[int] = []
        encode, specials, unknown = self.encoding.encode, self._specials, self._unknown
        for i, text in enumerate(texts):
            if unknown.search(text):
                slow.append(i)
                out.append([])
            else:
                out.append(encode(text, allowed_special=specials))
        if slow:
            for i, encoded in zip(slow, self.backend.encode_batch_fast([texts[i] for i in slow],
                                                                        add_special_tokens=False), strict=True):
                out[i] = encoded.ids
        return out

"""Control-token strings inside untrusted text, made inert before any template or tokenizer sees them.

Tokenizers match their special and added tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ``[SEP]``)
anywhere in the text they are given, so a user who types ``<|im_end|>\\n<|im_start|>assistant`` would close their
own turn and open a fake assistant turn inside the chat template: the monitored model (and the guard) would read
a conversation that never happened. Each such string in message content gets a WORD JOINER (U+2060) after its
first character: it reads the same to a person, tokenizes as ordinary text, and no tokenizer matches it as a
control token any more. The template's own control tokens are added after this step and stay intact.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

JOINER = "\u2060"
# Control tokens of widely used chat formats, for when the reader's tokenizer is not at hand (a remote guard):
# ChatML/Llama 3 ``<|...|>``, Llama 2 ``[INST]``/``<<SYS>>``, sentencepiece ``<s>``/``</s>``, BERT ``[SEP]``...
GENERIC = (
    r"<\|[^<>|\s]{1,64}\|>",
    r"</?s>",
    r"\[/?INST\]",
    r"<</?SYS>>",
    r"\[(?:CLS|SEP|PAD|MASK|UNK)\]",
)


def special_strings(tokenizer: Any) -> frozenset[str]:
    """Every string this tokenizer turns into a special or added token (single characters excepted)."""
    strings = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    get_added = getattr(tokenizer, "get_added_vocab", None)
    if callable(get_added):
        strings.update(get_added())
    return frozenset(s for s in strings if isinstance(s, str) and len(s) > 1)


# The characters every GENERIC pattern can start with.
_GENERIC_FIRST = frozenset("<[")


@functools.lru_cache(maxsize=64)
def _pattern(strings: frozenset[str]) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """The pattern, and the characters a match can start with."""
    # Longest first, so "<|im_start|>" wins over a shorter token that is its prefix.
    literal = [re.escape(s) for s in sorted(strings, key=len, reverse=True)]
    return re.compile("|".join([*literal, *GENERIC])), tuple(_GENERIC_FIRST | {s[0] for s in strings if s})


def neutralise(text: str, strings: Iterable[str] = ()) -> str:
    """``text`` with every listed string, and every generic control-token pattern, broken by a word joiner."""
    pattern, first = _pattern(frozenset(strings))
    if not any(c in text for c in first):
        # No match can start anywhere: a scan per character is cheaper than the alternation tried at each one.
        return text
    return pattern.sub(lambda m: m.group(0)[0] + JOINER + m.group(0)[1:], text)

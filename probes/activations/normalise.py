"""Untrusted text brought to one canonical form before any template, tokenizer or expert reads it.

Measured on a bundle of the default recipe (issue 21): requests scoring ≥ 0.999 fell to 0.0003 with zero-width
spaces between their letters and to 0.009 with homoglyphs. The monitored model reads tokens, and these edits
change every token while a person (or the model the user is talking to) reads the same request. So content is:

1. stripped of invisible characters: every format character (category Cf: zero-width space/joiners, word
   joiner, bidi embeddings, overrides and isolates, soft hyphen, tag characters) and the other default-ignorable
   code points that render as nothing (variation selectors, the combining grapheme joiner, Hangul fillers);
2. NFKC-normalised (fullwidth and mathematical letters, ligatures, compatibility spaces → their plain form);
3. (before and after NFKC) digits of any script read as ASCII digits, and homoglyphs mapped to the ASCII characters they imitate, from
   Unicode's confusables table (UTS #39 ``confusables.txt``, as shipped in the ``confusable-homoglyphs``
   package). ASCII is never changed (UTS #39 skeletons map ``m`` to ``rn`` and ``1`` to ``l``: right for
   comparing identifiers, wrong for text a model must read), and a word is mapped only if it mixes Latin letters
   with look-alikes or is made of look-alikes alone, so real Greek or Cyrillic words keep their script.

Every reader of untrusted text calls ``normalise`` first (probes/activations/render.py and the window path, the stream
scorer, the experts), so the probe and the expert see the same text, and a record's content key is taken on the
normalised text (probes/data.py): records that normalisation changes get new keys, and cached vectors of them
are recomputed rather than reused.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import unicodedata

# Default-ignorable code points outside category Cf (Unicode DerivedCoreProperties.txt): they render as nothing.
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160), (0x3164, 0x3164), (0xFFA0, 0xFFA0),  # Hangul fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors and vowel separator
    (0xFE00, 0xFE0F), (0xE0100, 0xE01EF),  # variation selectors
)
# A word (a maximal ``\w+`` run) holding a non-ASCII word character; ASCII words are never changed, so only these
# are visited. The lookbehind pins every match to a word's start: linear in the text, even in one huge word.
_WORD = re.compile(r"(?<!\w)\w*?[^\W\x00-\x7f]\w*")


@functools.cache
def _invisible() -> dict[int, None]:
    """str.translate table deleting every invisible code point."""
    # Format characters live in planes 0, 1 and 14 only.
    planes = [*range(0x20000), *range(0xE0000, 0xE1000)]
    drop = {cp for cp in planes if unicodedata.category(chr(cp)) == "Cf"}
    for lo, hi in _IGNORABLE_RANGES:
        drop.update(range(lo, hi + 1))
    return dict.fromkeys(drop)


def _representative(char: str, prototype: str, ascii_sources: dict[str, list[str]]) -> str:
    """The ASCII reading of ``char``, whose UTS #39 prototype is ``prototype``.

    A prototype can stand for several ASCII characters (``l`` for ``l``, ``I``, ``1``, ``|``; ``rn`` for ``m``):
    pick the one of the same kind (digit, upper or lower case) as ``char``, a single character where there is one.
    """
    candidates = [prototype, *ascii_sources.get(prototype, [])]

    def fit(text: str) -> tuple[bool, bool, bool]:
        return (text.isdigit() == char.isdigit(), text.isupper() == char.isupper(), len(text) == 1)

    return max(candidates, key=fit)


@functools.cache
def homoglyphs() -> dict[str, str]:
    """Non-ASCII character → the ASCII text it imitates (UTS #39 confusables whose prototype is ASCII)."""
    data = importlib.resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    # The package stores each confusables.txt line "source → prototype" in both directions. Prototypes are fixed
    # points of the mapping, so a source has exactly one entry (its prototype) and a prototype has one per source.
    pairs: dict[str, list[dict[str, str]]] = json.loads(data)
    ascii_sources: dict[str, list[str]] = {}
    for char, entries in pairs.items():
        # ASCII sources of ASCII prototypes ("I" → "l", "0" → "O", "m" → "rn"): the readings a prototype stands for.
        if len(char) == 1 and char.isascii() and len(entries) == 1 and entries[0]["c"].isascii():
            ascii_sources.setdefault(entries[0]["c"], []).append(char)
    table: dict[str, str] = {}
    for char, entries in pairs.items():
        if len(char) != 1 or char.isascii() or len(entries) != 1:
            continue
        prototype = entries[0]["c"]
        if prototype.isascii() and prototype.strip():
            table[char] = _representative(char, prototype, ascii_sources)
    return table


def _ascii_digit(char: str) -> str | None:
    value = unicodedata.digit(char, None) if unicodedata.category(char) == "Nd" else None
    return None if value is None else str(value)


def _map_word(match: re.Match[str]) -> str:
    word = match.group(0)
    if word.isascii():
        return word
    table = homoglyphs()
    mapped = "".join(_ascii_digit(c) or table.get(c, c) for c in word)
    # Look-alikes among Latin letters, or a word of look-alikes only: an imitation of ASCII text.
    if mapped.isascii() or any(c.isascii() and c.isalpha() for c in word):
        return mapped
    return word


@functools.cache
def _symbols() -> dict[int, str]:
    """str.translate table: non-ASCII, non-word look-alikes whose ASCII reading holds no letter or digit."""
    return {ord(c): t for c, t in homoglyphs().items()
            if not c.isascii() and not c.isalnum() and not any(x.isalnum() for x in t)}


# Runs of non-ASCII characters: both translate tables map only such characters, and str.translate with a dict costs
# a lookup per character, so a text with many distinct non-ASCII characters is scanned in C and only these runs are
# translated.
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# Most non-ASCII text holds a few distinct such characters (curly quotes, dashes, an accented letter): then one
# str.replace per character present, each a C pass, beats any regex pass. Past this many, a replace per character
# would be quadratic in a crafted text; the regex pass stays linear.
_FEW_DISTINCT = 16
_ASCII_BYTES = bytes(range(128))


def _non_ascii(text: str) -> set[str]:
    """The distinct non-ASCII characters of ``text``: its UTF-8 with the ASCII bytes deleted, all in C (a set of
    every character would build a string object per character)."""
    rest = text.encode("utf-8", "surrogatepass").translate(None, _ASCII_BYTES)
    return set(rest.decode("utf-8", "surrogatepass"))


def _translate(text: str, table: dict[int, str] | dict[int, None], present: set[str]) -> str:
    """``text.translate(table)``; ``present`` holds (at least) the non-ASCII characters of ``text``."""
    if len(present) > _FEW_DISTINCT:
        return _NON_ASCII.sub(lambda m: m.group(0).translate(table), text)
    # Keys are non-ASCII and values ASCII (or nothing), so no replacement brings back a key: as str.translate.
    for char in present:
        target = table.get(ord(char), char)
        if target != char:
            text = text.replace(char, target or "")
    return text


def _map_words(text: str, present: set[str]) -> str:
    """Words holding a non-ASCII word character mapped (``_map_word``); text without any has nothing to map."""
    # ``\w`` on str patterns is str.isalnum() or "_": a non-ASCII word character is a non-ASCII alphanumeric one.
    if not any(c.isalnum() for c in present):
        return text
    return _WORD.sub(_map_word, text)


def _map_symbols(text: str, present: set[str]) -> str:
    """Non-word look-alikes (quotes, dashes, slashes) to their ASCII punctuation; never to letters or digits."""
    return _translate(text, _symbols(), present)


def normalise(text: str) -> str:
    """``text`` as every reader sees it: invisible characters dropped, NFKC, homoglyphs and digits as ASCII."""
    if text.isascii():
        return text  # the common case, and already canonical: nothing below changes ASCII
    # Every step but NFKC only drops non-ASCII characters or maps them to ASCII: the characters found first cover
    # the steps before it, and NFKC, which can write new ones, is followed by a second look.
    present = _non_ascii(text)
    text = _translate(text, _invisible(), present)
    # Look-alikes before NFKC as well as after: the table is keyed on UTS #39's (NFD) forms, and NFKC turns
    # some sources into characters the table does not hold (GREEK LUNATE SIGMA "ϲ", a "c", becomes a final sigma).
    text = unicodedata.normalize("NFKC", _map_symbols(_map_words(text, present), present))
    if text.isascii():
        return text
    present = _non_ascii(text)
    return _map_symbols(_map_words(text, present), present)


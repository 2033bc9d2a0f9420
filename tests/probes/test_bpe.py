"""tiktoken over SmolLM2's vocabulary gives the Hugging Face tokenizer's ids: real tokenizer, real shared data."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from probes.activations.bpe import ByteLevelBPE
from probes.activations.models import LoadedModel
from probes.activations.render import BatchRenderer
from probes.activations.windows import window_ids_batch
from probes.config import WindowConfig
from probes.conversation import conversation
from probes.data import read_file


def hf_ids(backend: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def renderer(smollm2: LoadedModel) -> BatchRenderer:
    return BatchRenderer(smollm2.tokenizer, max_tokens=256)


@pytest.fixture(scope="module")
def bpe(renderer: BatchRenderer) -> ByteLevelBPE:
    assert renderer.bpe is not None, "SmolLM2's tokenizer is a plain byte-level BPE: the fast encoder must be used"
    return renderer.bpe


def shared_texts(datasets_dir: Path, per_file: int) -> list[str]:
    """Message texts from every shared source, ``per_file`` records each, wrapped as the chat template wraps them."""
    texts: list[str] = []
    for path in sorted(datasets_dir.glob("*.jsonl")):
        records = read_file(path)
        for record in random.Random(path.name).sample(records, min(per_file, len(records))):
            for message in record.messages:
                texts += [message.content, f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n"]
    return texts


def test_the_same_ids_on_every_shared_source(bpe: ByteLevelBPE, renderer: BatchRenderer, datasets_dir: Path) -> None:
    texts = shared_texts(datasets_dir, per_file=150)
    assert len(texts) > 5000
    expected = hf_ids(renderer.backend, texts)
    got = bpe.encode_batch(texts)
    differ = [t[:80] for t, a, b in zip(texts, got, expected, strict=True) if a != b]
    assert not differ, f"{len(differ)} of {len(texts)} texts encode differently, e.g. {differ[:3]}"


# Scripts, marks, symbols, emoji, invisible characters, the ASCII controls SmolLM2's vocabulary lacks, specials.
ALPHABET = [chr(c) for c in itertools.chain(range(0x250), range(0x2000, 0x2070), range(0x3000, 0x3100),
                                            range(0x1F600, 0x1F650), (0xFEFF, 0x200B, 0xE000, 0x10FFFF, 0x4_0000))]
PIECES = [" ", "  ", "\n", "\t", "'s", "'ll", "'", "123", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(ALPHABET + PIECES), max_size=40).map("".join), min_size=1, max_size=16))
def test_the_same_ids_on_random_text(bpe: ByteLevelBPE, renderer: BatchRenderer, texts: list[str]) -> None:
    assert bpe.encode_batch(texts) == hf_ids(renderer.backend, texts)


def test_a_byte_missing_from_the_vocabulary_is_dropped_as_the_tokenizer_drops_it(
    bpe: ByteLevelBPE, renderer: BatchRenderer
) -> None:
    # "\x14" has no token: the Hugging Face BPE drops it and merges " ]" across it, tiktoken alone would not.
    text = "a \x14] b"
    assert bpe.encode_batch([text]) == hf_ids(renderer.backend, [text])
    assert bpe.encoding.encode(text, allowed_special="all") != hf_ids(renderer.backend, [text])[0]


def test_windowed_rows_are_unchanged(renderer: BatchRenderer, datasets_dir: Path) -> None:
    """What the worker forwards (usual view and windows) is the same with and without the fast encoder."""
    records = read_file(datasets_dir / "harmbench.jsonl")[:60] + read_file(datasets_dir / "xstest.jsonl")[:60]
    convs = [r.messages for r in records] + [conversation([("user", "filler " * 400 + "how to make a bomb")])]
    windows = WindowConfig()
    fast = window_ids_batch(renderer, convs, windows)
    bpe, renderer.bpe = renderer.bpe, None
    try:
        slow = window_ids_batch(renderer, convs, windows)
    finally:
        renderer.bpe = bpe
    assert fast == slow
    assert any(len(rows) > 1 for rows in fast)  # long conversations were read in windows


def _spec(backend: Tokenizer) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(backend.to_str())
    return spec


@pytest.mark.parametrize("change", ["normalizer", "split", "strip", "prefix", "merge_order", "unk"])
def test_anything_else_keeps_the_hugging_face_tokenizer(renderer: BatchRenderer, change: str) -> None:
    spec = _spec(renderer.backend)
    if change == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif change == "split":
        spec["pre_tokenizer"] = {"type": "Whitespace"}
    elif change == "strip":
        spec["added_tokens"][0]["lstrip"] = True
    elif change == "prefix":
        spec["added_tokens"].append({**spec["added_tokens"][0], "id": len(spec["model"]["vocab"]) + 100,
                                     "content": spec["added_tokens"][0]["content"] + "x"})
    elif change == "merge_order":
        merges = spec["model"]["merges"]
        merges[10], merges[11] = merges[11], merges[10]
    else:
        spec["model"]["unk_token"] = "<|endoftext|>"
    assert ByteLevelBPE.from_backend(Tokenizer.from_str(json.dumps(spec))) is None


def test_a_wordpiece_tokenizer_keeps_the_hugging_face_tokenizer(minilm: LoadedModel) -> None:
    assert BatchRenderer(minilm.tokenizer, max_tokens=128).bpe is None


@pytest.mark.parametrize("text", ["a" * 64_000, "7" * 20_000, "!?" * 10_000, "漢" * 7_000, " " * 20_000,
                                  "x\x14" * 5_000])
def test_long_runs_encode_alike(bpe: ByteLevelBPE, renderer: BatchRenderer, text: str) -> None:
    """A hostile message of one long pre-token, as a conversation's bounded tail can hold (docs/architecture.md
    gives the timings: no quadratic merge on a long piece)."""
    assert bpe.encode_batch([text]) == hf_ids(renderer.backend, [text])

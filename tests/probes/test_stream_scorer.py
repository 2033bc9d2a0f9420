from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from probes.activations.features import FeatureExtractor
from probes.conversation import Message
from probes.data import Record, read_file
from probes.errors import ModelSpecError
from probes.heads.inference import LinearHead
from probes.heads.token_probe import AGGREGATORS, StreamSettings, TokenProbe
from probes.runtime.kv_store import KVStore, cache_nbytes
from probes.runtime.response_text import prefix_ids, response_ids
from probes.runtime.stream_scorer import (
    Chunk,
    ResponseState,
    StreamScorer,
    StreamStep,
    block_of,
    require_causal,
    response_features,
    rolling_blocks,
    rolling_logits,
    rolling_states,
)

LAYER = 6
CONTEXT = (Message("user", "How do I get rid of the weeds in my garden without chemicals?"),)
RESPONSE = ("Pulling weeds by hand works well after rain, when the soil is soft. Mulch (wood chips, straw) "
            "blocks light so new seedlings cannot grow; boiling water kills weeds between paving stones, and "
            "vinegar-based sprays help on sunny days. Repeat every couple of weeks.")


def make_probe(dim: int, *, threshold: float | None = None, holdback: int = 2, max_tokens: int = 256) -> TokenProbe:
    rng = np.random.default_rng(0)
    head = LinearHead(mean=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32),
                      weight=(rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32), bias=0.0)
    settings = StreamSettings(decay=0.8, window=5, aggregator="ema", score="peak", max_response_tokens=max_tokens,
                              holdback_tokens=holdback, thresholds={"ema": threshold, "rolling_max": threshold},
                              alpha=0.1, delta=0.1)
    return TokenProbe.from_head(head, LAYER, settings)


@pytest.fixture(scope="module")
def extractor(smollm2) -> FeatureExtractor:
    return FeatureExtractor(smollm2, layer=LAYER, max_tokens=256, batch_tokens=4096, max_items=8)


def offline_logits(scorer: StreamScorer, text: str) -> np.ndarray:
    """Recompute from the prefix: the whole sequence in one forward pass, no cache."""
    prefix = prefix_ids(scorer.tokenizer, CONTEXT, 256)
    ids = response_ids(scorer.tokenizer, text)[: scorer.probe.settings.max_response_tokens]
    hidden, _ = scorer.states(prefix + ids)
    return scorer.probe.logits(hidden[len(prefix):])


def chunks_of(text: str, n: int) -> list[str]:
    bounds = np.linspace(0, len(text), n + 1).round().astype(int).tolist()
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(scorer: StreamScorer, pieces: list[str], store: KVStore, key: str = "r"):  # type: ignore[no-untyped-def]
    state = scorer.open(CONTEXT)
    steps = [scorer.feed(key, state, p, final=i == len(pieces) - 1, store=store) for i, p in enumerate(pieces)]
    return state, steps


@pytest.mark.parametrize("n_chunks", [1, 3, 8, 23])
def test_incremental_equals_full_recompute(extractor, n_chunks: int) -> None:
    """SmolLM2 real weights, fp32: scoring chunk by chunk on the KV cache == one pass over the whole text."""
    probe = make_probe(extractor.loaded.hidden_size)
    z = offline_logits(StreamScorer(extractor, probe, prefix_max_tokens=256), RESPONSE)
    tau = float(np.quantile(probe.series(z), 0.7))  # crossed somewhere in the middle
    probe = dataclasses.replace(probe, settings=dataclasses.replace(probe.settings, thresholds={"ema": tau}))
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    store = KVStore(max_bytes=1 << 34, max_entries=16)
    state, steps = stream(scorer, chunks_of(RESPONSE, n_chunks), store)
    assert state.scored == response_ids(scorer.tokenizer, RESPONSE)
    if state.recomputations == 0:  # else a chunk boundary re-tokenized and the response was scored again
        assert sum(s.new_tokens for s in steps) == len(z)
    for a in AGGREGATORS:
        offline = probe.series(z, a)
        assert state.aggregate.peak[a] == pytest.approx(offline.max(), abs=1e-4)
        assert state.aggregate.last[a] == pytest.approx(offline[-1], abs=1e-4)
    expected_stop = int(np.flatnonzero(probe.series(z) > tau)[0])
    assert steps[-1].stop_index == expected_stop
    assert sum(s.stopped_now for s in steps) == 1
    assert len(store) == 0  # a finished (or stopped) response holds no cache


def test_evicted_cache_recomputes_from_the_prefix_with_the_same_scores(extractor) -> None:
    probe = make_probe(extractor.loaded.hidden_size)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    ample = KVStore(max_bytes=1 << 34, max_entries=16)
    state_a, _ = stream(scorer, chunks_of(RESPONSE, 6), ample)
    # Two responses interleaved through a store that holds one cache: every step finds its cache evicted.
    tiny = KVStore(max_bytes=1 << 34, max_entries=1)
    s1, s2 = scorer.open(CONTEXT), scorer.open(CONTEXT)
    pieces = chunks_of(RESPONSE, 6)
    recomputed = 0
    for i, piece in enumerate(pieces):
        for key, st in (("one", s1), ("two", s2)):
            recomputed += scorer.feed(key, st, piece, final=i == len(pieces) - 1, store=tiny).recomputed
    assert tiny.evictions > 0 and recomputed > 0
    for st in (s1, s2):
        for a in AGGREGATORS:
            assert st.aggregate.peak[a] == pytest.approx(state_a.aggregate.peak[a], abs=1e-4)
            assert st.aggregate.last[a] == pytest.approx(state_a.aggregate.last[a], abs=1e-4)


@pytest.mark.parametrize("capacity", [4, 1], ids=["cache-held", "cache-evicted"])
def test_retokenisation_across_a_chunk_boundary_rolls_back_to_where_the_tokens_agree(extractor, capacity) -> None:
    """No hold-back and cuts inside words: the tokens change under the scorer, the result must not.

    Only the tokens from the first changed one run again (on the cache cut there, or from the prefix when the
    cache is gone); the aggregate is replayed from the kept tokens' logits.
    """
    probe = make_probe(extractor.loaded.hidden_size, holdback=0)
    z = offline_logits(StreamScorer(extractor, probe, prefix_max_tokens=256),
                       "Unbelievably, the extraordinarily comprehensive documentation")
    tau = float(np.quantile(probe.series(z), 0.5))
    probe = dataclasses.replace(probe, settings=dataclasses.replace(probe.settings, thresholds={"ema": tau}))
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    text = "Unbelievably, the extraordinarily comprehensive documentation"
    pieces = [text[:4], text[4:9], text[9:20], text[20:35], text[35:]]
    store = KVStore(max_bytes=1 << 34, max_entries=capacity)
    if capacity == 1:  # another response's cache takes the one slot between the chunks
        other = scorer.open(OTHER_CONTEXT)
    state = scorer.open(CONTEXT)
    steps = []
    for i, piece in enumerate(pieces):
        steps.append(scorer.feed("r", state, piece, final=i == len(pieces) - 1, store=store))
        if capacity == 1 and i < len(pieces) - 1:
            scorer.feed(f"o{i}", other if i == 0 else scorer.open(OTHER_CONTEXT), BREAD[:20], final=False,
                        store=store)
    assert state.recomputations > 0
    assert state.scored == response_ids(scorer.tokenizer, text)
    assert len(state.logits) == len(state.scored)
    assert all(s.new_tokens < s.scored_tokens for s in steps[1:] if s.recomputed), "rolled back, not re-scored"
    for a in AGGREGATORS:
        assert state.aggregate.peak[a] == pytest.approx(probe.series(z, a).max(), abs=1e-4)
        assert state.aggregate.last[a] == pytest.approx(probe.series(z, a)[-1], abs=1e-4)
    assert steps[-1].stop_index == int(np.flatnonzero(probe.series(z) > tau)[0])


def test_max_tokens_caps_what_is_read_and_says_the_rest_is_unread(extractor) -> None:
    probe = make_probe(extractor.loaded.hidden_size, max_tokens=10)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4, max_tokens=20)
    state, steps = stream(scorer, chunks_of(RESPONSE, 4), KVStore(max_bytes=1 << 34, max_entries=4))
    assert len(response_ids(scorer.tokenizer, RESPONSE)) > 20
    assert steps[-1].scored_tokens == 20 and len(state.scored) == 20
    assert steps[-1].unread and not steps[0].unread
    # A response that ends exactly at the cap was read in full.
    n = len(response_ids(scorer.tokenizer, RESPONSE))
    exact = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4, max_tokens=n)
    _, steps = stream(exact, chunks_of(RESPONSE, 3), KVStore(max_bytes=1 << 34, max_entries=4))
    assert steps[-1].scored_tokens == n and not any(s.unread for s in steps)
    with pytest.raises(ValueError):
        StreamScorer(extractor, probe, prefix_max_tokens=256, stride=11)
    with pytest.raises(ValueError):
        StreamScorer(extractor, probe, prefix_max_tokens=256, max_tokens=9)


def test_batched_offline_features_match_the_stream(extractor) -> None:
    """Training/evaluation read responses in padded batches: same per-token states as the stream's pass."""
    probe = make_probe(extractor.loaded.hidden_size)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    tok = extractor.loaded.tokenizer
    texts = [RESPONSE, "Sure.", RESPONSE[:90]]
    seqs = [(prefix_ids(tok, CONTEXT, 256), response_ids(tok, t)) for t in texts]
    got = dict(response_features(extractor, seqs, ("mean",)))
    for i, text in enumerate(texts):
        np.testing.assert_allclose(probe.logits(got[i].token_states), offline_logits(scorer, text), atol=1e-3)


OTHER_CONTEXT = (Message("system", "You are terse."), Message("user", "Any tips for baking bread at home?"))
BREAD = "Use a hot oven, weigh the flour, and let the dough rise slowly overnight in the fridge for flavour."


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_batched_cached_passes_equal_single_passes_and_a_full_recompute(extractor, monkeypatch, packed) -> None:
    """Per-token states of one batched pass over several caches == each alone == the whole sequence at once.

    Both ways of batching: packed in one row (the SDPA models) and padded (the fallback for other attentions).
    """
    assert extractor.packs_cached_batches()  # SmolLM2 runs SDPA: the packed path is the one the stream takes
    monkeypatch.setattr(extractor, "_packed", packed)
    tok = extractor.loaded.tokenizer
    seqs = [prefix_ids(tok, CONTEXT, 256) + response_ids(tok, RESPONSE),
            prefix_ids(tok, OTHER_CONTEXT, 256) + response_ids(tok, BREAD),
            prefix_ids(tok, CONTEXT, 256) + response_ids(tok, "Sure, here you go.")]
    full = [extractor.hidden_cached(s)[0].numpy() for s in seqs]
    cuts = [(len(s) // 3, 2 * len(s) // 3) for s in seqs]
    # Pass 1 from scratch (no cache, different lengths), pass 2 on the caches, pass 3 mixes a cache with none.
    first = extractor.hidden_cached_batch([(s[:a], None) for s, (a, _) in zip(seqs, cuts, strict=True)])
    second = extractor.hidden_cached_batch([(s[a:b], c) for s, (a, b), (_, c) in zip(seqs, cuts, first, strict=True)])
    third = extractor.hidden_cached_batch([(seqs[0][cuts[0][1]:], second[0][1]), (seqs[1], None)])
    for i, (seq, (a, b)) in enumerate(zip(seqs, cuts, strict=True)):
        np.testing.assert_allclose(first[i][0].numpy(), full[i][:a], rtol=1e-5, atol=2e-3)
        np.testing.assert_allclose(second[i][0].numpy(), full[i][a:b], rtol=1e-5, atol=2e-3)
        assert cache_nbytes(second[i][1]) == cache_nbytes(extractor.hidden_cached(seq[:b])[1])  # only its own
        ((alone, _),) = extractor.hidden_cached_batch([(seq[a:b], first[i][1])])  # a batch of one: nothing packed
        np.testing.assert_allclose(second[i][0].numpy(), alone.numpy(), rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(third[0][0].numpy(), full[0][cuts[0][1]:], rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(third[1][0].numpy(), full[1], rtol=1e-5, atol=2e-3)
    # The caches handed in are read, not extended (batched or alone): pass 2 runs again from them alike.
    again = extractor.hidden_cached_batch([(seqs[0][cuts[0][0]:cuts[0][1]], first[0][1]), (seqs[1][:5], None)])
    np.testing.assert_allclose(again[0][0].numpy(), second[0][0].numpy(), rtol=1e-5, atol=2e-3)


def test_score_chunks_of_many_responses_equals_feeding_each_alone(extractor) -> None:
    """Responses of different lengths and chunk counts, one batch per round: same steps as one at a time."""
    probe = make_probe(extractor.loaded.hidden_size)
    z = offline_logits(StreamScorer(extractor, probe, prefix_max_tokens=256), RESPONSE)
    tau = float(np.quantile(probe.series(z), 0.7))  # the garden response stops part way
    probe = dataclasses.replace(probe, settings=dataclasses.replace(probe.settings, thresholds={"ema": tau}))
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    plan = {"garden": (CONTEXT, chunks_of(RESPONSE, 5)), "bread": (OTHER_CONTEXT, chunks_of(BREAD, 3)),
            "short": (CONTEXT, ["Sure", ", here.", " Done."]), "garden2": (OTHER_CONTEXT, chunks_of(RESPONSE, 4))}
    alone: dict[str, list] = {}
    for key, (context, pieces) in plan.items():
        state = scorer.open(context)
        store = KVStore(max_bytes=1 << 34, max_entries=16)
        alone[key] = [scorer.feed(key, state, p, final=i == len(pieces) - 1, store=store)
                      for i, p in enumerate(pieces)]
    store = KVStore(max_bytes=1 << 34, max_entries=16)
    states = {key: scorer.open(context) for key, (context, _) in plan.items()}
    together: dict[str, list] = {key: [] for key in plan}
    for round_ in range(max(len(p) for _, p in plan.values())):
        batch = [Chunk(key, states[key], pieces[round_], round_ == len(pieces) - 1)
                 for key, (_, pieces) in plan.items() if round_ < len(pieces)]
        for chunk, step in zip(batch, scorer.score_chunks(batch, store=store), strict=True):
            together[chunk.key].append(step)
    for key in plan:
        for a, b in zip(alone[key], together[key], strict=True):
            assert (a.new_tokens, a.scored_tokens, a.stop_index, a.stopped_now, a.recomputed) == \
                (b.new_tokens, b.scored_tokens, b.stop_index, b.stopped_now, b.recomputed), key
            assert (b.smoothed, b.peak) == pytest.approx((a.smoothed, a.peak), abs=1e-4)
    assert together["garden"][-1].stop_index == int(np.flatnonzero(probe.series(z) > tau)[0])
    assert states["garden"].aggregate.peak["ema"] == pytest.approx(probe.series(z).max(), abs=1e-4)
    assert len(store) == 0
    with pytest.raises(ValueError):
        scorer.score_chunks([Chunk("x", scorer.open(CONTEXT), "a", False)] * 2, store=store)


def test_a_failing_batch_changes_nothing_and_can_be_retried(extractor, monkeypatch) -> None:
    probe = make_probe(extractor.loaded.hidden_size)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256)
    pieces = chunks_of(RESPONSE, 3)
    reference, _ = stream(scorer, pieces, KVStore(max_bytes=1 << 34, max_entries=4))
    store = KVStore(max_bytes=1 << 34, max_entries=4)
    state = scorer.open(CONTEXT)
    scorer.score_chunks([Chunk("r", state, pieces[0], False)], store=store)
    before = (state.text, list(state.scored), state.aggregate.count, cache_nbytes(store.get("r")))
    real = extractor.hidden_cached_batch
    calls = []

    def flaky(items):  # type: ignore[no-untyped-def]
        calls.append(len(items))
        if len(calls) == 2:  # the first pass succeeds, the second fails
            raise RuntimeError("out of memory")
        return real(items)

    monkeypatch.setattr(extractor, "hidden_cached_batch", flaky)
    monkeypatch.setattr(extractor, "max_items", 1)  # two passes, whether the extractor packs or pads
    other = scorer.open(OTHER_CONTEXT)
    with pytest.raises(RuntimeError):
        scorer.score_chunks([Chunk("r", state, pieces[1], False), Chunk("o", other, BREAD, True)], store=store)
    assert (state.text, state.scored, state.aggregate.count, cache_nbytes(store.get("r"))) == before
    assert other.text == "" and "o" not in store
    monkeypatch.setattr(extractor, "hidden_cached_batch", real)
    for i, piece in enumerate(pieces[1:], start=1):
        scorer.score_chunks([Chunk("r", state, piece, i == len(pieces) - 1)], store=store)
    assert state.scored == reference.scored
    assert state.aggregate.peak["ema"] == pytest.approx(reference.aggregate.peak["ema"], abs=1e-4)


def test_kv_store_evicts_least_recently_used_by_bytes_and_count() -> None:
    def cache(n: int) -> list[torch.Tensor]:
        return [torch.zeros(n, dtype=torch.float32)]

    store = KVStore(max_bytes=100, max_entries=3)
    assert store.put("a", cache(10)) == [] and store.put("b", cache(10)) == []
    store.get("a")  # a is now the most recent
    assert store.put("c", cache(6)) == ["b"]  # 40 + 40 + 24 bytes > 100: b is the oldest
    assert store.bytes == 64 and "b" not in store
    store.put("d", cache(1))
    store.put("e", cache(1))
    assert len(store) == 3 and "a" not in store
    assert cache_nbytes(cache(7)) == 28


def test_encoders_are_refused(minilm) -> None:
    with pytest.raises(ModelSpecError):
        require_causal(minilm)



# ---------------------------------------------------------------- rolling view past the window
LONG = RESPONSE + " " + BREAD + " " + RESPONSE  # ~110 tokens: a window of 16 and many blocks of 4 after it


def test_rolling_blocks_cover_every_token_once_with_a_bounded_context() -> None:
    for n in (0, 5, 16, 17, 20, 21, 103):
        blocks = rolling_blocks(n, 16, 4)
        assert [t for _, first, end in blocks for t in range(first, end)] == list(range(n))
        for start, first, end in blocks:
            assert end - start <= 16
            assert start == 0 if first == 0 else first - start == 12
            assert all(block_of(t, 16, 4)[0] == start for t in range(first, end))


@pytest.mark.parametrize(("n_chunks", "capacity"), [(1, 4), (5, 4), (17, 4), (9, 1)],
                         ids=["one-chunk", "5-chunks", "17-chunks", "9-chunks-evicted"])
def test_rolling_read_equals_the_offline_blocks(extractor, n_chunks: int, capacity: int) -> None:
    """Past the window every token is scored on prefix + the window − stride tokens before its block: chunked
    (cache held or lost between chunks) or in one piece, the logits are those of ``rolling_logits``."""
    probe = make_probe(extractor.loaded.hidden_size, max_tokens=16)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4)
    tok = scorer.tokenizer
    ids = response_ids(tok, LONG)
    (z,) = rolling_logits(extractor, probe.logits, [(prefix_ids(tok, CONTEXT, 256), ids)], window=16, stride=4)
    store = KVStore(max_bytes=1 << 34, max_entries=capacity)
    state = scorer.open(CONTEXT)
    pieces = chunks_of(LONG, n_chunks)
    for i, piece in enumerate(pieces):
        scorer.feed("r", state, piece, final=i == len(pieces) - 1, store=store)
        if capacity == 1:  # another response takes the one slot: the next chunk finds no cache
            scorer.feed(f"o{i}", scorer.open(OTHER_CONTEXT), BREAD[:30], final=False, store=store)
    assert state.scored == ids and len(ids) > 16 + 10 * 4
    np.testing.assert_allclose(state.logits, z, atol=2e-3)
    for a in AGGREGATORS:
        assert state.aggregate.peak[a] == pytest.approx(probe.series(z, a).max(), abs=1e-3)
    # Past the window the context is not the whole response: the scores are not those of a full-context read.
    hidden, _ = scorer.states(state.prefix + ids)
    full = probe.logits(hidden[len(state.prefix):])
    np.testing.assert_allclose(full[:16], z[:16], atol=2e-3)
    assert np.abs(full[16:] - z[16:]).max() > 1e-2


def test_rolling_states_are_what_rolling_logits_scores(extractor) -> None:
    """The leave-source-out folds fit heads on stored states: a head applied to them gives the streamed logits."""
    probe = make_probe(extractor.loaded.hidden_size, max_tokens=16)
    tok = extractor.loaded.tokenizer
    pairs = [(prefix_ids(tok, CONTEXT, 256), response_ids(tok, LONG)),
             (prefix_ids(tok, OTHER_CONTEXT, 256), response_ids(tok, BREAD[:30]))]
    calls: list[int] = []
    states = rolling_states(extractor, pairs, window=16, stride=4, progress=calls.append)
    logits = rolling_logits(extractor, probe.logits, pairs, window=16, stride=4)
    assert [s.shape for s in states] == [(len(r), extractor.loaded.hidden_size) for _, r in pairs]
    assert states[0].dtype == np.float16
    assert sum(calls) == sum(len(rolling_blocks(len(r), 16, 4)) for _, r in pairs)  # a tick per forward pass
    for s, z in zip(states, logits, strict=True):
        np.testing.assert_allclose(probe.logits(s), z, atol=2e-2)  # float16 storage


def test_rolling_cost_per_token_is_bounded(extractor, monkeypatch) -> None:
    """Every pass is at most prefix + window tokens long, the prefix runs once, and past the window a block of
    ``stride`` tokens re-reads only its window − stride context: tokens run = p + n + (blocks − 1)·(W − S)."""
    probe = make_probe(extractor.loaded.hidden_size, max_tokens=16)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4)
    runs: list[tuple[int, bool]] = []
    real = extractor.hidden_cached_batch

    def counted(items):  # type: ignore[no-untyped-def]
        runs.extend((len(ids), past is not None) for ids, past in items)
        return real(items)

    monkeypatch.setattr(extractor, "hidden_cached_batch", counted)
    text = " ".join([LONG] * 3)  # ~330 tokens
    store = KVStore(max_bytes=1 << 34, max_entries=4)
    state = scorer.open(CONTEXT)
    pieces = chunks_of(text, 40)
    for i, piece in enumerate(pieces):
        scorer.feed("r", state, piece, final=i == len(pieces) - 1, store=store)
    n, p = len(state.scored), len(state.prefix)
    assert n > 300
    blocks = len(rolling_blocks(n, 16, 4))
    assert max(length for length, _ in runs) <= p + 16
    assert sum(not cached for _, cached in runs) == 1 + state.recomputations  # the prefix's keys are reused
    if state.recomputations == 0:
        assert sum(length for length, _ in runs) == p + n + (blocks - 1) * 12
    assert sum(length for length, _ in runs) <= p + n * 16 / 4 + state.recomputations * (p + 16)


def test_a_checkpoint_mid_rolling_resumes_to_the_same_scores(extractor) -> None:
    """State rebuilt as worker/responses.py checkpoints it (prefix, scored, logits, text after the anchor), past
    the window, no cache: the rest of the response scores as without the restart."""
    probe = make_probe(extractor.loaded.hidden_size, max_tokens=16)
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4)
    pieces = chunks_of(LONG, 8)
    reference, _ = stream(scorer, pieces, KVStore(max_bytes=1 << 34, max_entries=4))
    # A threshold first crossed late, past the resume point: the stop itself must come out of the resumed run.
    # It needs a token whose smoothed score beats every earlier one; the head or its negation has one.
    for sign in (1.0, -1.0):
        series = probe.series(sign * np.asarray(reference.logits))
        records = [i for i in range(60, len(series)) if series[i] > series[:i].max()]
        if records:
            break
    late = records[0]
    tau = float((series[:late].max() + series[late]) / 2)
    probe = dataclasses.replace(probe, weight=sign * probe.weight, bias=sign * probe.bias,
                                settings=dataclasses.replace(probe.settings, thresholds={"ema": tau}))
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=4)
    state = scorer.open(CONTEXT)
    store = KVStore(max_bytes=1 << 34, max_entries=4)
    for piece in pieces[:3]:
        scorer.feed("r", state, piece, final=False, store=store)
    assert 16 < len(state.scored) < late and state.stop_index is None
    resumed = scorer.resume(prefix=state.prefix, scored=state.scored, logits=state.logits,
                            text=state.text[state.anchor_char:], anchor_tok=state.anchor_tok)
    fresh = KVStore(max_bytes=1 << 34, max_entries=4)
    steps = [scorer.feed("r", resumed, piece, final=i == 4, store=fresh) for i, piece in enumerate(pieces[3:])]
    assert resumed.scored[: late + 1] == reference.scored[: late + 1]
    np.testing.assert_allclose(resumed.logits[: late + 1], sign * np.asarray(reference.logits[: late + 1]),
                               atol=2e-3)
    assert steps[-1].stop_index == late and sum(s.stopped_now for s in steps) == 1


RESPONSES = "refusal_direction_completions.conversations.jsonl"


@pytest.fixture(scope="module")
def trained(extractor, datasets_dir) -> tuple[TokenProbe, list[Record], list[Record]]:  # type: ignore[no-untyped-def]
    """A real token probe (window 32, stride 16) fitted on the first 48 tokens of 40 harmful and 40 benign real
    responses, its threshold the 95th percentile of the smoothed peaks of 60 other benign responses read whole
    (rolling, 160 tokens; a few benign peaks sit far above the rest): what has not been read is held out."""
    from probes.fitting.token_train import fit_token_head, response_label, token_training_set

    records = read_file(datasets_dir / RESPONSES)
    harmful = [r for r in records if response_label(r) == 1]
    benign = [r for r in records if response_label(r) == 0]
    tok = extractor.loaded.tokenizer

    def sequences(rs: list[Record], n: int) -> list[tuple[list[int], list[int]]]:
        return [(prefix_ids(tok, r.messages[:-1], 256), response_ids(tok, r.messages[-1].content)[:n]) for r in rs]

    train = harmful[:40] + benign[:40]
    feats = [f for _, f in sorted(response_features(extractor, sequences(train, 48), ()), key=lambda x: x[0])]
    data = token_training_set([f.token_states for f in feats], [response_label(r) for r in train], per_response=48,
                              warmup=8, seed=0)
    settings = StreamSettings(decay=0.9, window=16, aggregator="ema", score="peak", max_response_tokens=32,
                              holdback_tokens=2, thresholds={"ema": None}, alpha=0.05, delta=0.1)
    probe = TokenProbe.from_head(fit_token_head(data, c=0.5, seed=0), LAYER, settings)
    cal = rolling_logits(extractor, probe.logits, sequences(benign[40:100], 160), window=32, stride=16)
    tau = float(np.quantile([probe.series(z).max() for z in cal], 0.95))  # a 5 % budget, as stream.alpha
    probe = dataclasses.replace(probe, settings=dataclasses.replace(settings, thresholds={"ema": tau}))
    return probe, harmful[40:], benign[100:]


def test_a_harmful_payload_after_a_long_benign_preamble_is_stopped(extractor, trained) -> None:
    """Real probe, real responses: a benign response of 4+ windows is read to its end and allowed; a harmful
    request answered with that benign text first and then a harmful completion the probe recognises is stopped
    inside the completion, past the first window (where the stream used to stop reading and allow it); a restart
    from a checkpoint mid-rolling stops at the same token."""
    probe, harmful, benign = trained
    scorer = StreamScorer(extractor, probe, prefix_max_tokens=256, stride=16)
    long = next(r for r in benign if len(r.messages[-1].content) >= 800)
    preamble = long.messages[-1].content[:800]

    def read(context: Sequence[Message], text: str, n: int = 6) -> tuple[ResponseState, list[StreamStep]]:
        state = scorer.open(context)
        store = KVStore(max_bytes=1 << 34, max_entries=4)
        pieces = chunks_of(text, n)
        return state, [scorer.feed("r", state, p, final=i == n - 1, store=store) for i, p in enumerate(pieces)]

    state, steps = read(long.messages[:-1], preamble)
    assert len(state.scored) > 4 * 32 and steps[-1].stop_index is None and not steps[-1].unread
    # The first held-out harmful exchange whose completion the probe stops, and whose request followed by the
    # benign preamble alone it does not.
    record = next(r for r in harmful if read(r.messages[:-1], r.messages[-1].content[:400], 2)[1][-1].stop_index
                  is not None and read(r.messages[:-1], preamble, 2)[1][-1].stop_index is None)
    context, text = record.messages[:-1], preamble + "\n\n" + record.messages[-1].content[:400]
    state, steps = read(context, text, 10)
    stop = steps[-1].stop_index
    assert stop is not None and stop >= len(response_ids(scorer.tokenizer, preamble)) - 2 > 32
    # Restart mid-rolling (past the preamble's window, before the payload) from what a checkpoint holds.
    pieces = chunks_of(text, 10)
    before = scorer.open(context)
    store = KVStore(max_bytes=1 << 34, max_entries=4)
    for p in pieces[:4]:
        scorer.feed("r", before, p, final=False, store=store)
    assert 32 < len(before.scored) < stop
    resumed = scorer.resume(prefix=before.prefix, scored=before.scored, logits=before.logits,
                            text=before.text[before.anchor_char:], anchor_tok=before.anchor_tok)
    fresh = KVStore(max_bytes=1 << 34, max_entries=4)
    after = [scorer.feed("r", resumed, p, final=i == 5, store=fresh) for i, p in enumerate(pieces[4:])]
    assert after[-1].stop_index == stop

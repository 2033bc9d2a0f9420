"""Score a response while it streams: only its new tokens run, continuing the prefix's KV cache.

The token sequence of a response is always ``prefix_ids(context) + response_ids(text)``: the context rendered
with the chat template up to the assistant header, then the response text tokenized on its own. Training,
offline evaluation and the stream all read that same sequence, so the streamed scores equal an offline
recomputation. Chunks split text, not tokens: a chunk boundary can fall inside what the tokenizer later
merges into one token, so the last ``holdback_tokens`` of a non-final chunk are left for the next one, and if
the re-tokenized text still disagrees with what was scored, the response rolls back to where the two agree: its
cache is cut there, its aggregate replayed from the kept token logits, and only the tokens after it run again
(a causal model's states before the first changed token cannot change).

Context and response text are normalised first (probes/activations/normalise.py), as the prompt probe and the experts read
them; a chunk boundary inside a sequence that normalisation rewrites is one more re-tokenization, rolled back as
above.

KV caches are the only large per-response state (``KVStore``: LRU, bounded by bytes and count). Losing one
costs a recomputation of the prefix, never a different score.

Rolling view: the first ``window`` response tokens (the manifest's ``max_response_tokens``, W) are read from the
response's start, as the probe was trained and calibrated. Past them the response is read in blocks of
``stride`` (S) tokens, each with the prefix and the W − S response tokens before the block as its context
(``rolling_blocks``), so every token sees the prefix and at least W − S response tokens before it, a forward
pass is never longer than prefix + W, and a block costs W tokens run (its context re-read on the prefix's cached
keys) for S tokens scored. The aggregate (EMA, rolling mean, peak) carries across blocks. A response longer
than ``max_tokens`` is not read past it: the step says so (``unread``) and the caller fails closed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.activations.batching import plan_batches
from probes.activations.features import FeatureExtractor, crop_cache, pool
from probes.activations.models import LoadedModel
from probes.activations.special_tokens import special_strings
from probes.conversation import Message
from probes.errors import ModelSpecError
from probes.heads.token_probe import StreamAggregate, TokenProbe, first_crossing
from probes.runtime.kv_store import KVStore
from probes.runtime.response_text import neutralise_tail, neutralise_window, prefix_ids

F32 = npt.NDArray[np.float32]
# Response tokens re-tokenized behind the last scored one on every chunk: the text is tokenized from an anchor
# this far back (a token boundary both tokenizations share), not from its start, so a chunk costs its own length.
RETOKENIZE_OVERLAP_TOKENS = 16


def require_causal(loaded: LoadedModel) -> None:
    """A KV cache continues a sequence only in a causal decoder; an encoder re-reads every token."""
    config = loaded.model.config
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" not in archs and not getattr(config, "is_decoder", False):
        raise ModelSpecError(f"{loaded.model_id} is not a causal decoder: responses cannot be scored incrementally")


@dataclass
class ResponseState:
    """What the scorer keeps per open response besides its KV cache: small, and rebuilt from the prefix."""

    prefix: list[int]
    aggregate: StreamAggregate
    #: The response from ``anchor_char`` on (what came before is in ``scored[:anchor_tok]``), with control-token
    #: strings made inert (``neutralise_tail``).
    text: str = ""
    scored: list[int] = field(default_factory=list)
    #: ``scored[:anchor_tok]`` is the tokenization of ``text[:anchor_char]`` and what follows tokenizes on its
    #: own: a chunk re-tokenizes ``text[anchor_char:]`` only (incremental tokenization).
    anchor_char: int = 0
    anchor_tok: int = 0
    #: The probe's logit of each scored token: a roll-back replays the aggregate from them, not the model.
    logits: list[float] = field(default_factory=list)
    stop_index: int | None = None
    recomputations: int = 0
    #: The held KV cache covers prefix + ``scored[cache_start:]`` (the rolling block's context on).
    cache_start: int = 0

    def nbytes(self) -> int:
        """Bytes held besides the cache: token ids and logits (8 each), text (1 a char, roughly), the aggregate."""
        return 8 * (len(self.prefix) + 2 * len(self.scored)) + len(self.text) + self.aggregate.nbytes()


@dataclass(frozen=True)
class StreamStep:
    """What one chunk did: tokens scored, whether the stream has (just) crossed the stop threshold."""

    new_tokens: int
    scored_tokens: int
    stop_index: int | None
    stopped_now: bool
    recomputed: bool
    p_unsafe: float
    smoothed: float
    peak: float
    #: The response has text past ``StreamScorer.max_tokens``, which is never read: not judged in full.
    unread: bool = False


@dataclass(frozen=True)
class Chunk:
    """The next piece of one open response, as ``StreamScorer.score_chunks`` takes it."""

    key: str
    state: ResponseState
    delta: str
    final: bool


@dataclass(frozen=True)
class _Segment:
    """One forward pass of a chunk: new tokens of one rolling block, after what of its context is not cached."""

    run: list[int]  # ``new`` on the held cache; context + new on the prefix's cached keys; else prefix too
    past: Any | None
    new: int  # tokens scored: the last ``new`` of ``run``
    cache_start: int  # the response token the resulting cache's response part starts at


@dataclass(frozen=True)
class _Plan:
    chunk: Chunk
    text: str
    capped: bool
    retokenized: bool
    kept: int  # scored tokens the re-tokenized text still agrees with (all of them unless ``retokenized``)
    new: list[int]
    anchor: tuple[int, int]  # the next (anchor_char, anchor_tok)
    segments: list[_Segment]  # one per rolling block the new tokens fall in, in order
    recompute: bool  # the first segment re-reads the prefix: its cache was lost (or cut before its block)


def rolling_blocks(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The forward passes that read ``n_tokens`` response tokens: ``(context_start, first, end)`` each.

    The first reads tokens [0, window) from the response's start; each later one scores ``stride`` tokens
    [first, end) reading response tokens [context_start, end), context_start = first − (window − stride).
    """
    blocks = [(0, 0, min(n_tokens, window))] if n_tokens else []
    for first in range(window, n_tokens, stride):
        blocks.append((first - (window - stride), first, min(n_tokens, first + stride)))
    return blocks


def default_stride(window: int) -> int:
    """Tokens scored per rolling block unless configured: a quarter of the window (a token costs ~4 run)."""
    return max(1, window // 4)


def block_of(index: int, window: int, stride: int) -> tuple[int, int]:
    """``(context_start, end)`` of the rolling block response token ``index`` is scored in."""
    if index < window:
        return 0, window
    first = window + (index - window) // stride * stride
    return first - (window - stride), first + stride


class StreamScorer:
    """The token probe on the bundle's truncated model, fed one response chunk at a time."""

    def __init__(self, extractor: FeatureExtractor, probe: TokenProbe, *, prefix_max_tokens: int,
                 stride: int | None = None, max_tokens: int | None = None) -> None:
        """``stride``: tokens scored per rolling block past the window (None: a quarter of it); ``max_tokens``:
        response tokens read at most (None: 32 windows), the rest is reported ``unread``."""
        require_causal(extractor.loaded)
        if extractor.layer != probe.layer:
            raise ValueError(f"the token probe reads block {probe.layer}, the extractor block {extractor.layer}")
        self.extractor = extractor
        self.probe = probe
        self.prefix_max_tokens = prefix_max_tokens
        self.window = probe.settings.max_response_tokens
        self.stride = default_stride(self.window) if stride is None else stride
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"the rolling stride must be in [1, {self.window}] (the window), not {self.stride}")
        self.max_tokens = 32 * self.window if max_tokens is None else max_tokens
        if self.max_tokens < self.window:
            raise ValueError(f"max_tokens {self.max_tokens} is shorter than the window {self.window}")
        self.specials = special_strings(self.tokenizer)
        self._window = neutralise_window(self.specials)

    @property
    def tokenizer(self) -> Any:
        return self.extractor.loaded.tokenizer

    def open(self, context: Sequence[Message]) -> ResponseState:
        return ResponseState(prefix=prefix_ids(self.tokenizer, context, self.prefix_max_tokens),
                             aggregate=self.probe.new_aggregate())

    def resume(self, *, prefix: list[int], scored: list[int], logits: list[float], text: str,
               anchor_tok: int) -> ResponseState:
        """A response's state rebuilt from a checkpoint: the aggregate replayed from the kept token logits, no
        model run (its KV cache is recomputed from prefix + scored at its next chunk, as after an eviction).

        ``text`` is the response from the anchor on (``scored[:anchor_tok]`` covers what came before it).
        """
        if len(logits) != len(scored) or not 0 <= anchor_tok <= len(scored):
            raise ValueError("a checkpoint's logits, scored tokens and anchor disagree")
        if not all(math.isfinite(v) for v in logits):
            raise ValueError("a checkpoint's logits are not finite")
        settings = self.probe.settings
        state = ResponseState(prefix=list(prefix), aggregate=self.probe.new_aggregate(), text=text,
                              scored=list(scored), logits=list(logits), anchor_char=0, anchor_tok=anchor_tok)
        if logits:
            state.stop_index = first_crossing(state.aggregate.push(logits)[settings.aggregator], settings.threshold)
        return state

    def step_of(self, state: ResponseState, *, new_tokens: int = 0, stopped_now: bool = False,
                recomputed: bool = False, unread: bool = False) -> StreamStep:
        """Where ``state`` stands, as the step a chunk would report."""
        a = self.probe.settings.aggregator
        return StreamStep(
            new_tokens=new_tokens, scored_tokens=len(state.scored), stop_index=state.stop_index,
            stopped_now=stopped_now, recomputed=recomputed, p_unsafe=self.probe.p_unsafe(state.aggregate),
            smoothed=state.aggregate.last[a], peak=state.aggregate.peak[a], unread=unread,
        )

    def states(self, ids: Sequence[int], past: Any | None = None) -> tuple[F32, Any]:
        hidden, cache = self.extractor.hidden_cached(ids, past)
        return hidden.cpu().numpy().astype(np.float32), cache

    def feed(self, key: str, state: ResponseState, delta: str, *, final: bool, store: KVStore) -> StreamStep:
        """Append ``delta`` to the response and score the tokens it completes (all of them when ``final``)."""
        return self.score_chunks([Chunk(key, state, delta, final)], store=store)[0]

    def score_chunks(self, chunks: Sequence[Chunk], *, store: KVStore) -> list[StreamStep]:
        """One chunk each of several open responses, their new tokens run together; a step per chunk, in order.

        Each response gets exactly what ``feed`` alone gives it: the batch only shares forward passes (packed:
        one for all; padded: one for the responses continuing a held cache, one for those read from their
        prefix). Nothing changes, neither a state nor the store, until every pass has succeeded: a batch that
        raises can be retried, or split.
        """
        keys = [c.key for c in chunks]
        if len(set(keys)) != len(keys):
            raise ValueError("one chunk per response in a batch: feed a response's next chunk in the next batch")
        plans = [self._plan(c, store) for c in chunks]
        runs = [(p.chunk.key, i, seg) for p in plans for i, seg in enumerate(p.segments)]
        hidden: dict[tuple[str, int], tuple[F32, Any]] = {}
        # Packed passes take cached and uncached items alike; padded ones would pad every cache to the prefixes.
        groups = ([runs] if self.extractor.packs_cached_batches() else
                  [[r for r in runs if r[2].past is not None], [r for r in runs if r[2].past is None]])
        for group in groups:
            lengths = [len(seg.run) for _, _, seg in group]
            for indices in plan_batches(lengths, batch_tokens=self.extractor.batch_tokens,
                                        max_items=self.extractor.max_items) if group else []:
                batch = [group[i] for i in indices]
                outputs = self.extractor.hidden_cached_batch([(seg.run, seg.past) for _, _, seg in batch])
                for (key, i, seg), (states, cache) in zip(batch, outputs, strict=True):
                    hidden[key, i] = states[len(seg.run) - seg.new:].cpu().numpy().astype(np.float32), cache
        # A NaN would poison the running aggregate for good (it never crosses the threshold, so the response would
        # end "allow"): raised before any state changes, so the caller fails that response closed.
        broken = sorted({key for (key, _), (states, _) in hidden.items() if not np.isfinite(states).all()})
        if broken:
            raise ValueError(f"non-finite hidden states for {len(broken)} of {len(chunks)} responses")
        return [self._commit(p, [hidden[p.chunk.key, i] for i in range(len(p.segments))], store) for p in plans]

    def _plan(self, chunk: Chunk, store: KVStore) -> _Plan:
        """What ``chunk`` needs run, read from its state and the store without changing either."""
        settings = self.probe.settings
        state = chunk.state
        cap = self.max_tokens
        if len(state.scored) >= cap:
            # Nothing past the cap is read, kept or tokenized: any more text leaves the response unjudged.
            return _Plan(chunk=chunk, text=state.text, capped=bool(chunk.delta), retokenized=False,
                         kept=len(state.scored), new=[], anchor=(state.anchor_char, state.anchor_tok), segments=[],
                         recompute=False)
        text = neutralise_tail(state.text, chunk.delta, self.specials)
        tail = self.tokenizer(text[state.anchor_char:], add_special_tokens=False, return_offsets_mapping=True)
        tail_ids, offsets = list(tail["input_ids"]), list(tail["offset_mapping"])
        base = state.anchor_tok  # ids = scored[:base] + tail_ids, never built: the tail is all a chunk reads
        total = min(base + len(tail_ids), cap)
        capped = base + len(tail_ids) > cap
        # The text re-tokenized differently across a chunk boundary: roll back to the tokens that still agree.
        kept = base + _agreeing(tail_ids[: total - base], state.scored[base:])
        retokenized = kept < len(state.scored)
        upto = total if chunk.final or capped else max(kept, total - settings.holdback_tokens)
        new = tail_ids[kept - base : upto - base]
        segments = self._segments(state, kept, new, store.get(chunk.key) if new else None)
        cut, anchor_tok = self._next_anchor(state, text, tail_ids, offsets, scored_after=upto)
        # Text before the anchor is never read again: the state keeps the response from its anchor on.
        return _Plan(chunk=chunk, text=text[cut:], capped=capped, retokenized=retokenized, kept=kept, new=new,
                     anchor=(0, anchor_tok), segments=segments,
                     recompute=bool(segments) and segments[0].past is None and kept > 0)

    def _segments(self, state: ResponseState, kept: int, new: list[int], held: Any | None) -> list[_Segment]:
        """The passes that score ``new`` (response tokens from ``kept`` on), one per rolling block.

        The first continues the held cache when it still covers the block's context (the cache is cut to
        ``kept`` after a roll-back: views, the held cache is not changed); a pass that starts a block reads its
        context again on the prefix's cached keys; without a cache the prefix runs too.
        """
        segments: list[_Segment] = []
        n_prefix = len(state.prefix)
        pos = kept
        while pos - kept < len(new):
            start, end = block_of(pos, self.window, self.stride)
            end = min(end, kept + len(new))
            fresh = new[pos - kept : end - kept]
            if held is not None and start == state.cache_start and start <= kept and pos == kept:
                past: Any | None = crop_cache(held, n_prefix + kept - start) if kept < len(state.scored) else held
                run = fresh
            else:
                context = state.scored[start:kept] + new[max(0, start - kept) : pos - kept]
                past = crop_cache(held, n_prefix) if held is not None else None
                run = (state.prefix if past is None else []) + context + fresh
            segments.append(_Segment(run=run, past=past, new=len(fresh), cache_start=start))
            pos = end
        return segments

    def _next_anchor(self, state: ResponseState, text: str, tail_ids: Sequence[int],
                     offsets: Sequence[tuple[int, int]], *, scored_after: int) -> tuple[int, int]:
        """The latest token boundary at least ``RETOKENIZE_OVERLAP_TOKENS`` behind the last scored token and
        before the characters a next chunk could still neutralise, where the text tokenizes the same cut there
        as whole (checked); the current anchor if there is none."""
        base_char, base_tok = state.anchor_char, state.anchor_tok
        last = min(scored_after - RETOKENIZE_OVERLAP_TOKENS, base_tok + len(offsets) - 1) - base_tok
        limit = len(text) - self._window
        tries = 0
        for j in range(last, 0, -1):
            # Token j - 1 ends where the cut goes (a tokenizer that trims offsets leaves a leading space out of
            # token j's own span); byte-level pieces of one character share offsets and are no boundary.
            cut = base_char + offsets[j - 1][1]
            if cut > limit or offsets[j - 1][1] <= offsets[j - 1][0] or offsets[j - 1][1] > offsets[j][0]:
                continue
            again = self.tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
            if list(again) == list(tail_ids[j:]):
                return cut, base_tok + j
            tries += 1
            if tries == 3:
                break
        return base_char, base_tok

    def _commit(self, plan: _Plan, computed: Sequence[tuple[F32, Any]], store: KVStore) -> StreamStep:
        settings = self.probe.settings
        chunk, state = plan.chunk, plan.chunk.state
        state.text = plan.text
        state.anchor_char, state.anchor_tok = plan.anchor
        recomputed = plan.retokenized or plan.recompute
        if plan.retokenized:
            del state.scored[plan.kept :], state.logits[plan.kept :]
            state.aggregate, state.stop_index = self.probe.new_aggregate(), None
            if state.logits:
                state.stop_index = first_crossing(state.aggregate.push(state.logits)[settings.aggregator],
                                                  settings.threshold)
            store.pop(chunk.key)
            state.recomputations += 1
        stopped_now = False
        if plan.new:
            assert len(computed) == len(plan.segments), "a chunk with new tokens was not run"
            hidden = np.concatenate([h for h, _ in computed])
            past = computed[-1][1]
            logits = self.probe.logits(hidden)
            series = state.aggregate.push(logits)[settings.aggregator]
            start = len(state.scored)
            state.scored.extend(plan.new)
            state.logits.extend(np.asarray(logits, dtype=np.float64).tolist())
            state.cache_start = plan.segments[-1].cache_start
            if state.stop_index is None:
                hit = first_crossing(series, settings.threshold)
                if hit is not None:
                    state.stop_index, stopped_now = start + hit, True
            if chunk.final or plan.capped or state.stop_index is not None:
                store.pop(chunk.key)
            else:
                store.put(chunk.key, past)
        elif chunk.final or plan.capped:
            store.pop(chunk.key)
        return self.step_of(state, new_tokens=len(plan.new), stopped_now=stopped_now, recomputed=recomputed,
                            unread=plan.capped)


def _agreeing(ids: Sequence[int], scored: Sequence[int]) -> int:
    """How many of ``scored`` the re-tokenized ``ids`` still start with."""
    if list(ids[: len(scored)]) == list(scored):
        return len(scored)
    return next((i for i, (a, b) in enumerate(zip(ids, scored, strict=False)) if a != b), min(len(ids), len(scored)))


@dataclass(frozen=True)
class ResponseFeatures:
    """One response read offline in one forward pass: its per-token logits and pooled conversation states."""

    token_states: F32
    pooled: dict[str, F32]
    prefix_tokens: int


def response_features(
    extractor: FeatureExtractor, sequences: Sequence[tuple[list[int], list[int]]], poolings: Sequence[str],
    progress: Any | None = None,
) -> Iterator[tuple[int, ResponseFeatures]]:
    """Batched offline pass over (prefix, response) id pairs: response-token states and pooled states.

    The pooled states cover the whole sequence (prefix and response), what a conversation-level probe reads.
    Yields in batch order with each item's index.
    """
    ids = [p + r for p, r in sequences]
    for batch in extractor.batches(ids):
        hidden, mask = extractor.hidden(batch)
        pooled = {name: pool(hidden, mask, name).cpu().numpy().astype(np.float32)  # type: ignore[arg-type]
                  for name in poolings}
        for row, index in enumerate(batch.indices):
            prefix, response = sequences[index]
            start, end = len(prefix), len(prefix) + len(response)
            yield index, ResponseFeatures(
                token_states=hidden[row, start:end].cpu().numpy().astype(np.float32),
                pooled={name: values[row] for name, values in pooled.items()}, prefix_tokens=len(prefix),
            )
        if progress is not None:
            progress(len(batch.indices))


def offline_stop(probe: TokenProbe, token_logits: npt.ArrayLike) -> int | None:
    """Where the stream would stop over these logits: the same rule ``StreamScorer.feed`` applies."""
    return first_crossing(probe.series(token_logits), probe.settings.threshold)


def _rolling_reads(extractor: FeatureExtractor, sequences: Sequence[tuple[list[int], list[int]]], *, window: int,
                   stride: int, progress: Any | None = None) -> Iterator[tuple[int, int, int, F32]]:
    """``(sequence index, first, end, states of response tokens [first, end))`` of every rolling block."""
    items = [(index, block) for index, (_, response) in enumerate(sequences)
             for block in rolling_blocks(len(response), window, stride)]
    passes = [(sequences[index][0], sequences[index][1][block[0]:block[2]]) for index, block in items]
    for i, feats in response_features(extractor, passes, (), progress):
        index, (start, first, end) = items[i]
        yield index, first, end, feats.token_states[first - start :]


def rolling_logits(extractor: FeatureExtractor, logits: Callable[[F32], npt.NDArray[np.float64]],
                   sequences: Sequence[tuple[list[int], list[int]]], *, window: int,
                   stride: int) -> list[npt.NDArray[np.float64]]:
    """Per-token logits (``logits`` of the token states, e.g. ``TokenProbe.logits``) of whole (prefix, response)
    pairs read offline as the stream reads them: the first ``window`` tokens from the response's start, then
    ``rolling_blocks`` (one forward pass per block)."""
    out = [np.empty(len(response), dtype=np.float64) for _, response in sequences]
    for index, first, end, states in _rolling_reads(extractor, sequences, window=window, stride=stride):
        out[index][first:end] = logits(states)
    return out


def rolling_states(extractor: FeatureExtractor, sequences: Sequence[tuple[list[int], list[int]]], *, window: int,
                   stride: int, progress: Any | None = None) -> list[npt.NDArray[np.float16]]:
    """The token states behind ``rolling_logits`` ([T, D] per pair, float16 to halve the memory), for heads that
    are fitted after the read (leave-source-out folds). ``progress`` advances by forward passes (rolling blocks)."""
    dim = extractor.loaded.hidden_size
    out = [np.empty((len(response), dim), dtype=np.float16) for _, response in sequences]
    for index, first, end, states in _rolling_reads(extractor, sequences, window=window, stride=stride,
                                                    progress=progress):
        out[index][first:end] = states
    return out

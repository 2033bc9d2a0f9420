"""Long conversations scored in windows, so a harmful request cannot be hidden by length.

The probe reads at most ``max_tokens`` and keeps the latest ones (probes/activations/render.py): a harmful request followed
by enough filler is cut away unseen, and mean pooling dilutes it even when it is kept (engineering.md,
"Evasions measured"). A conversation whose rendering is longer than ``window_tokens`` is therefore also read as
overlapping windows over its message content, each rendered through the chat template as a conversation of its
own (so every window looks like the traffic the probe was trained on), and its score is the maximum over them
and over the usual left-truncated view.

In the worker every row of every conversation of a fetched batch comes from one tokenizer call
(``window_ids_batch``): each message is tokenized once, the usual view and the windows are put together from its
ids, and a conversation past ``windows.max_bytes`` of content is bounded in bytes before it is normalised or
tokenized (its latest bytes for the usual view, one byte sample per window).

Only conversations that do not fit in ``max_tokens`` are windowed: everything that fits is scored exactly as
the bundle was calibrated, so the delegation guarantee on ordinary traffic is untouched. Windows are short
(``window_tokens``, about one request) because mean pooling over a window that is mostly filler dilutes a
request as surely as truncation drops it. Dilution inside ``max_tokens`` (filler first, the request kept at the
end) is a pooling problem, not a length one; windows do not address it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from probes.activations.render import BatchRenderer, PieceTemplate, full_ids, render_ids, untrusted_content
from probes.activations.special_tokens import special_strings
from probes.config import WindowConfig
from probes.conversation import Conversation, Message


def spans(n: int, window: int, stride: int, max_windows: int) -> list[tuple[int, int]]:
    """``[start, end)`` windows over ``n`` tokens: the first starts at 0, the last ends at ``n``.

    More than ``max_windows`` needed: the stride grows so the windows still run from head to tail evenly (gaps
    appear only then, and only between windows; head and tail are always read).
    """
    if n <= window:
        return [(0, n)]
    needed = math.ceil((n - window) / stride) + 1
    if needed > max_windows:
        stride = math.ceil((n - window) / (max_windows - 1))
    starts = list(range(0, n - window, stride)) + [n - window]
    return [(s, s + window) for s in starts]


def _content_ids(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """(message index, token id) for every content token, in order."""
    flat: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        # As the template reads it (normalised, control-token strings inert), so windows decode back to that text.
        ids = tokenizer(untrusted_content(message.content, special_strings(tokenizer)),
                        add_special_tokens=False)["input_ids"]
        flat.extend((index, int(token)) for token in ids)
    return flat


def content_windows(tokenizer: Any, messages: Sequence[Message], config: WindowConfig) -> list[Conversation]:
    """The conversation's content cut into overlapping windows; each window keeps its messages' roles."""
    flat = _content_ids(tokenizer, messages)
    windows: list[Conversation] = []
    for start, end in spans(len(flat), config.window_tokens, config.stride_tokens, config.max_windows):
        pieces: list[Message] = []
        run: list[int] = []
        current = flat[start][0] if start < end else 0
        for index, token in flat[start:end]:
            if index != current and run:
                pieces.append(Message(messages[current].role, tokenizer.decode(run)))
                run = []
            current = index
            run.append(token)
        if run:
            pieces.append(Message(messages[current].role, tokenizer.decode(run)))
        if any(p.content.strip() for p in pieces):
            windows.append(tuple(pieces))
    return windows


def window_ids(tokenizer: Any, messages: Sequence[Message], max_tokens: int, config: WindowConfig) -> list[list[int]]:
    """Token rows to score for one conversation; its score is the maximum over them.

    The first row is always today's view (left-truncated to ``max_tokens``), so windows can only add evidence.
    A conversation whose rendering fits in ``max_tokens`` yields that row alone.
    """
    if not config.enabled:
        return [render_ids(tokenizer, messages, max_tokens)]
    full = full_ids(tokenizer, messages)
    if len(full) <= max_tokens:
        return [full]
    rows = [render_ids(tokenizer, messages, max_tokens)]
    for window in content_windows(tokenizer, messages, config):
        ids = render_ids(tokenizer, window, max_tokens)
        if ids not in rows:
            rows.append(ids)
    return rows


def window_ids_batch(renderer: BatchRenderer, conversations: Sequence[Sequence[Message]],
                     config: WindowConfig) -> list[list[list[int]]]:
    """``window_ids`` for many conversations, from the fewest tokenizer calls for all of them.

    Where the template tokenizes piece by piece (``renderer.pieces``): one call for every row of every conversation
    (``_piece_rows``), the usual views identical to ``window_ids``', the windows the conversation's own tokens.
    Otherwise, through the renderer's derived template (no Jinja per window): all renderings, then all contents of
    the long conversations, then all windows decoded and tokenized again, each in one call, rows identical to
    ``window_ids``'. Raises if any conversation fails (the worker then tokenizes its events one at a time).
    """
    tokenizer, max_tokens = renderer.tokenizer, renderer.max_tokens
    if not renderer.fast:
        return [window_ids(tokenizer, c, max_tokens, config) for c in conversations]
    if renderer.pieces is not None:
        return _piece_rows(renderer, renderer.pieces, conversations, config)
    # Bounded in bytes too, before anything reads it: a huge conversation is scored on its latest bytes.
    conversations = [_bounded(c, config, max_tokens * renderer.vocabulary()[0]) for c in conversations]
    full = renderer.full(conversations)
    rows = [[renderer.truncate(c, ids)] for c, ids in zip(conversations, full, strict=True)]
    long = [i for i, ids in enumerate(full) if len(ids) > max_tokens] if config.enabled else []
    if not long:
        return rows
    # Content tokens of every message of every long conversation, as _content_ids reads them.
    texts = [untrusted_content(m.content, renderer.specials) for i in long for m in conversations[i]]
    content = iter(renderer.content_ids(texts))
    # Each window as its pieces (role, tokens), then every piece of every window decoded in one call.
    pieces: list[tuple[int, str, list[int]]] = []  # (window number, role, tokens)
    owner: list[int] = []  # window number -> conversation index
    for i in long:
        messages = conversations[i]
        per_message = [next(content) for _ in messages]
        flat = list(itertools.chain.from_iterable(per_message))
        bounds = list(itertools.accumulate(len(ids) for ids in per_message))  # end of each message's tokens
        for start, end in spans(len(flat), config.window_tokens, config.stride_tokens, config.max_windows):
            window = len(owner)
            owner.append(i)
            # A piece per message the window overlaps (content_windows' runs), its tokens in the window.
            first = bisect.bisect_right(bounds, start)
            for index in range(first, len(messages)):
                lo, hi = max(start, bounds[index] - len(per_message[index])), min(end, bounds[index])
                if lo >= end:
                    break
                if lo < hi:
                    pieces.append((window, messages[index].role, flat[lo:hi]))
    decoded = renderer.decode([run for _, _, run in pieces])
    windows: list[list[Message]] = [[] for _ in owner]
    for (window, role, _), text in zip(pieces, decoded, strict=True):
        windows[window].append(Message(role, text))
    kept = [(owner[w], tuple(ms)) for w, ms in enumerate(windows) if any(m.content.strip() for m in ms)]
    rendered = renderer.full([ms for _, ms in kept])
    for (i, ms), ids in zip(kept, rendered, strict=True):
        ids = renderer.truncate(ms, ids)
        if ids not in rows[i]:
            rows[i].append(ids)
    return rows


Part = tuple[str, str]  # (role, content) of a message, or of the part of it a view reads


@dataclass(frozen=True)
class _Plan:
    """What of one conversation is tokenized: its messages (whole, or only its tail when it is bounded) and, when
    bounded, a sample of bytes for each window but the last (which is read from the tail)."""

    messages: list[Part]
    samples: list[list[Part]]
    bounded: bool


def _content_bytes(conversation: Sequence[Message], max_bytes: int) -> list[bytes]:
    """Each message's content as UTF-8, or nothing when the conversation cannot exceed ``max_bytes`` (at most 4 bytes
    a character): most conversations are far below the bound and are not encoded at all."""
    if 4 * sum(len(m.content) for m in conversation) <= max_bytes:
        return []
    return [m.content.encode("utf-8", "surrogatepass") for m in conversation]


def _utf8_slice(raw: bytes, start: int, end: int) -> str:
    """Bytes ``start:end`` of a UTF-8 text as text, a character cut at either end dropped."""
    return raw[max(0, start):max(0, end)].decode("utf-8", "ignore")


def _plan(conversation: Sequence[Message], config: WindowConfig, tail_bytes: int, specials: frozenset[str]) -> _Plan:
    """Bound a conversation in bytes before anything reads it (normalising, neutralising, tokenizing).

    Within ``config.max_bytes`` of content it is read whole. Past it: the latest ``tail_bytes`` of content (whole
    messages newest first, the one that does not fit cut to its last bytes), which hold at least ``max_tokens``
    tokens, so the usual view is the one the whole conversation gives wherever tokenization is local (always, but
    for a cut inside a single pre-token); and for the windows, ``max_windows - 1`` samples evenly spaced over all
    its content bytes, each long enough for a window (the last window is the tail's end, as for a whole one).
    """
    if not conversation:
        raise ValueError("cannot render an empty conversation")
    raw = _content_bytes(conversation, config.max_bytes)
    total = sum(len(r) for r in raw)
    if total <= config.max_bytes:
        return _Plan([(m.role, untrusted_content(m.content, specials)) for m in conversation], [], False)
    keep = min(tail_bytes, config.max_bytes // 2)
    tail = [(m.role, m.content) for m in _tail(conversation, raw, keep)]
    samples: list[list[Part]] = []
    if config.enabled:
        count = config.max_windows - 1
        size = max(1, (config.max_bytes - keep) // count)
        starts = [round(i * max(0, total - size) / max(1, count - 1)) for i in range(count)]
        ends = list(itertools.accumulate(len(r) for r in raw))
        for start in starts:
            parts: list[Part] = []
            for m, r, end in zip(conversation, raw, ends, strict=True):
                lo, hi = max(start, end - len(r)), min(start + size, end)
                if lo < hi:
                    parts.append((m.role, _utf8_slice(r, lo - (end - len(r)), hi - (end - len(r)))))
            samples.append([(role, untrusted_content(text, specials)) for role, text in parts])
    return _Plan([(role, untrusted_content(text, specials)) for role, text in tail], samples, True)


def _tail(conversation: Sequence[Message], raw: Sequence[bytes], budget: int) -> list[Message]:
    """The latest ``budget`` bytes of content: whole messages newest first, the one that does not fit cut to its
    last bytes (the last message always, cut if it must be)."""
    tail: list[Message] = []
    for m, r in zip(reversed(conversation), reversed(raw), strict=True):
        if len(r) <= budget:
            tail.insert(0, m)
            budget -= len(r)
            continue
        if budget > 0 or not tail:
            tail.insert(0, Message(m.role, _utf8_slice(r, len(r) - budget, len(r))))
        break
    return tail


def _bounded(conversation: Sequence[Message], config: WindowConfig, tail_bytes: int) -> Sequence[Message]:
    """Where the template does not tokenize piece by piece: a conversation past ``max_bytes`` read on its tail."""
    raw = _content_bytes(conversation, config.max_bytes)
    if sum(len(r) for r in raw) <= config.max_bytes:
        return conversation
    return _tail(conversation, raw, min(tail_bytes, config.max_bytes))


def _runs(roles: Sequence[str], content: Sequence[list[int]], start: int, end: int) -> list[tuple[str, list[int]]]:
    """Tokens ``start:end`` of the messages' content put together, as (role, tokens) per message they touch."""
    out: list[tuple[str, list[int]]] = []
    offset = 0
    for role, ids in zip(roles, content, strict=True):
        lo, hi = max(start, offset), min(end, offset + len(ids))
        if lo < hi:
            out.append((role, ids[lo - offset:hi - offset]))
        offset += len(ids)
        if offset >= end:
            break
    return out


def _piece_rows(renderer: BatchRenderer, pieces: PieceTemplate, conversations: Sequence[Sequence[Message]],
                config: WindowConfig) -> list[list[list[int]]]:
    """Every row of every conversation from one tokenizer call: each message (or bounded part of one) is tokenized
    once as its piece of the rendering; the usual view and the windows are put together from those ids.

    A window's row is its runs of content ids, each wrapped in its message's role as the template wraps it: the
    tokens the conversation itself holds there (the per-window path decodes a window to text and tokenizes that
    again, which can tokenize its edges differently: tests/probes/test_windows.py measures how often).
    """
    max_tokens = renderer.max_tokens
    most, blank = renderer.vocabulary()
    plans = [_plan(c, config, max_tokens * most, renderer.specials) for c in conversations]
    texts = [pieces.text(role, text) for plan in plans for role, text in (*plan.messages, *itertools.chain(*plan.samples))]
    encoded = iter(renderer.encode(texts))
    rows: list[list[list[int]]] = []
    for plan in plans:
        roles = [role for role, _ in plan.messages]
        ids = [next(encoded) for _ in plan.messages]
        samples = [[(role, next(encoded)) for role, _ in sample] for sample in plan.samples]
        own = [pieces.fit(roles, ids, max_tokens)]
        rows.append(own)
        full = sum(map(len, ids)) + (0 if roles[0] == "system" else len(pieces.prefix))
        if not config.enabled or (full <= max_tokens and not plan.bounded):
            continue
        content = [pieces.content(role, piece) for role, piece in zip(roles, ids, strict=True)]
        n = sum(map(len, content))
        windows: list[list[tuple[str, list[int]]]] = []
        if plan.bounded:
            for sample in samples:
                cut = [pieces.content(role, piece) for role, piece in sample]
                windows.append(_runs([r for r, _ in sample], cut, 0, config.window_tokens))
            windows.append(_runs(roles, content, max(0, n - config.window_tokens), n))
        else:
            for start, end in spans(n, config.window_tokens, config.stride_tokens, config.max_windows):
                windows.append(_runs(roles, content, start, end))
        for window in windows:
            if all(token in blank for _, run in window for token in run):
                continue  # whitespace only, as content_windows skips it
            row = pieces.fit([r for r, _ in window], [pieces.wrap(r, run) for r, run in window], max_tokens)
            if row not in own:
                own.append(row)
    return rows


def argmax_by_group(values: Sequence[float], groups: Sequence[int], n: int) -> list[int]:
    """Per conversation (``groups[i]`` is the conversation of row ``i``), the row with the largest value.

    The conversation takes everything from that row (P(unsafe), DV, delegation signal), so its scores stay
    those of one real reading rather than a mix of several.
    """
    best: list[int | None] = [None] * n
    for row, (value, group) in enumerate(zip(values, groups, strict=True)):
        current = best[group]
        if current is None or value > values[current]:
            best[group] = row
    if any(b is None for b in best):
        raise ValueError("a conversation without scored rows")
    return [b for b in best if b is not None]


def max_by_group(values: Sequence[float], groups: Sequence[int], n: int) -> list[float]:
    """Per conversation, the maximum of its rows' values."""
    return [values[row] for row in argmax_by_group(values, groups, n)]

"""Long conversations scored in windows, so a harmful request cannot be hidden by length.

The probe reads at most ``max_tokens`` and keeps the latest ones (probes/activations/render.py): a harmful request followed
by enough filler is cut away unseen, and mean pooling dilutes it even when it is kept (engineering.md,
"Evasions measured"). A conversation whose rendering is longer than ``window_tokens`` is therefore also read as
overlapping windows over its message content, each rendered through the chat template as a conversation of its
own (so every window looks like the traffic the probe was trained on), and its score is the maximum over them
and over the usual left-truncated view.

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
from typing import Any

from probes.activations.render import BatchRenderer, full_ids, render_ids, untrusted_content
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
    """``window_ids`` for many conversations: the same rows, from a handful of tokenizer calls for all of them.

    Renders through the renderer's derived template (no Jinja per window), tokenizes all renderings, then all
    contents of the long conversations, decodes all window pieces and tokenizes all windows, each in one call.
    Raises if any conversation fails; ``window_ids`` one at a time then tells which.
    """
    tokenizer, max_tokens = renderer.tokenizer, renderer.max_tokens
    if not renderer.fast:
        return [window_ids(tokenizer, c, max_tokens, config) for c in conversations]
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

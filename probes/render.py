"""Conversation -> token ids: the chat template when the tokenizer has one, truncated from the left.

Left truncation keeps the latest turns: whole oldest messages are dropped first, and only a single
remaining message that is still too long is cut token-wise from the left (keeping a leading BOS/CLS).
Conversations longer than that are scored in windows (probes/windows.py) so nothing is cut unseen.

Message content is untrusted: control-token strings in it are neutralised (probes/special_tokens.py) before
the chat template adds its own, so content can never open or close a turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.conversation import Message, plain_text
from probes.special_tokens import neutralise, special_strings


def render_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The string the monitored model reads for these messages (content's control tokens made inert)."""
    strings = special_strings(tokenizer)
    safe = [Message(m.role, neutralise(m.content, strings)) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in safe], tokenize=False, add_generation_prompt=False
        )
        return str(rendered)
    return plain_text(safe)


def _encode(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    text = render_text(tokenizer, messages)
    # A chat template already wrote its own special tokens; plain text gets the tokenizer's (CLS/SEP, BOS).
    add_special = not getattr(tokenizer, "chat_template", None)
    ids = tokenizer(text, add_special_tokens=add_special, truncation=False)["input_ids"]
    return list(ids)


def full_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the whole rendered conversation, not truncated."""
    return _encode(tokenizer, messages)


def render_ids(tokenizer: Any, messages: Sequence[Message], max_tokens: int) -> list[int]:
    """Token ids of the rendered conversation, at most ``max_tokens`` long, keeping the latest content."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    ids = _encode(tokenizer, messages)
    if len(ids) > max_tokens and len(messages) > 1:
        # Fewest oldest turns to drop: binary search (renders shrink as turns are dropped), so a long
        # conversation costs O(log turns) tokenizations on the worker's hot path, not O(turns).
        lo, hi = 1, len(messages) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(_encode(tokenizer, messages[mid:])) <= max_tokens:
                hi = mid
            else:
                lo = mid + 1
        ids = _encode(tokenizer, messages[lo:])
    if len(ids) <= max_tokens:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    head = ids[:1] if ids and ids[0] in special else []
    return head + ids[len(ids) - (max_tokens - len(head)) :]

"""Conversation -> token ids: the chat template when the tokenizer has one, truncated from the left.

Left truncation keeps the latest turns: whole oldest messages are dropped first, and only a single
remaining message that is still too long is cut token-wise from the left (keeping a leading BOS/CLS).
Conversations longer than that are scored in windows (probes/activations/windows.py) so nothing is cut unseen.

Message content is untrusted: it is normalised (probes/activations/normalise.py: invisible characters dropped, NFKC,
homoglyphs as ASCII), then control-token strings in it are neutralised (probes/activations/special_tokens.py) before the chat
template adds its own, so content can never open or close a turn. Normalising first also catches a control token
spelled in fullwidth or look-alike characters, which NFKC would otherwise turn into the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from probes.activations.normalise import normalise
from probes.activations.special_tokens import neutralise, special_strings
from probes.conversation import Message, plain_text


def untrusted_content(content: str, specials: frozenset[str]) -> str:
    """Message content as every template receives it: normalised, then its control-token strings made inert."""
    return neutralise(normalise(content), specials)


def render_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The string the monitored model reads for these messages (content normalised, control tokens inert)."""
    strings = special_strings(tokenizer)
    safe = [Message(m.role, untrusted_content(m.content, strings)) for m in messages]
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
    return _truncate(tokenizer, lambda m: _encode(tokenizer, m), messages, _encode(tokenizer, messages), max_tokens)


def _truncate(tokenizer: Any, encode: Callable[[Sequence[Message]], list[int]], messages: Sequence[Message],
              ids: list[int], max_tokens: int) -> list[int]:
    """``ids`` (of all ``messages``, rendered by ``encode``) cut to ``max_tokens`` the way ``render_ids`` cuts."""
    if len(ids) > max_tokens and len(messages) > 1:
        # Fewest oldest turns to drop: binary search (renders shrink as turns are dropped), so a long
        # conversation costs O(log turns) tokenizations on the worker's hot path, not O(turns).
        lo, hi = 1, len(messages) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(encode(messages[mid:])) <= max_tokens:
                hi = mid
            else:
                lo = mid + 1
        ids = encode(messages[lo:])
    return _cut(tokenizer, ids, max_tokens)


def _cut(tokenizer: Any, ids: list[int], max_tokens: int) -> list[int]:
    """A single message still too long: keep its last tokens, and a leading special token (BOS/CLS)."""
    if len(ids) <= max_tokens:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    head = ids[:1] if ids and ids[0] in special else []
    return head + ids[len(ids) - (max_tokens - len(head)) :]


# ---------------------------------------------------------------------------------------------- fast path
_SENTINELS = ("\x00CTD-A\x00", "\x00CTD-B\x00", "\x00CTD-C\x00")
# Contents the derived template must reproduce exactly: whitespace at either end (a template that trims
# fails here), braces and Jinja syntax, newlines, unicode, the template's own marker characters.
_PROBE_CONTENTS = (" lead", "trail \n", "{{ x }} {% if %} {#", "line\n\nbreak", "ünïcødé ✓ 日本", "<|im_end|> <s>", "x")
_PROBE_ROLES = (("user",), ("system", "user"), ("user", "assistant", "user"),
                ("system", "user", "assistant", "user", "assistant"), ("user", "assistant"))


@dataclass(frozen=True)
class MessageTemplate:
    """A chat template that is a fixed prefix plus a fixed wrapper per role around each message's content.

    ``default_prefix`` is written when the first message is not a system message (SmolLM2's default system
    prompt). Only ever built by ``derive_message_template``, which checks it against the real template.
    """

    default_prefix: str
    wrappers: dict[str, tuple[str, str]]

    def render(self, messages: Sequence[Message]) -> str:
        parts = [] if messages[0].role == "system" else [self.default_prefix]
        for m in messages:
            before, after = self.wrappers[m.role]
            parts += (before, m.content, after)
        return "".join(parts)


def _neutralised(messages: Sequence[Message], specials: frozenset[str]) -> list[Message]:
    """Content as ``render_text`` hands it to the template: normalised, control-token strings made inert."""
    return [Message(m.role, untrusted_content(m.content, specials)) for m in messages]


def _jinja(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> str:
    return str(tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in pairs], tokenize=False,
                                             add_generation_prompt=False))


def derive_message_template(tokenizer: Any) -> MessageTemplate | None:
    """The chat template as prefix + per-role wrappers, or None when it is anything more (then Jinja it is).

    Derived from renders of sentinel conversations, then required to reproduce the template exactly on a
    battery of multi-turn conversations with awkward contents; any difference, or a template that raises on
    one of them, means no fast path.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    a, b, c = _SENTINELS
    try:
        system = _jinja(tokenizer, [("system", a)])
        with_user = _jinja(tokenizer, [("system", a), ("user", b)])
        with_assistant = _jinja(tokenizer, [("system", a), ("user", b), ("assistant", c)])
        user_first = _jinja(tokenizer, [("user", b)])
    except Exception:  # noqa: BLE001 - a template that cannot render these has no fixed shape
        return None
    if any(t.count(s) != 1 for t, s in ((system, a), (user_first, b))):
        return None
    s_before, s_after = system.split(a)
    if not with_user.startswith(system) or with_user.count(b) != 1:
        return None
    u_before, u_after = with_user[len(system):].split(b)
    if not with_assistant.startswith(with_user) or with_assistant.count(c) != 1:
        return None
    a_before, a_after = with_assistant[len(with_user):].split(c)
    head, _, tail = user_first.partition(b)
    if tail != u_after or not head.endswith(u_before):
        return None
    specials = special_strings(tokenizer)
    template = MessageTemplate(head[: len(head) - len(u_before)],
                               {"system": (s_before, s_after), "user": (u_before, u_after),
                                "assistant": (a_before, a_after)})
    try:
        for roles in _PROBE_ROLES:
            for shift in range(len(_PROBE_CONTENTS)):
                messages = [Message(r, _PROBE_CONTENTS[(shift + i) % len(_PROBE_CONTENTS)])
                            for i, r in enumerate(roles)]
                if template.render(_neutralised(messages, specials)) != render_text(tokenizer, messages):
                    return None
    except Exception:  # noqa: BLE001
        return None
    return template


class BatchRenderer:
    """``render_ids`` for many conversations at once: identical ids, a fraction of the cost.

    Rendering uses the derived ``MessageTemplate`` instead of Jinja per conversation, tokenization one call
    of the Rust tokenizer for the whole list (it releases the GIL). Conversations over ``max_tokens`` go
    through ``render_ids`` (whole-turn left truncation), as does everything when the template has no fixed
    shape or the tokenizer is not a fast one.
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.template = derive_message_template(tokenizer)
        self.specials = special_strings(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend: Any = None
        if backend is not None:
            # A private copy: transformers sets padding and truncation on its backend for every call and leaves
            # them set, so another caller's ``padding=True`` would otherwise pad this one's batches.
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_padding()
            self.backend.no_truncation()
        self.fast = self.backend is not None and (self.template is not None or not self.has_template)

    def text(self, messages: Sequence[Message]) -> str:
        """The text ``render_text`` gives: content neutralised first, so it can never open or close a turn."""
        if self.template is None:
            return render_text(self.tokenizer, messages)
        return self.template.render(_neutralised(messages, self.specials))

    def ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        if not self.fast:
            return [render_ids(self.tokenizer, c, self.max_tokens) for c in conversations]
        return [self.truncate(c, ids) for c, ids in zip(conversations, self.full(conversations), strict=True)]

    def full(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        """``full_ids`` of each conversation (the whole rendering, not truncated), in one tokenizer call."""
        if not self.fast:
            return [full_ids(self.tokenizer, c) for c in conversations]
        for c in conversations:
            if not c:
                raise ValueError("cannot render an empty conversation")
        # A chat template already wrote its own special tokens; plain text gets the tokenizer's (as _encode).
        encoded = self.backend.encode_batch_fast([self.text(c) for c in conversations],
                                                 add_special_tokens=not self.has_template)
        return [e.ids for e in encoded]

    def truncate(self, messages: Sequence[Message], ids: list[int]) -> list[int]:
        """``render_ids`` of ``messages`` from their ``full`` ids: the same turns dropped, the same tokens cut."""
        if len(ids) <= self.max_tokens:
            return ids
        if not self.fast:
            return render_ids(self.tokenizer, messages, self.max_tokens)
        return _truncate(self.tokenizer, self._encode, messages, ids, self.max_tokens)

    def _encode(self, messages: Sequence[Message]) -> list[int]:
        return list(self.backend.encode(self.text(messages), add_special_tokens=not self.has_template).ids)

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens as plain content (no special tokens added), in one tokenizer call."""
        if self.backend is None:
            return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, rows: Sequence[list[int]]) -> list[str]:
        """``tokenizer.decode`` of each row, in one call when the tokenizer does no Python-side clean-up."""
        if self.backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", True):
            return [self.tokenizer.decode(r) for r in rows]
        return list(self.backend.decode_batch(list(rows), skip_special_tokens=False))

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

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from probes.activations.bpe import ByteLevelBPE
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


Role = str


@dataclass(frozen=True)
class PieceTemplate:
    """A ``MessageTemplate`` whose renderings tokenize piece by piece: the ids of a rendering are the default prefix's
    ids (when it is written) followed by each message's piece ids (its wrapper's opening, its content, its closing).

    Tokenizers split their input at control tokens before normalising or pre-tokenizing anything, so a text whose
    pieces each begin with a control token tokenizes as the concatenation of its pieces. Then every view of a
    conversation (the kept tail, any suffix of turns, windows of its content) is assembled from its messages' ids
    without tokenizing again. Only ever built by ``derive_piece_template``, which checks that this holds.
    """

    template: MessageTemplate
    prefix: tuple[int, ...]
    before: dict[Role, tuple[int, ...]]
    after: dict[Role, tuple[int, ...]]
    special_ids: frozenset[int] = field(default_factory=frozenset)

    def text(self, role: Role, content: str) -> str:
        """One message's piece: what the template writes for it (``content`` already made safe)."""
        before, after = self.template.wrappers[role]
        return before + content + after

    def content(self, role: Role, ids: Sequence[int]) -> list[int]:
        """A piece's ids without its wrapper's: the message's content as it tokenizes inside the rendering."""
        before, after = self.before[role], self.after[role]
        lo = common_prefix(ids, before)
        hi = len(ids) - common_prefix(ids[lo:][::-1], after[::-1])
        return list(ids[lo:hi])

    def wrap(self, role: Role, content: Sequence[int]) -> list[int]:
        """The piece of a message whose content tokens are ``content`` (a window's run of them)."""
        return [*self.before[role], *content, *self.after[role]]

    def fit(self, roles: Sequence[Role], pieces: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
        """``render_ids`` from the messages' piece ids: the same oldest turns dropped, the same tokens cut."""
        if not pieces:
            raise ValueError("cannot render an empty conversation")
        suffix = [0] * (len(pieces) + 1)  # suffix[k]: ids of pieces k.. together
        for k in range(len(pieces) - 1, -1, -1):
            suffix[k] = suffix[k + 1] + len(pieces[k])

        def length(k: int) -> int:  # ids of the rendering of messages[k:]
            return suffix[k] + (0 if roles[k] == "system" else len(self.prefix))

        keep = 0
        if length(0) > max_tokens and len(pieces) > 1:
            # The same binary search as _truncate (renders are not strictly monotone in the turns dropped: a
            # dropped system turn brings the default prefix back), so the same turn count is found.
            lo, hi = 1, len(pieces) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if length(mid) <= max_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            keep = lo
        head = [] if roles[keep] == "system" else list(self.prefix)
        if length(keep) <= max_tokens:
            return head + list(itertools.chain.from_iterable(pieces[keep:]))
        # One message still too long (_cut): its last tokens, and the rendering's leading control token.
        first = next(itertools.chain(head, *pieces[keep:]), None)
        lead = [first] if first is not None and first in self.special_ids else []
        room = max_tokens - len(lead)
        tail: list[int] = []
        for ids in reversed([head, *pieces[keep:]]):
            tail[:0] = ids[max(0, len(ids) - (room - len(tail))):]
            if len(tail) >= room:
                break
        return lead + tail


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _lstrip_rstrip_added(backend: Any) -> bool:
    """Whether an added token of this tokenizer eats the whitespace beside it (then pieces are not independent)."""
    added = json.loads(backend.to_str()).get("added_tokens", [])
    return any(t.get("lstrip") or t.get("rstrip") for t in added)


def derive_piece_template(tokenizer: Any, backend: Any, template: MessageTemplate | None,
                          specials: frozenset[str]) -> PieceTemplate | None:
    """``template`` as a ``PieceTemplate`` when its renderings tokenize piece by piece, else None.

    Required: every piece (the default prefix, each role's wrapper) begins with a control token the tokenizer
    splits on; no control token can begin before a piece and end inside it (content is neutralised, so it holds
    none); no added token strips the whitespace beside it; and on the probe battery of ``derive_message_template``
    the whole rendering's ids equal the pieces' ids put together.
    """
    if template is None or backend is None or _lstrip_rstrip_added(backend):
        return None
    added = set(tokenizer.get_added_vocab()) if callable(getattr(tokenizer, "get_added_vocab", None)) else set()
    controls = [t for t in specials if t in added]
    starts = [s for s in (template.default_prefix, *(b for b, _ in template.wrappers.values())) if s]
    if not all(any(s.startswith(c) for c in controls) for s in starts):
        return None
    for c in specials:
        for k in range(1, len(c)):
            if any(s.startswith(c[k:]) or c[k:].startswith(s) for s in starts):
                return None

    def encode(text: str) -> tuple[int, ...]:
        return tuple(backend.encode(text, add_special_tokens=False).ids)

    pieces = PieceTemplate(
        template, encode(template.default_prefix),
        {role: encode(before) for role, (before, _) in template.wrappers.items()},
        {role: encode(after) for role, (_, after) in template.wrappers.items()},
        frozenset(getattr(tokenizer, "all_special_ids", ()) or ()),
    )
    for roles in _PROBE_ROLES:
        for shift in range(len(_PROBE_CONTENTS)):
            messages = _neutralised([Message(r, _PROBE_CONTENTS[(shift + i) % len(_PROBE_CONTENTS)])
                                     for i, r in enumerate(roles)], specials)
            joined = [] if messages[0].role == "system" else list(pieces.prefix)
            for m in messages:
                joined += encode(pieces.text(m.role, m.content))
            if list(encode(template.render(messages))) != joined:
                return None
    return pieces


class BatchRenderer:
    """``render_ids`` for many conversations at once: identical ids, a fraction of the cost.

    Rendering uses the derived ``MessageTemplate`` instead of Jinja per conversation, tokenization one call
    of the Rust tokenizer for the whole list (it releases the GIL). Where the template tokenizes piece by piece
    (``pieces``, SmolLM2's), each message is tokenized once and a conversation over ``max_tokens`` is cut from its
    messages' ids; elsewhere it is rendered again without its oldest turns (``render_ids``' binary search), and
    everything goes through ``render_ids`` when the template has no fixed shape or the tokenizer is not a fast one.
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
        # The same ids from tiktoken where the tokenizer is a plain byte-level BPE (probes/activations/bpe.py).
        self.bpe = None if self.backend is None else ByteLevelBPE.from_backend(self.backend)
        self.fast = self.backend is not None and (self.template is not None or not self.has_template)
        self.pieces = derive_piece_template(tokenizer, self.backend, self.template, self.specials)
        self._vocab: tuple[int, frozenset[int]] | None = None

    def text(self, messages: Sequence[Message]) -> str:
        """The text ``render_text`` gives: content neutralised first, so it can never open or close a turn."""
        if self.template is None:
            return render_text(self.tokenizer, messages)
        return self.template.render(_neutralised(messages, self.specials))

    def ids(self, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
        if not self.fast:
            return [render_ids(self.tokenizer, c, self.max_tokens) for c in conversations]
        if self.pieces is not None:  # each message tokenized once; a too long conversation is cut from its pieces
            pieces = self.pieces
            per_message = iter(self.encode([pieces.text(m.role, untrusted_content(m.content, self.specials))
                                            for c in conversations for m in c]))
            return [pieces.fit([m.role for m in c], [next(per_message) for _ in c], self.max_tokens)
                    for c in conversations]
        return [self.truncate(c, ids) for c, ids in zip(conversations, self.full(conversations), strict=True)]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids as the rendering's pieces tokenize (no special tokens added), in one tokenizer call."""
        if self.bpe is not None:
            return self.bpe.encode_batch(texts)
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def vocabulary(self) -> tuple[int, frozenset[int]]:
        """(the most UTF-8 bytes one token stands for, the ids of tokens that read as whitespace only).

        A text of ``b`` bytes has at least ``b / most`` tokens: the bytes that surely hold ``n`` tokens. Decoded once.
        """
        if self._vocab is None:
            size = self.backend.get_vocab_size(with_added_tokens=True)
            texts = self.backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
            most = max(len(t.encode("utf-8", "surrogatepass")) for t in texts)
            self._vocab = (max(1, most), frozenset(i for i, t in enumerate(texts) if not t.strip()))
        return self._vocab

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
        return self.encode(texts)

    def decode(self, rows: Sequence[list[int]]) -> list[str]:
        """``tokenizer.decode`` of each row, in one call when the tokenizer does no Python-side clean-up."""
        if self.backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", True):
            return [self.tokenizer.decode(r) for r in rows]
        return list(self.backend.decode_batch(list(rows), skip_special_tokens=False))

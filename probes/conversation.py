"""The conversation type every component shares, and its plain-text rendering."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


Conversation = tuple[Message, ...]

_PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation(pairs: Iterable[tuple[str, str]]) -> Conversation:
    return tuple(Message(role, content) for role, content in pairs)


def single_turn(text: str) -> Conversation:
    return (Message("user", text),)


def plain_text(messages: Sequence[Message]) -> str:
    """``User: …\\n\\nAssistant: …`` — the shared datasets' flat rendering, used where no chat template exists."""
    return "\n\n".join(f"{_PLAIN_NAMES.get(m.role, m.role.title())}: {m.content}" for m in messages)


def is_long_dialogue(conversation: Sequence[Message], min_chars: int) -> bool:
    """Holding an assistant turn and more than ``min_chars`` of content: the traffic the long-conversation cuts (the
    probe's and the expert's) are certified on (probes/evaluation/long_cut.py). A long prompt alone (a jailbreak, a
    contextual request) is not: those dialogues say nothing about its benign flag rate, and their cut would drop
    nearly every harmful one. On the conversation as sent, not on its tokens, so the rule is the same whichever way
    the dialogue is then read."""
    if not any(m.role == "assistant" for m in conversation):
        return False
    total = 0
    for m in conversation:
        total += len(m.content)
        if total > min_chars:
            return True
    return False


def user_turns_of(conversation: Conversation) -> Conversation:
    """The conversation's user turns, in order (how ``windows.dialogue_read: user_turns`` reads a long dialogue)."""
    return tuple(m for m in conversation if m.role == "user")

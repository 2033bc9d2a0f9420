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

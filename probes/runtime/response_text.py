"""The token sequence a streamed response is read as: its context up to the assistant header, then its text.

``prefix_ids(context) + response_ids(text)`` is the one sequence training, offline evaluation and the stream all
read (probes/runtime/stream_scorer.py). Untrusted text is normalised and its control-token strings made inert,
as on the conversation path (probes/activations/render.py); a chunk normalises only its own text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from probes.activations.normalise import normalise
from probes.activations.render import untrusted_content
from probes.activations.special_tokens import neutralise, special_strings
from probes.conversation import Message, plain_text

# The longest generic control-token pattern (probes/activations/special_tokens.py: ``<|`` + 64 + ``|>``): a control token
# split across chunks completes within this many characters of the text already held, so only they are
# neutralised again.
_NEUTRALISE_WINDOW = 68


def prefix_ids(tokenizer: Any, context: Sequence[Message], max_tokens: int) -> list[int]:
    """The context up to the assistant header, at most ``max_tokens`` (oldest tokens dropped, BOS kept)."""
    specials = special_strings(tokenizer)
    context = [Message(m.role, untrusted_content(m.content, specials)) for m in context]
    if getattr(tokenizer, "chat_template", None):
        if context:
            text = str(tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in context], tokenize=False, add_generation_prompt=True
            ))
        else:
            # Templates refuse an empty conversation: keep only the assistant header a generation prompt adds.
            probe = [{"role": "user", "content": ""}]
            with_header = str(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True))
            without = str(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False))
            text = with_header[len(without):]
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        text = plain_text(context) + ("\n\n" if context else "") + "Assistant: "
        bos = getattr(tokenizer, "bos_token_id", None)
        ids = ([bos] if bos is not None else []) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) <= max_tokens:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    head = ids[:1] if ids and ids[0] in special else []
    return head + ids[len(ids) - (max_tokens - len(head)) :]


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """The response's tokens: its text normalised and control-token strings made inert (a response cannot close
    its turn), as on the conversation path (render.py)."""
    if not text:
        return []
    return list(tokenizer(untrusted_content(text, special_strings(tokenizer)), add_special_tokens=False)["input_ids"])


def neutralise_tail(held: str, delta: str, specials: frozenset[str]) -> str:
    """``untrusted_content(raw)`` for a response whose text so far is ``held``, ``delta`` appended.

    Only the delta is normalised (``held`` already is: normalising it again would strip the word joiners that keep
    its control-token strings inert) and only the last ``_NEUTRALISE_WINDOW`` characters of ``held`` are
    neutralised again (a control token split across chunks completes there), so the cost is the delta's, not the
    response's.
    """
    cut = max(0, len(held) - neutralise_window(specials))
    return held[:cut] + neutralise(held[cut:] + normalise(delta), specials)


def neutralise_window(specials: frozenset[str]) -> int:
    """How far back a control token still being completed by the next chunk can start."""
    return max(_NEUTRALISE_WINDOW, max(map(len, specials), default=0))

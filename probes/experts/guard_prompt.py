"""Helpers shared by the guard-LLM experts: the guard prompt, and P(unsafe) from the verdict tokens.

A guard LLM answers "safe" or "unsafe" as its first token, so P(unsafe) is a two-way softmax over the
log-probs of those two tokens: mass on every other token is dropped, which makes the score independent of
how much probability the model wastes on formatting tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from probes.activations.normalise import normalise
from probes.activations.special_tokens import JOINER, neutralise
from probes.conversation import Conversation, Message, plain_text
from probes.errors import ConfigError, ExpertError

PLACEHOLDER = "{conversation}"
# Turn prefixes a guard reads as speaker changes: plain_text's, and Llama Guard's "Agent".
_ROLE_LINE = re.compile(r"(?mi)^([ \t]*)(user|assistant|system|agent|human|ai)([ \t]*:)")


def fill_template(template: str, text: str) -> str:
    """Put ``text`` where ``{conversation}`` stands.

    ``str.replace`` rather than ``str.format``: guard templates (Llama Guard's category list, JSON examples)
    may hold other braces, and conversation text must never be parsed as a format string.
    """
    if PLACEHOLDER not in template:
        raise ConfigError(f"guard prompt_template must contain {PLACEHOLDER}")
    return template.replace(PLACEHOLDER, text)


def _frame_lines(template: str) -> frozenset[str]:
    """The template's own text lines (its delimiters and instructions), which content must not repeat."""
    return frozenset(
        line.strip() for line in template.split(PLACEHOLDER, 1)[0].splitlines()
        + template.split(PLACEHOLDER, 1)[-1].splitlines() if len(line.strip()) >= 3
    )


def conversation_text(template: str, conversation: Conversation, special: Iterable[str] = ()) -> str:
    """The conversation as the guard reads it, with nothing in it that could pass for the prompt's structure.

    Content is untrusted. Each message is normalised as the probe reads it (probes/activations/normalise.py), then
    control-token strings (``special``: the guard tokenizer's own, plus
    the generic chat formats) are neutralised, so are the template's delimiter and instruction lines
    ("<END CONVERSATION>", "Provide your safety assessment ...") and line-initial speaker prefixes ("Agent:"),
    so a user cannot end the conversation early, add instructions, or write the assistant's turn for it.
    """
    strings = frozenset(special) | _frame_lines(template)
    safe = []
    for m in conversation:
        content = neutralise(normalise(m.content), strings)
        content = _ROLE_LINE.sub(lambda g: g.group(1) + g.group(2)[0] + JOINER + g.group(2)[1:] + g.group(3),
                                 content)
        safe.append(Message(m.role, content))
    return plain_text(safe)


def guard_prompt(template: str, conversation: Conversation, special: Iterable[str] = ()) -> str:
    """The guard's user prompt: ``template`` with the conversation's (neutralised) plain text filled in."""
    return fill_template(template, conversation_text(template, conversation, special))


def p_unsafe_from_logprobs(
    unsafe_lp: float | None, safe_lp: float | None, *, floor_lp: float | None = None
) -> float:
    """P(unsafe) = softmax over the two verdict tokens' log-probs.

    Remote endpoints only return the top-k tokens. When one verdict token is missing from them, its
    log-prob is at most the smallest listed one (``floor_lp``); we substitute exactly that bound. It is the
    least confident estimate consistent with what the endpoint showed us: the score is pulled towards 0.5
    rather than pushed to a hard 0 or 1 that the data do not support, so calibration downstream still sees
    "very likely" instead of "certain". Without a floor a missing token cannot be bounded, so it is an error.
    """
    if unsafe_lp is None and safe_lp is None:
        raise ExpertError("neither verdict token is among the returned log-probs")
    if unsafe_lp is None or safe_lp is None:
        if floor_lp is None:
            raise ExpertError("one verdict token is missing and no floor log-prob bounds it")
        unsafe_lp = floor_lp if unsafe_lp is None else unsafe_lp
        safe_lp = floor_lp if safe_lp is None else safe_lp
    if math.isnan(unsafe_lp) or math.isnan(safe_lp):
        raise ExpertError("verdict log-prob is NaN")
    if unsafe_lp == -math.inf and safe_lp == -math.inf:
        raise ExpertError("both verdict tokens have zero probability")
    # 1 / (1 + e^(safe - unsafe)) is the two-way softmax; the branch keeps exp() from overflowing.
    diff = safe_lp - unsafe_lp
    if diff == math.inf:
        return 0.0
    if diff == -math.inf:
        return 1.0
    if diff > 0:
        tail = math.exp(-diff)
        return tail / (1.0 + tail)
    return 1.0 / (1.0 + math.exp(diff))


def verdict_logprob(top: Iterable[tuple[str, float]], token: str) -> float | None:
    """Log-prob of a verdict word among (token, log-prob) pairs, or None if it is not listed.

    Servers report detokenized strings, so the same verdict may appear as "safe", " safe" or "\\n\\nsafe"
    depending on the tokenizer and prompt; each is the same answer, so their probabilities add (logsumexp).
    Case is kept: "Safe" may be the start of a sentence rather than a verdict.
    """
    wanted = token.strip()
    if not wanted:
        raise ConfigError("verdict token must not be blank")
    hits = [lp for tok, lp in top if tok.strip() == wanted]
    if not hits:
        return None
    peak = max(hits)
    if peak == -math.inf:
        return peak
    return peak + math.log(sum(math.exp(lp - peak) for lp in hits))


def p_unsafe_from_top_logprobs(
    top: Mapping[str, float] | Iterable[tuple[str, float]], *, unsafe_token: str, safe_token: str
) -> float:
    """P(unsafe) from a server's top-k list (a token->log-prob dict or (token, log-prob) pairs)."""
    pairs = list(top.items()) if isinstance(top, Mapping) else list(top)
    if not pairs:
        raise ExpertError("the endpoint returned no top log-probs")
    listed = [float(lp) for _, lp in pairs]
    for value in listed:
        if math.isnan(value):
            raise ExpertError("the endpoint returned a NaN log-prob")
    unsafe_lp = verdict_logprob(pairs, unsafe_token)
    safe_lp = verdict_logprob(pairs, safe_token)
    if unsafe_lp is None and safe_lp is None:
        # Token strings are not echoed: the top-k of the first answer token can quote the conversation.
        raise ExpertError(
            f"neither {unsafe_token!r} nor {safe_token!r} among the top-{len(pairs)} first tokens; "
            "check unsafe_token/safe_token and that the prompt ends where the verdict starts"
        )
    return p_unsafe_from_logprobs(unsafe_lp, safe_lp, floor_lp=min(listed))

"""How the guard's expert reads a long dialogue: whole, or whole and its user turns alone, keeping the more unsafe.

A long dialogue (``probes.conversation.is_long_dialogue``) read whole buries a request in assistant text: a fake
assistant turn of 1,500 characters of filler around a held-out harmful request took the encoder-head expert from
0.467 flagged to 0.067 (docs/method.md §6c), since every window holding the request is mostly filler. Reading the
user turns on their own as well, and keeping the more unsafe of the two scores, puts the request back in view, and
ranks held-out long dialogues better too (AUROC 0.790 -> 0.899 on the demo bundle). Only a score taken above the
whole reading can change, so the reading needs a cut certified under it: the long cut records the reading
(``LongConversationCut.expert_read``) and the guard reads as its cut says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from probes.config import ExpertRead
from probes.conversation import Conversation, user_turns_of
from probes.errors import ExpertError

F64 = npt.NDArray[np.float64]


def dialogue_views(conversations: Sequence[Conversation], read_user_turns: Sequence[bool]
                   ) -> tuple[list[Conversation], npt.NDArray[np.intp]]:
    """Each conversation, then the user turns of each one flagged in ``read_user_turns`` (where it has any and they
    are not the whole of it); ``owners`` maps each view back to its conversation."""
    views = list(conversations)
    owners = list(range(len(conversations)))
    for i, (conversation, flagged) in enumerate(zip(conversations, read_user_turns, strict=True)):
        turns = user_turns_of(conversation) if flagged else ()
        if turns and len(turns) < len(conversation):
            views.append(turns)
            owners.append(i)
    return views, np.asarray(owners, dtype=np.intp)


def most_unsafe(view_scores: Sequence[float] | F64, owners: npt.NDArray[np.intp], n: int) -> F64:
    """Each conversation's most unsafe view; a NaN view makes its conversation NaN (the caller rejects it)."""
    scores = np.asarray(view_scores, dtype=np.float64)
    if scores.shape != owners.shape:
        raise ExpertError(f"{scores.size} scores for {owners.size} views")
    out = np.full(n, -np.inf)
    with np.errstate(invalid="ignore"):  # NaN is kept, not warned about: the guard rejects it by name
        np.maximum.at(out, owners, scores)
    return out


def read_dialogues(score: Callable[[Sequence[Conversation]], F64], conversations: Sequence[Conversation], *,
                   read: ExpertRead, long: Sequence[bool] | None = None) -> F64:
    """P(unsafe) of each conversation under ``read``; ``long`` says which are long dialogues (None: all are)."""
    if read == "whole":
        return np.asarray(score(conversations), dtype=np.float64)
    flags = [True] * len(conversations) if long is None else long
    views, owners = dialogue_views(conversations, flags)
    return most_unsafe(score(views), owners, len(conversations))

"""A local causal-LM guard (Llama Guard style) scored from the logits of its first answer token.

One forward pass per batch, no generation loop: the logits at the last prompt position are the
distribution of the first answer token, and P(unsafe) is the two-way softmax of the ``unsafe_token`` and
``safe_token`` logits there.

Using Llama Guard 3: its own chat template already builds the guard prompt from the raw messages, so wrapping
our template inside it would nest two prompts. Set ``use_chat_template: false`` and put the full LG3 prompt,
special tokens included, in ``prompt_template``; LG3 answers "\\n\\nsafe", so either end the template with
``<|end_header_id|>\\n\\n`` or set ``answer_prefix: "\\n\\n"`` so that the verdict is the next token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from probes.activations.models import (
    BUILTIN_SPECS,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    weights_sha256,
)
from probes.activations.special_tokens import special_strings
from probes.config import HFGuardConfig
from probes.conversation import Conversation
from probes.errors import ConfigError, ExpertError, ModelSpecError
from probes.experts.guard_prompt import conversation_text, fill_template
from probes.logs import get_logger

log = get_logger(__name__)

# Stands in for the conversation while the template is rendered once, to find where the conversation sits
# in the final prompt (so truncation can cut the conversation and keep the instructions around it).
_SENTINEL = "\u2063CTD-CONVERSATION\u2063"


def _first_token_id(tokenizer: Any, token: str, field: str) -> tuple[int, int]:
    """The first id of ``token`` and how many ids it spans (a multi-id verdict is scored by its first id)."""
    ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"hf_guard.{field} {token!r} tokenizes to nothing")
    return int(ids[0]), len(ids)


class HFGuardExpert:
    """P(unsafe) from a local causal LM's first-token logits over the safe/unsafe verdict tokens."""

    def __init__(self, config: HFGuardConfig, *, cache_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_dir = resolve_model_dir(config.model, cache_dir)
        self.model_id = config.model if config.model in BUILTIN_SPECS else self.model_dir.name
        self.weights_sha256 = weights_sha256(self.model_dir)
        self._name = f"hf-guard:{self.model_id}:{self.weights_sha256[:12]}"

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ModelSpecError(f"{self.model_id}: tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer: Any = tokenizer
        self.chat = bool(config.use_chat_template and getattr(tokenizer, "chat_template", None))
        if config.use_chat_template and not self.chat:
            log.warning("hf_guard.no_chat_template", model=self.model_id)

        self.unsafe_id, unsafe_len = _first_token_id(tokenizer, config.unsafe_token, "unsafe_token")
        self.safe_id, safe_len = _first_token_id(tokenizer, config.safe_token, "safe_token")
        if self.unsafe_id == self.safe_id:
            raise ConfigError(
                f"unsafe_token {config.unsafe_token!r} and safe_token {config.safe_token!r} start with the "
                "same token; the first-token logits cannot tell them apart"
            )
        if unsafe_len > 1 or safe_len > 1:
            # Scoring by the first sub-token is an approximation (e.g. "un" for "unsafe"): worth knowing.
            log.warning(
                "hf_guard.multi_token_verdict", model=self.model_id, unsafe_ids=unsafe_len, safe_ids=safe_len
            )

        self._special = special_strings(tokenizer)
        self._frame = self._split_template()
        overhead = 0 if self._frame is None else len(self._frame[0]) + len(self._frame[1])
        if overhead >= config.max_length:
            raise ConfigError(
                f"hf_guard.max_length={config.max_length} leaves no room for the conversation: "
                f"the prompt around it takes {overhead} tokens"
            )

        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        self.model: Any = model.eval().to(self.device)
        params = inspect.signature(self.model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        log.info(
            "hf_guard.loaded",
            model=self.model_id,
            device=str(self.device),
            dtype=str(self.dtype),
            chat_template=self.chat,
            unsafe_id=self.unsafe_id,
            safe_id=self.safe_id,
        )

    @property
    def name(self) -> str:
        return self._name

    def parameters_per_token(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---- prompt -------------------------------------------------------------------------------------------

    def _render(self, conversation_text: str) -> str:
        user = fill_template(self.config.prompt_template, conversation_text)
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            user = str(text)
        return user + self.config.answer_prefix

    def _ids(self, text: str) -> list[int]:
        # A chat template (or a Llama Guard template written out by hand) already holds the BOS token;
        # letting the tokenizer add another would shift the model off the distribution it was tuned on.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not self.chat and not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _split_template(self) -> tuple[list[int], list[int]] | None:
        """Token ids of the rendered prompt before and after the conversation (None if not separable)."""
        rendered = self._render(_SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            # The chat template rewrote the content; fall back to cutting the whole prompt from the left.
            log.warning("hf_guard.template_not_separable", model=self.model_id)
            return None
        before, after = rendered.split(_SENTINEL)
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not self.chat and not (bos and before.startswith(bos))
        prefix = list(self.tokenizer(before, add_special_tokens=add_special)["input_ids"])
        suffix = list(self.tokenizer(after, add_special_tokens=False)["input_ids"])
        return prefix, suffix

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The token ids fed to the guard, at most ``max_length`` long and ending where the verdict starts.

        Truncation drops the oldest conversation tokens and keeps the instructions and the answer position:
        the latest turns are what a streaming monitor must judge, and without the instructions the guard
        would not know what it is asked.
        """
        text = conversation_text(self.config.prompt_template, conversation, self._special)
        full = self._ids(self._render(text))
        limit = self.config.max_length
        if len(full) <= limit:
            return full
        if self._frame is None:
            return full[-limit:]
        prefix, suffix = self._frame
        # Tokenized apart from its surroundings only when cut: joint tokenization is kept whenever it fits.
        body = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        room = limit - len(prefix) - len(suffix)
        return prefix + body[-room:] + suffix

    # ---- scoring ------------------------------------------------------------------------------------------

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        # Left padding puts every row's last real token in the last column: one index reads all verdicts.
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._takes_position_ids:
            # Without explicit positions a left-padded row would start at position=pad count, and the same
            # conversation would score differently alone and in a batch.
            inputs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return inputs

    @torch.inference_mode()
    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        out = np.zeros(len(conversations), dtype=np.float64)
        if not conversations:
            return out
        rows = [self.prompt_ids(c) for c in conversations]
        # Similar lengths share a batch so little compute goes to padding; `out` is filled back in order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        size = self.config.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            inputs = {k: v.to(self.device) for k, v in self._left_pad([rows[i] for i in batch]).items()}
            extra = {"logits_to_keep": 1} if self._takes_logits_to_keep else {}
            try:
                logits = self.model(**inputs, use_cache=False, **extra).logits[:, -1, :]
            except torch.cuda.OutOfMemoryError as exc:
                raise ExpertError(f"{self._name}: out of GPU memory on a batch of {len(batch)}") from exc
            pair = logits[:, [self.unsafe_id, self.safe_id]].float()
            p_unsafe = torch.softmax(pair, dim=-1)[:, 0]
            if not bool(torch.isfinite(p_unsafe).all()):
                raise ExpertError(f"{self._name}: non-finite verdict logits")
            out[batch] = p_unsafe.cpu().numpy()
        log.debug(
            "hf_guard.scored",
            model=self.model_id,
            n=len(rows),
            max_tokens=max(len(r) for r in rows),
            at_max_length=sum(len(r) >= self.config.max_length for r in rows),
        )
        return out

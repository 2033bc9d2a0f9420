"""The offline expert: an encoder (all-mpnet-base-v2) fine-tuned as a sequence classifier.

It is given what a real guard has and the probe lacks: fine-tuning of the encoder itself (not a frozen
feature extractor), all of the training split, and a longer context window. Fine-tuned weights live in
the cache dir keyed by backbone, data and hyper-parameters, so the costly step runs once per machine.

A conversation longer than the context is read as overlapping windows from tail to head and scored as the most
unsafe of them, like the probe's windows (probes/activations/windows.py): a delegated request padded with filler must not be
cleared by an expert that read only the filler at the tail. The first window is the left-truncated input the
expert was trained on, so a score never falls below what the tail alone gives; what fits is that window only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import torch

from probes.activations.batching import plan_batches
from probes.activations.models import (
    layer_stack,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
    weights_sha256,
)
from probes.activations.render import render_text
from probes.cache import atomic_directory, atomic_write_bytes, sha256_text
from probes.config import EncoderHeadConfig
from probes.conversation import Conversation
from probes.data import Record
from probes.errors import ExpertError, ModelSpecError
from probes.logs import get_logger

log = get_logger(__name__)
Progress = Callable[[int], None]
TRAINING_INFO = "training.json"


def _tokenizer(model_dir: Path, max_length: int) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.truncation_side = "left"  # keep the latest turns, like the probe
    tokenizer.model_max_length = max_length
    return tokenizer


def _encode(tokenizer: Any, conversations: Sequence[Conversation], max_length: int) -> list[list[int]]:
    # render_text: plain text for an encoder, with control-token strings in the content made inert
    texts = [render_text(tokenizer, c) for c in conversations]
    return list(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])


def _pad(tokenizer: Any, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class EncoderHeadExpert:
    """Scores P(unsafe) with a fine-tuned sequence classifier directory (safetensors)."""

    def __init__(
        self, model_dir: Path, *, device: str = "cpu", dtype: str = "auto", max_length: int | None = None,
        batch_tokens: int = 8192, max_windows: int = 16,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        info_path = model_dir / TRAINING_INFO
        if not info_path.is_file():
            raise ExpertError(f"not a trained encoder-head expert (no {TRAINING_INFO}): {model_dir}")
        self.info: dict[str, Any] = orjson.loads(info_path.read_bytes())
        self.model_dir = model_dir
        self.max_length = int(max_length or self.info["config"]["max_length"])
        self.device = resolve_device(device)
        self.batch_tokens = batch_tokens
        if max_windows < 2:
            raise ExpertError(f"max_windows={max_windows}: head and tail need two windows")
        self.max_windows = max_windows
        self.tokenizer = _tokenizer(model_dir, self.max_length)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=resolve_dtype(dtype, self.device)
        )
        self.model.eval().to(self.device)
        self._name = f"encoder-head:{self.info['key']}"

    @property
    def name(self) -> str:
        return self._name

    def parameters_per_token(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def windows(self, conversations: Sequence[Conversation]) -> tuple[list[list[int]], npt.NDArray[np.intp]]:
        """The model inputs (special tokens included) and, per input, the conversation it reads a window of.

        The tokenizer's overflow windows, half-overlapping (a request up to half a window long is read whole by
        one of them), run from the tail (the left-truncated input the expert was trained on) to the head. More
        than ``max_windows``: evenly spaced ones, tail and head always among them.
        """
        texts = [render_text(self.tokenizer, c) for c in conversations]
        room = self.max_length - int(self.tokenizer.num_special_tokens_to_add(pair=False))
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, stride=max(1, room // 2),
                                 return_overflowing_tokens=True)
        by_owner: dict[int, list[list[int]]] = {}
        for ids, owner in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"], strict=True):
            by_owner.setdefault(int(owner), []).append(list(ids))
        rows: list[list[int]] = []
        owners: list[int] = []
        for owner in range(len(texts)):
            found = by_owner[owner]
            keep = np.unique(np.linspace(0, len(found) - 1, min(len(found), self.max_windows)).round().astype(int))
            rows.extend(found[i] for i in keep)
            owners.extend([owner] * len(keep))
        return rows, np.asarray(owners, dtype=np.intp)

    @torch.inference_mode()
    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        rows, owners = self.windows(conversations)
        per_row = np.zeros(len(rows), dtype=np.float64)
        for batch in plan_batches([len(x) for x in rows], batch_tokens=self.batch_tokens, max_items=64):
            inputs = {k: v.to(self.device) for k, v in _pad(self.tokenizer, [rows[i] for i in batch]).items()}
            logits = self.model(**inputs).logits.float()
            per_row[batch] = torch.softmax(logits, dim=-1)[:, 1].cpu().numpy()
        out = np.zeros(len(conversations), dtype=np.float64)
        np.maximum.at(out, owners, per_row)
        return out


def expert_key(config: EncoderHeadConfig, backbone_sha: str, data_hash: str) -> str:
    # Inference-only settings do not change the trained weights.
    inference_only = {"device", "dtype", "max_windows"}
    return sha256_text(backbone_sha, data_hash, config.model_dump_json(exclude=inference_only), "v1")[:20]


def _freeze_lower(model: Any, train_layers: int | str) -> None:
    if train_layers == "all":
        return
    for param in model.base_model.parameters():
        param.requires_grad = False
    blocks = layer_stack(model.base_model)
    top = int(train_layers)
    if not 1 <= top <= len(blocks):
        raise ModelSpecError(f"train_layers={top} but the encoder has {len(blocks)} layers")
    for block in list(blocks)[-top:]:
        for param in block.parameters():
            param.requires_grad = True
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        for param in pooler.parameters():
            param.requires_grad = True


def train_encoder_head(
    config: EncoderHeadConfig,
    records: Sequence[Record],
    *,
    cache_dir: Path,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Fine-tune (or reuse from the cache) and return the expert's directory."""
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    rng = random.Random(config.seed)
    train = list(records)
    if config.max_train is not None and len(train) > config.max_train:
        train = rng.sample(train, config.max_train)
    if len({r.label for r in train}) < 2:
        raise ExpertError("expert training data needs both classes")
    backbone_dir = resolve_model_dir(config.backbone, cache_dir)
    backbone_sha = weights_sha256(backbone_dir)
    data_hash = sha256_text(*sorted(f"{r.content_key()}:{r.label}" for r in train))
    key = expert_key(config, backbone_sha, data_hash)
    target = cache_dir / "experts" / f"encoder-head-{key}"
    if (target / TRAINING_INFO).is_file() and not force:
        log.info("expert.reuse", path=str(target))
        return target

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    tokenizer = _tokenizer(backbone_dir, config.max_length)
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dir, num_labels=2, dtype=torch.float32)
    _freeze_lower(model, config.train_layers)
    model.to(device).train()
    ids = _encode(tokenizer, [r.messages for r in train], config.max_length)
    labels = [r.label for r in train]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total_steps // 16), total_steps)
    compute_dtype = resolve_dtype(config.dtype, device)
    use_autocast = compute_dtype != torch.float32
    started = time.monotonic()
    step, losses = 0, []
    while step < total_steps:
        # Shuffle, then sort within chunks of 32 batches: similar lengths share a batch, order stays random.
        order = list(range(len(train)))
        rng.shuffle(order)
        chunk = config.batch_size * 32
        batches: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(ids[i]))
            batches.extend(part[j : j + config.batch_size] for j in range(0, len(part), config.batch_size))
        rng.shuffle(batches)
        for batch in batches:
            if step >= total_steps:
                break
            inputs = {k: v.to(device) for k, v in _pad(tokenizer, [ids[i] for i in batch]).items()}
            target_labels = torch.tensor([labels[i] for i in batch], device=device)
            with torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast):
                logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), target_labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress(len(batch))
    elapsed = time.monotonic() - started
    model.eval()
    info = {
        "key": key,
        "backbone": config.backbone,
        "backbone_sha256": backbone_sha,
        "data_hash": data_hash,
        "n_train": len(train),
        "positives": sum(labels),
        "steps": step,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_seconds": round(elapsed, 1),
        "device": str(device),
        "config": config.model_dump(mode="json"),
    }
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_bytes(tmp / TRAINING_INFO, orjson.dumps(info, option=orjson.OPT_INDENT_2))
    log.info("expert.trained", path=str(target), n_train=len(train), seconds=round(elapsed, 1))
    return target

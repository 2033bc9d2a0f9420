"""Offline workflows behind the CLI: extract features, train the probe and the expert, build bundles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.activations.features import FeatureExtractor, feature_namespace
from probes.activations.models import LoadedModel, load_model
from probes.activations.record_cache import RecordStore
from probes.config import ExpertRead, Settings
from probes.data import Dataset, Record, Splits, load_dataset, source_counts, split_dataset
from probes.experts.base import Expert
from probes.experts.dialogue_read import read_dialogues
from probes.experts.encoder_head import EncoderHeadExpert, train_encoder_head
from probes.fitting.heads import fit_logistic
from probes.logs import get_logger
from probes.metrics import classification_metrics
from probes.runtime.bundle import Bundle, new_manifest, save_bundle, update_manifest
from probes.runtime.manifest import BundleManifest, HeadInfo

log = get_logger(__name__)

#: A progress reporter: called once with (description, total) and returns the per-step advance callback.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class Prepared:
    settings: Settings
    dataset: Dataset
    splits: Splits


def prepare_data(settings: Settings, files: Sequence[str | Path] | None = None) -> Prepared:
    dataset = load_dataset(settings.data, files=files)
    splits = split_dataset(dataset, settings.data.splits)
    log.info("data.loaded", n=len(dataset.records), sources=len(source_counts(dataset.records)), **{
        f"n_{k}": v["n"] for k, v in splits.sizes().items()
    })
    return Prepared(settings=settings, dataset=dataset, splits=splits)


def load_monitored_model(settings: Settings, max_layer: int | None = None) -> LoadedModel:
    m = settings.model
    return load_model(
        m.spec, cache_dir=settings.cache_dir, device=m.device, dtype=m.dtype,
        max_layer=max_layer if max_layer is not None else settings.features.layer,
    )


def make_extractor(settings: Settings, loaded: LoadedModel) -> FeatureExtractor:
    m = settings.model
    return FeatureExtractor(
        loaded, layer=settings.features.layer, max_tokens=m.max_tokens, batch_tokens=m.batch_tokens,
        max_items=m.max_batch_items,
    )


def extract_features(
    settings: Settings,
    extractor: FeatureExtractor,
    records: Sequence[Record],
    data_hash: str = "",
    progress: ProgressFactory = no_progress,
) -> tuple[npt.NDArray[np.float32], bool]:
    """Pooled features for ``records``; returns (features, every record came from the cache).

    The cache is per record (content hash, see ``probes.activations.record_cache``): a new combination of files only
    runs the model on records it has not seen. ``data_hash`` is accepted for older callers and unused.
    """
    pooling = settings.features.pooling
    namespace, meta = feature_namespace(extractor.loaded, layer=extractor.layer, pooling=pooling,
                                        max_tokens=extractor.max_tokens)
    store = RecordStore(settings.cache_dir, namespace, description=meta)
    keys = [r.content_key() for r in records]
    todo = store.missing(keys)
    advance = progress("extract activations", todo) if todo else None

    def compute(positions: list[int]) -> npt.NDArray[np.float32]:
        return extractor.pooled([records[i].messages for i in positions], pooling, advance)

    features, computed = store.get_or_compute(keys, compute, dim=extractor.loaded.hidden_size)
    log.info("features.cached", n=len(records), computed=computed, layer=extractor.layer, pooling=pooling)
    return features, computed == 0


def model_section(settings: Settings, loaded: LoadedModel) -> dict[str, Any]:
    return {
        "spec": loaded.spec, "model_id": loaded.model_id, "weights_sha256": loaded.weights_sha256,
        "max_tokens": settings.model.max_tokens, "dtype": settings.model.dtype, "num_layers": loaded.num_layers,
        "hidden_size": loaded.hidden_size,
    }


def data_section(settings: Settings, prepared: Prepared) -> dict[str, Any]:
    d = settings.data
    return {
        "datasets_dir": str(d.datasets_dir), "file_sha256": prepared.dataset.file_hashes,
        "content_hash": prepared.dataset.content_hash(), "max_per_source": d.max_per_source,
        "class_balance_per_source": d.class_balance_per_source, "balance_with": d.balance_with,
        "sources": list(d.sources), "categories": list(d.categories),
        "split_seed": d.splits.seed, "split_fractions": d.splits.model_dump(exclude={"seed"}),
        "split_sizes": prepared.splits.sizes(),
    }


@dataclass
class ProbeResult:
    bundle_dir: Path
    metrics: dict[str, dict[str, float]]
    features_cached: bool


def train_probe(
    settings: Settings, out_dir: Path, progress: ProgressFactory = no_progress,
    prepared: Prepared | None = None, loaded: LoadedModel | None = None,
) -> ProbeResult:
    """Fit the safety probe on probe-train, measure it on evaluation, write a bundle."""
    prepared = prepared or prepare_data(settings)
    loaded = loaded or load_monitored_model(settings)
    extractor = make_extractor(settings, loaded)
    records = list(prepared.dataset.records)
    features, cached = extract_features(settings, extractor, records, prepared.dataset.content_hash(), progress)
    index = {id(r): i for i, r in enumerate(records)}
    train_idx = [index[id(r)] for r in prepared.splits.probe_train]
    eval_idx = [index[id(r)] for r in prepared.splits.evaluation]
    y_train = np.asarray([records[i].label for i in train_idx])
    y_eval = np.asarray([records[i].label for i in eval_idx])
    head = fit_logistic(features[train_idx], y_train, c=settings.probe.regularization_c,
                        max_iter=settings.probe.max_iter, seed=settings.data.splits.seed)
    metrics = {
        "probe_train": classification_metrics(y_train, head.proba(features[train_idx])),
        "evaluation": classification_metrics(y_eval, head.proba(features[eval_idx])),
    }
    manifest = new_manifest(
        model=model_section(settings, loaded),
        features=settings.features.model_dump(mode="json"),
        data=data_section(settings, prepared),
    )
    manifest = manifest.replace(heads={"safety": HeadInfo(type="logistic", c=settings.probe.regularization_c,
                                                          n_train=len(train_idx), output="p_unsafe")},
                                metrics={"safety_probe": metrics})
    bundle = Bundle(manifest=manifest, heads={"safety": head})
    save_bundle(bundle, out_dir)
    log.info("probe.trained", bundle=str(out_dir), eval_auroc=round(metrics["evaluation"]["auroc"], 4))
    return ProbeResult(bundle_dir=out_dir, metrics=metrics, features_cached=cached)


@dataclass
class ExpertResult:
    expert_dir: Path
    metrics: dict[str, float]
    name: str


def train_expert(
    settings: Settings, progress: ProgressFactory = no_progress, prepared: Prepared | None = None,
    force: bool = False,
) -> ExpertResult:
    """Fine-tune the encoder-head expert on the whole probe-train split; measure it on evaluation."""
    prepared = prepared or prepare_data(settings)
    cfg = settings.expert.encoder_head
    train = prepared.splits.probe_train
    n_train = min(len(train), cfg.max_train or len(train))
    epochs_total = int(np.ceil(n_train * cfg.epochs / cfg.batch_size) * cfg.batch_size)
    advance = progress("fine-tune expert", epochs_total)
    expert_dir = train_encoder_head(cfg, train, cache_dir=settings.cache_dir, progress=advance, force=force)
    expert = EncoderHeadExpert(expert_dir, device=cfg.device, dtype=cfg.dtype, max_windows=cfg.max_windows)
    evaluation = prepared.splits.evaluation
    scores = score_in_chunks(expert, evaluation, progress("expert scores (evaluation)", len(evaluation)))
    metrics = classification_metrics([r.label for r in evaluation], scores)
    return ExpertResult(expert_dir=expert_dir, metrics=metrics, name=expert.name)


def train_bundle(
    settings: Settings, out: Path, progress: ProgressFactory = no_progress, prepared: Prepared | None = None,
) -> tuple[ProbeResult, ExpertResult, BundleManifest]:
    """Probe and expert on the shared data; the expert is recorded in the bundle manifest."""
    prepared = prepared or prepare_data(settings)
    probe = train_probe(settings, out, progress, prepared=prepared)
    expert = train_expert(settings, progress, prepared=prepared)
    manifest = update_manifest(out, expert={"backend": "encoder-head", "path": str(expert.expert_dir),
                                            "name": expert.name, "evaluation": expert.metrics})
    return probe, expert, manifest


def score_in_chunks(expert: Expert, records: Sequence[Record], advance: Callable[[int], None],
                    chunk: int = 256, read: ExpertRead = "whole") -> npt.NDArray[np.float64]:
    """Expert scores in chunks, so progress moves and a huge file never becomes one batch; ``read`` other than
    whole is for long dialogues (probes/experts/dialogue_read.py)."""
    out = np.zeros(len(records), dtype=np.float64)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        out[start : start + len(part)] = read_dialogues(expert.score, [r.messages for r in part], read=read)
        advance(len(part))
    return out

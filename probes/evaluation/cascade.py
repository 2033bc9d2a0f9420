"""The CTD workflow on a bundle: DV + router heads, LTT calibration, and scores for evaluation.

Everything is computed from the bundle's own data recipe (manifest ``data``) so that calibration and
evaluation use exactly the splits the probe was trained against; a changed dataset is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file

from probes.cache import sha256_text
from probes.calibration.cascade_rule import Cuts
from probes.calibration.ltt import (
    Calibration,
    UnsafeCut,
    Variant,
    calibrate,
    calibrate_unsafe_cut,
    cascade_error_risk,
    split_opt_ht,
)
from probes.config import DataConfig, Settings, SplitConfig
from probes.data import SPLITS, Record
from probes.errors import BundleError, DataError
from probes.evaluation.long_cut import calibrate_long_cut, long_conversations
from probes.experts.base import Expert
from probes.experts.factory import build_expert
from probes.fitting.dv import Target, dv_binary, signal_quality
from probes.fitting.heads import crossfit_probe, fit_dv, fit_router
from probes.fitting.pipeline import (
    Prepared,
    ProgressFactory,
    extract_features,
    load_monitored_model,
    make_extractor,
    no_progress,
    prepare_data,
    score_in_chunks,
)
from probes.heads.inference import CUT_EXTRA_FEATURES
from probes.logs import get_logger
from probes.runtime.bundle import Bundle, load_bundle, save_bundle, update_manifest
from probes.runtime.manifest import SIGNAL_NAMES, HeadInfo, LongConversationCut, Signal
from probes.runtime.monitor import Monitor, head_scores

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]


def settings_for_bundle(settings: Settings, bundle: Bundle) -> Settings:
    """The settings the bundle was trained with (model, layer, pooling, data recipe), others from ``settings``."""
    m, f, d = bundle.model, bundle.features, bundle.manifest.data
    return settings.model_copy(update={
        "model": settings.model.model_copy(update={"spec": m.spec, "max_tokens": m.max_tokens}),
        "features": settings.features.model_copy(update={"layer": f.layer, "pooling": f.pooling}),
        "data": DataConfig(
            datasets_dir=Path(d.datasets_dir) if Path(d.datasets_dir).is_dir() else settings.data.datasets_dir,
            files=tuple(d.file_sha256), sources=d.sources, categories=d.categories,
            max_per_source=d.max_per_source, class_balance_per_source=d.class_balance_per_source,
            balance_with=d.balance_with,
            splits=SplitConfig(seed=d.split_seed, **d.split_fractions),
        ),
    })


@dataclass
class Scored:
    """Everything a policy or metric needs about a set of records."""

    records: list[Record]
    features: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    p: F64
    b: F64


class CascadeContext:
    """A bundle, its model, its expert, and cached features / expert scores for any record list."""

    def __init__(self, settings: Settings, bundle_dir: Path, progress: ProgressFactory = no_progress,
                 expert: Expert | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.bundle = load_bundle(bundle_dir)
        self.settings = settings_for_bundle(settings, self.bundle)
        self.progress = progress
        self.loaded = load_monitored_model(self.settings)
        self.bundle.check_model(self.loaded.spec, self.loaded.weights_sha256)
        self.extractor = make_extractor(self.settings, self.loaded)
        self.expert = expert or build_expert(self.settings, bundle_manifest=self.bundle.manifest)
        self._prepared: Prepared | None = None
        self._split_cache: dict[str, Scored] = {}
        self._dataset_features: npt.NDArray[np.float32] | None = None

    @property
    def prepared(self) -> Prepared:
        if self._prepared is None:
            prepared = prepare_data(self.settings)
            want = self.bundle.manifest.data.content_hash
            if prepared.dataset.content_hash() != want:
                raise BundleError("the bundle's training data changed on disk (content hash differs); retrain")
            self._prepared = prepared
        return self._prepared

    def score(self, records: list[Record]) -> Scored:
        """Features, probe and expert scores; records of the bundle's own splits reuse the split caches."""
        known = self._from_splits(records)
        if known is not None:
            return known
        data_hash = sha256_text(*(f"{r.id}\x1e{r.content_key()}" for r in records))
        features, _ = extract_features(self.settings, self.extractor, records, data_hash, self.progress)
        return self._scored(records, features, self.expert_scores(records, data_hash))

    def _scored(self, records: list[Record], features: npt.NDArray[np.float32], b: F64) -> Scored:
        p = self.bundle.heads["safety"].proba(features)
        return Scored(records, features, np.asarray([r.label for r in records], dtype=np.int64), p, b)

    def _from_splits(self, records: list[Record]) -> Scored | None:
        try:
            splits = self.prepared.splits
        except (BundleError, DataError):
            return None  # evaluating other files on a bundle whose training data is not at hand
        where: dict[tuple[str, str], tuple[str, int]] = {}
        for name in SPLITS:
            for i, r in enumerate(splits.get(name)):
                where[(r.id, r.content_key())] = (name, i)
        keys = [(r.id, r.content_key()) for r in records]
        if not all(k in where for k in keys):
            return None
        parts = {name: self.split(name) for name in {where[k][0] for k in keys}}
        idx = [where[k] for k in keys]
        features = np.stack([parts[n].features[i] for n, i in idx]) if idx else np.zeros((0, 0), np.float32)
        b = np.asarray([parts[n].b[i] for n, i in idx], dtype=np.float64)
        return self._scored(records, features, b)

    def expert_scores(self, records: list[Record], data_hash: str) -> F64:
        path = self.settings.cache_dir / "expert_scores" / f"{sha256_text(self.expert.name, data_hash)[:32]}.safetensors"
        if path.is_file():
            return load_file(str(path))["b"].astype(np.float64)
        advance = self.progress(f"expert scores ({self.expert.name.split(':')[0]})", len(records))
        out = score_in_chunks(self.expert, records, advance)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"b": out}, str(path))
        return out

    def split(self, name: str) -> Scored:
        if name not in self._split_cache:
            dataset = self.prepared.dataset
            # Features of the whole dataset were cached when the probe was trained: index them.
            if self._dataset_features is None:
                self._dataset_features, _ = extract_features(
                    self.settings, self.extractor, list(dataset.records), dataset.content_hash(), self.progress)
            position = {id(r): i for i, r in enumerate(dataset.records)}
            records = list(self.prepared.splits.get(name))  # type: ignore[arg-type]
            features = self._dataset_features[[position[id(r)] for r in records]]
            data_hash = sha256_text(*(f"{r.id}\x1e{r.content_key()}" for r in records))
            self._split_cache[name] = self._scored(records, features, self.expert_scores(records, data_hash))
        return self._split_cache[name]

    def signal(self, name: Signal | str, scored: Scored) -> F64:
        """The delegation signal the worker would compute for these records (one code path: head_scores)."""
        try:
            signal = Signal(name)
        except ValueError:
            raise BundleError(f"unknown delegation signal {name!r}: use one of "
                              f"{', '.join(SIGNAL_NAMES)}") from None
        if signal == Signal.ROUTER and not any(k.startswith("router.") for k in self.bundle.extra_tensors):
            raise BundleError("the bundle has no router head: run `ctd-monitor train-dv` first")
        if signal == Signal.DV and "dv" not in self.bundle.heads:
            raise BundleError("the bundle has no DV head: run `ctd-monitor train-dv` first")
        # Centred on the bundle's current cut: what calibrate_signal records with the threshold it calibrates.
        return head_scores(self.bundle, scored.features, signal, centre=self.bundle.manifest.probe_cut).signal

    @property
    def cuts(self) -> Cuts:
        """The unsafe cuts the bundle sets for its probe and for this context's expert (default 0.5 each)."""
        manifest = self.bundle.manifest
        expert = manifest.expert_cut(self.expert.name)
        return Cuts(probe=manifest.probe_cut, expert=expert.cut if expert is not None else Cuts().expert)


DVData = Literal["crossfit", "dev"]


def dv_training_data(ctx: CascadeContext, source: DVData) -> Scored:
    """Records with honest probe scores for DV labels.

    ``dev``: the dev split, where both probe and expert are out of sample (few "expert helps" cases).
    ``crossfit``: probe-train ∪ dev with 5-fold out-of-fold probe scores, several times the cases. The
    expert's scores on probe-train are in-sample (one more fine-tune per fold is too costly on CPU); the
    manifest records the expert's in-sample vs out-of-sample accuracy so the approximation is visible.
    """
    dev = ctx.split("dev")
    if source == "dev":
        return dev
    train = ctx.split("probe_train")
    features = np.concatenate([train.features, dev.features])
    y = np.concatenate([train.y, dev.y])
    p = crossfit_probe(features, y, c=ctx.settings.probe.regularization_c, seed=ctx.settings.data.splits.seed)
    return Scored(train.records + dev.records, features, y, p, np.concatenate([train.b, dev.b]))


def dv_cuts(ctx: CascadeContext, *, epsilon: float, delta: float) -> Cuts:
    """The cuts the DV target is taken at: the cascade's own when the bundle's cuts are calibrated already (the
    decisions the head must learn to fix); before that, certified (benign flag rate ≤ ε) on the dev split, where
    probe and expert are both out of sample, an estimate of the same quantile (a cut that does not certify keeps
    the default; calibrate warns when its cuts land elsewhere)."""
    manifest = ctx.bundle.manifest
    if manifest.unsafe_cut is not None and manifest.expert_cut(ctx.expert.name) is not None:
        return ctx.cuts
    dev = ctx.split("dev")
    probe, expert = (calibrate_unsafe_cut(scores, dev.y, epsilon=epsilon, delta=delta, scorer=name)
                     for scores, name in ((dev.p, "probe"), (dev.b, ctx.expert.name)))
    return Cuts(probe=probe.cut, expert=expert.cut)


def train_dv(ctx: CascadeContext, *, target: Target = "binary", source: DVData = "crossfit", epsilon: float = 0.05,
             delta: float = 0.1) -> dict[str, Any]:
    """Fit the DV head and the router at the cuts the cascade will decide at (``dv_cuts``: ε, δ as ``calibrate``
    will use); store both in the bundle with their quality on held-out splits."""
    data = dv_training_data(ctx, source)
    seed = ctx.settings.data.splits.seed
    cuts = dv_cuts(ctx, epsilon=epsilon, delta=delta)
    fit = fit_dv(data.features, data.y, data.p, data.b, target=target, seed=seed, cuts=cuts)
    router = fit_router(data.features, dv_binary(data.y, data.p, data.b, cuts), seed=seed)
    train = ctx.split("probe_train")
    expert_acc = {"probe_train_in_sample": float(np.mean((train.b >= cuts.expert) == train.y)),
                  "dev_out_of_sample": float(np.mean((ctx.split("dev").b >= cuts.expert) == ctx.split("dev").y))}
    bundle = ctx.bundle
    bundle.heads["dv"] = fit.head
    bundle.extra_tensors = {k: v for k, v in bundle.extra_tensors.items() if not k.startswith("router.")}
    bundle.extra_tensors.update(router.to_tensors("router"))
    heads = {
        **bundle.manifest.heads,
        "dv": HeadInfo(
            type="logistic" if target == "binary" else "ridge", target=target, extra_features=CUT_EXTRA_FEATURES,
            feature_set=fit.feature_set, cv_auroc=fit.cv_auroc, regularization=fit.regularization,
            n_train=fit.n_train, train_positives=fit.positives, trained_on=source, expert_accuracy=expert_acc,
            decision_cuts={"probe": cuts.probe, "expert": cuts.expert},
        ),
        "router": HeadInfo(type="mlp", hidden=tuple(int(w.shape[1]) for w in router.weights[:-1]), target="binary",
                           trained_on=source, decision_cuts={"probe": cuts.probe, "expert": cuts.expert}),
    }
    bundle.manifest = bundle.manifest.replace(heads=heads)
    save_bundle(bundle, ctx.bundle_dir)
    ctx.bundle = load_bundle(ctx.bundle_dir)
    quality: dict[str, Any] = {}
    for split in ("calibration", "evaluation"):
        scored = ctx.split(split)
        quality[split] = {name: signal_quality(ctx.signal(name, scored), scored.y, scored.p, scored.b, cuts)
                          for name in SIGNAL_NAMES}
    ctx.bundle.manifest = update_manifest(ctx.bundle_dir, metrics={**ctx.bundle.manifest.metrics,
                                                                   "dv_quality": quality})
    log.info("dv.trained", target=target, source=source, helps=fit.positives, n=fit.n_train,
             feature_set=fit.feature_set)
    return {"target": target, "source": source, "train": {"n": fit.n_train, "helps": fit.positives},
            "feature_set": fit.feature_set, "cv_auroc": fit.cv_auroc, "regularization": fit.regularization,
            "expert_accuracy": expert_acc, "quality": quality}


def calibrate_signal(ctx: CascadeContext, cal: Scored, signal: Signal | None, *, alpha: float, delta: float,
                     variant: Variant, seed: int = 0, values: F64 | None = None) -> Calibration:
    """LTT for one signal on the calibration records; ``values`` saves recomputing the signal per budget.

    ``signal=None`` is the random baseline. The Pareto filter's error is the cascade's at the bundle's cuts.
    """
    if values is None:
        values = ctx.signal(signal, cal) if signal is not None else random_signal(len(cal.records), seed)
    risk = None
    if variant == "pareto":
        opt, _ = split_opt_ht(len(values), seed)
        risk = cascade_error_risk(values[opt], cal.p[opt], cal.b[opt], cal.y[opt], ctx.cuts)
    result = calibrate(values, alpha=alpha, delta=delta, variant=variant, error_risk=risk, seed=seed,
                       signal_name=signal)
    if signal == Signal.UNCERTAINTY:  # the centre ctx.signal used, so the worker computes the same signal
        result = result.model_copy(update={"uncertainty_centre": ctx.bundle.manifest.probe_cut})
    return result


def calibrate_cuts(ctx: CascadeContext, cal: Scored, *, epsilon: float, delta: float) -> tuple[UnsafeCut, UnsafeCut]:
    """The probe's and the expert's unsafe cuts, each certified on the calibration records (benign flag rate ≤ ε)."""
    return (calibrate_unsafe_cut(cal.p, cal.y, epsilon=epsilon, delta=delta, scorer="probe"),
            calibrate_unsafe_cut(cal.b, cal.y, epsilon=epsilon, delta=delta, scorer=ctx.expert.name))


class LongCuts(NamedTuple):
    """The long-conversation cuts of the probe and of the expert (None: none certified or nothing to certify on)."""

    probe: LongConversationCut | None
    expert: LongConversationCut | None


def calibrate_long(ctx: CascadeContext, *, epsilon: float, delta: float) -> LongCuts:
    """The probe's and the expert's cuts for long conversations (probes/evaluation/long_cut.py), on the same long
    benign dialogues: read by the runtime ``Monitor`` and by ``Expert.score``, as the worker and the guard read them."""
    monitor = Monitor(ctx.bundle_dir, ctx.settings.model, cache_dir=ctx.settings.cache_dir)
    n = ctx.settings.long_calibration.max_conversations
    trained_on = ctx.prepared.dataset.records
    # Selected (and tokenized) once: both cuts are certified on the same dialogues.
    found = long_conversations(ctx.settings, monitor, trained_on, limit=n) if n and monitor.windows.enabled else None

    def certify(expert: Expert | None) -> LongConversationCut | None:
        name = "worker" if expert is None else expert.name.split(":")[0]
        return calibrate_long_cut(ctx.settings, monitor, trained_on, epsilon=epsilon, delta=delta, expert=expert,
                                  found=found, advance=ctx.progress(f"long conversations ({name} reads)", n)
                                  if n else lambda _n: None)

    return LongCuts(probe=certify(None), expert=certify(ctx.expert))


NO_LONG_CUTS = LongCuts(probe=None, expert=None)


def write_cuts(ctx: CascadeContext, probe: UnsafeCut, expert: UnsafeCut, long: LongCuts = NO_LONG_CUTS) -> None:
    """The cuts into the manifest; a long cut left None removes one certified before (it was for another ε)."""
    ctx.bundle.manifest = update_manifest(ctx.bundle_dir, unsafe_cut=probe, expert_unsafe_cut=expert,
                                          long_unsafe_cut=long.probe, expert_long_unsafe_cut=long.expert)
    for cut in (long.probe, long.expert):
        if cut is not None and not cut.cut.valid:
            log.warning("calibration.no_valid_long_cut", scorer=cut.cut.scorer, epsilon=cut.cut.epsilon,
                        delta=cut.cut.delta, n=cut.cut.n)
    for unsafe in (probe, expert):
        if not unsafe.valid:
            log.warning("calibration.no_valid_unsafe_cut", scorer=unsafe.scorer, epsilon=unsafe.epsilon,
                        delta=unsafe.delta, n_benign=unsafe.n, kept_cut=unsafe.cut)


def random_signal(n: int, seed: int) -> F64:
    return np.random.default_rng(10_000 + seed).uniform(size=n)


def write_calibration(ctx: CascadeContext, result: Calibration) -> None:
    ctx.bundle.manifest = update_manifest(ctx.bundle_dir, calibration=result)
    if not result.valid:
        log.warning("calibration.no_valid_threshold", signal=result.signal, alpha=result.alpha, delta=result.delta,
                    n_ht=result.n_ht)

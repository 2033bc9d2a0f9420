"""Online recalibration replay: the offline cut vs a cut re-certified on audited events, on unseen sources.

A ``bench drift``-style stream over real records, with no Kafka: the probe and the frozen-embedding expert of
``probes.evaluation.generalization`` are trained (fit rows) and cut (calibration rows) on every group except the held-out
ones, exactly as a leave-source-out fold; the stream then replays the training mix followed by each held-out
group in turn (events drawn with replacement from its pooled records). Every event gets the probe's verdict
under two policies:

* ``offline``: the certified cut of the fold's calibration rows, never changed;
* ``online``: ``probes.calibration.recalibration.OnlineRecalibrator`` fed the expert verdicts of the audited events
  (``audit_selected`` on the event id, rate ``audit.rate``), the cut in force when the event arrives;
* ``online_oracle_guard``: the same, fed the dataset label of the audited events (a perfect guard): the bound
  on what recalibration can do, separating its effect from the guard's quality.

``audit.refit`` says what the window refits: the Platt map and cut, or the probe's head and cut (then the
audited events' pooled activations go into the window, as they do in the worker). Events are drawn with
replacement, so a record can recur: only records of one content-hash half of each phase are audited and the
figures count only events of the other half (``generalization.audit_half``), so a refit head is never scored on
a record it was taught.

The expert plays the guard: its verdict on an audited event is the only label the online policy sees. Ground
truth (the dataset label) is used for the figures only. Features and embeddings come from the per-record cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from probes.calibration.recalibration import OnlineRecalibrator, audit_selected
from probes.config import AuditConfig
from probes.evaluation.generalization.folds import AFTER, LosoConfig, Recipe, audit_half, make_fold
from probes.evaluation.generalization.loso import Progress, no_progress, stack_variants
from probes.evaluation.generalization.pool import build_pool, fill_expert_embeddings, fill_probe_features
from probes.evaluation.generalization.scoring import score_fold
from probes.heads.inference import LinearHead

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
HELD_OUT = "held_out"
TRAINING_MIX = "training_mix"


def figures(y: npt.NDArray[np.int64], flagged: npt.NDArray[np.bool_]) -> dict[str, float]:
    """FPR, precision, recall, F1, accuracy and the majority rate of hard verdicts (NaN where undefined)."""
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / pos if pos else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if pos and precision + recall > 0 else (0.0 if pos else
                                                                                                float("nan"))
    return {"n": len(y), "positives": pos, "fpr": fp / neg if neg else float("nan"), "precision": precision,
            "recall": recall, "f1": f1, "accuracy": float(np.mean(flagged == (y == 1))),
            "majority_rate": max(pos, neg) / len(y), "flag_rate": float(flagged.mean())}


@dataclasses.dataclass
class Stream:
    phase: list[str]
    rows: npt.NDArray[np.int64]  # pool row of each event


def make_stream(phases: Sequence[tuple[str, npt.NDArray[np.int64]]], events: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    names: list[str] = []
    rows: list[npt.NDArray[np.int64]] = []
    for name, candidates in phases:
        if not len(candidates):
            continue
        rows.append(rng.choice(candidates, size=events, replace=True))
        names.extend([name] * events)
    return Stream(names, np.concatenate(rows).astype(np.int64))


def replay(stream: Stream, p: F64, b: F64, *, offline_cut: float, offline_valid: bool, audit: AuditConfig,
           auditable: npt.NDArray[np.bool_], features: F32 | None = None, head: LinearHead | None = None,
           expert_cut: float = 0.5, salt_prefix: str = "") -> dict[str, Any]:
    """Per-event verdicts of both policies; the online cut in force is the one before the event is audited.

    ``auditable``: per pool row, whether its events may be audited; ``features`` and ``head``: the pooled
    activations per pool row and the probe's head (``audit.refit == "head"``)."""
    recal = OnlineRecalibrator(audit, offline_cut=offline_cut, offline_valid=offline_valid, head=head)
    n = len(stream.rows)
    online = np.zeros(n, dtype=bool)
    audited = np.zeros(n, dtype=bool)
    window_cut = np.zeros(n, dtype=bool)
    cuts = np.zeros(n, dtype=np.float64)
    for t, row in enumerate(stream.rows):
        score = float(p[row])
        x = None if features is None else features[row]
        state = recal.state
        online[t] = bool(recal.flags([score], None if x is None else x[None])[0])
        window_cut[t] = state.source == "window"
        cuts[t] = math.nan if state.probe_cut is None else state.probe_cut
        if auditable[row] and audit_selected(f"{salt_prefix}{t}", audit.rate, audit.salt):
            audited[t] = True
            recal.observe(score, bool(b[row] >= expert_cut), x)
    return {"offline": p[stream.rows] >= offline_cut, "online": online, "audited": audited,
            "window_cut": window_cut, "probe_cut": cuts, "final_state": recal.state}


def run_adaptation(config: LosoConfig, *, held_out: Sequence[str], audit: AuditConfig, events: int,
                   cache_dir: Path, datasets_dir: Path, recipe: Recipe = AFTER, guard_cut: float = 0.5,
                   progress: Progress = no_progress) -> dict[str, Any]:
    """Train on the other groups, replay training mix → each held-out group, report both policies per phase.

    ``guard_cut``: the expert verdict of an audit is "unsafe" at or above it, on the expert's score recentred so
    that 0.5 is its own certified cut; lower trades the guard's precision for recall.
    """
    known = {grp.name for grp in config.pool.groups}
    unknown = [h for h in held_out if h not in known]
    if unknown or not held_out:
        raise ValueError(f"unknown held-out groups {unknown}; known: {sorted(known)}")
    pool = build_pool(datasets_dir, config.pool)
    features, computed = fill_probe_features(
        cache_dir, pool, recipe.variants, spec=config.probe_spec, max_tokens=config.probe_max_tokens,
        dtype=config.dtype, progress=progress("probe features (cached per record)", len(pool)))
    embeddings, expert_computed, backbone = fill_expert_embeddings(
        cache_dir, pool, spec=config.expert.spec, max_tokens=config.expert.max_tokens, dtype=config.dtype,
        progress=progress("expert embeddings (cached per record)", len(pool)))
    # One fold whose test side is every held-out group (nothing of them, by file or text, reaches training).
    merged = [dataclasses.replace(r, group=HELD_OUT) if r.group in held_out else r for r in pool]
    fold = make_fold(merged, HELD_OUT, recipe, calibration_fraction=config.calibration_fraction, seed=config.seed)
    y = np.asarray([r.record.label for r in pool], dtype=np.int64)
    if len(np.unique(y[fold.fit])) < 2:
        raise ValueError("the training side lacks a class")
    x = stack_variants(features, recipe.variants)
    s = score_fold(fold, x, embeddings, y, recipe, config.expert.c, delta=config.delta, seed=config.seed)
    # s.b is recentred: 0.5 is the expert's certified cut (or 0.5 when none certified); the probe is replayed on
    # its raw score against its raw cut, as the worker decides.
    p, cut = s.probe_head.proba(x), s.cuts["probe"]
    head_mode = audit.refit == "head"
    phases = [(TRAINING_MIX, fold.calibration)]
    phases += [(h, np.asarray([i for i, r in enumerate(pool) if r.group == h], dtype=np.int64)) for h in held_out]
    stream = make_stream(phases, events, config.seed)
    auditable = np.zeros(len(pool), dtype=np.bool_)
    for _, rows in phases:
        auditable[rows] = audit_half(pool, rows, config.seed)
    common: dict[str, Any] = {"offline_cut": cut or 0.5, "offline_valid": cut is not None, "audit": audit,
                              "auditable": auditable, "features": x if head_mode else None,
                              "head": s.probe_head if head_mode else None}
    out = replay(stream, p, s.b, expert_cut=guard_cut, **common)
    # The same replay with a perfect guard (the dataset label as the audited verdict): how much of the gap is
    # the recalibration and how much the guard. The event ids, hence the audited events, are the same.
    oracle = replay(stream, p, y.astype(np.float64), **common)
    names = np.asarray(stream.phase)
    truth = y[stream.rows]
    expert_flags = s.b[stream.rows] >= guard_cut
    per_phase: dict[str, Any] = {}
    scored = ~auditable[stream.rows]  # figures on the half never audited
    for name in [n for n, _ in phases if np.any(names == n)]:
        m = (names == name) & scored
        late = m & (np.cumsum(m) > m.sum() // 2)  # second half of the phase: after the window had time to turn
        per_phase[name] = {
            "events": int(np.sum(names == name)), "scored_events": int(m.sum()),
            "records": len(np.unique(stream.rows[m])), "audited": int(out["audited"][names == name].sum()),
            "under_window_cut": float(out["window_cut"][m].mean()),
            "offline": figures(truth[m], out["offline"][m]), "online": figures(truth[m], out["online"][m]),
            "online_second_half": figures(truth[late], out["online"][late]),
            "offline_second_half": figures(truth[late], out["offline"][late]),
            "online_oracle_guard": figures(truth[m], oracle["online"][m]),
            "online_oracle_guard_second_half": figures(truth[late], oracle["online"][late]),
            "expert": figures(truth[m], expert_flags[m]),
            # what the certificate is about: the flag rate on events the expert calls benign
            "online_expert_benign_flag_rate": float(out["online"][m & ~expert_flags].mean())
            if np.any(m & ~expert_flags) else float("nan"),
            "offline_expert_benign_flag_rate": float(out["offline"][m & ~expert_flags].mean())
            if np.any(m & ~expert_flags) else float("nan"),
            "probe_cut_at_end": float(out["probe_cut"][m][-1]),
        }
    held = (names != TRAINING_MIX) & scored
    return {
        "held_out": list(held_out), "events_per_phase": events, "guard_cut": guard_cut, "recipe": recipe.name,
        "refit": audit.refit,
        "audit": audit.model_dump(mode="json"), "expert": f"frozen {backbone} + logistic head",
        "probe": config.probe_spec, "cuts": s.cuts,
        "train": {"n_fit": len(fold.fit), "n_calibration": len(fold.calibration),
                  "files": sorted({pool[i].record.file for i in fold.fit})},
        "computed": {"probe_records": computed, "expert_records": expert_computed},
        "phases": per_phase,
        "held_out_overall": {"offline": figures(truth[held], out["offline"][held]),
                             "online": figures(truth[held], out["online"][held]),
                             "online_oracle_guard": figures(truth[held], oracle["online"][held])},
        "final_state": out["final_state"].model_dump(mode="json"),
        "final_state_oracle_guard": oracle["final_state"].model_dump(mode="json"),
        "trace": {"phase": stream.phase, "probe_cut": out["probe_cut"].tolist(),
                  "probe_cut_oracle_guard": oracle["probe_cut"].tolist(),
                  "audited": out["audited"].astype(int).tolist()},
    }


def write(report: dict[str, Any], out: Path, *, plot: bool = False) -> dict[str, Any]:
    """adaptation.json (with the per-event cut trace) and, on request, adaptation.png; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptation.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    summary = {k: v for k, v in report.items() if k != "trace"}
    summary["out"] = str(out / "adaptation.json")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        trace = report["trace"]
        fig, ax = plt.subplots(figsize=(9, 3))
        ax.plot(trace["probe_cut"], label="online probe cut, expert guard (recentred score)")
        ax.plot(trace["probe_cut_oracle_guard"], label="online probe cut, oracle guard")
        ax.axhline(0.5, color="grey", ls="--", label="offline cut")
        starts = [i for i, ph in enumerate(trace["phase"]) if i == 0 or trace["phase"][i - 1] != ph]
        for i in starts:
            ax.axvline(i, color="k", lw=0.5)
            ax.text(i, 1.0, trace["phase"][i], fontsize=7, va="top")
        ax.set_xlabel("event")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "adaptation.png", dpi=120)
        plt.close(fig)
        summary["plot"] = str(out / "adaptation.png")
    return summary

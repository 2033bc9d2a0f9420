"""``ctd-monitor demo``: the whole system on one machine, measured on labelled traffic.

It trains (or reuses) a calibrated bundle and its expert on a small slice of the shared datasets, starts the
embedded Kafka broker, runs the monitor worker, the guard service and the alerter, replays conversations the
bundle never saw, waits for every final verdict and reports: throughput, delegation rate versus the budget,
accuracy/F1 of probe-only, the cascade and expert-only on the replayed labels, alerts raised, and the cost per
1k events both in seconds and in model compute (parameters x tokens).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer

from ctd_monitor.local.broker import LocalBroker, resolve_cache_dir
from ctd_monitor.local.replay import replay_records
from probes.calibration.cascade_rule import cascade_scores, per_1k
from probes.config import Settings
from probes.data import Record, read_file, resolve_paths
from probes.evaluation.cascade import (
    CascadeContext,
    calibrate_cuts,
    calibrate_long,
    calibrate_signal,
    train_dv,
    write_calibration,
    write_cuts,
)
from probes.experts.base import Expert
from probes.experts.factory import build_expert
from probes.fitting.pipeline import ProgressFactory, no_progress, prepare_data, score_in_chunks, train_bundle
from probes.logs import get_logger
from probes.metrics import classification_metrics, decision_metrics
from probes.runtime.bundle import read_manifest
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT, BundleManifest, Signal
from probes.runtime.monitor import Monitor
from worker.config import (
    AlertsConfig,
    BudgetConfig,
    GuardConfig,
    GuardSettings,
    KafkaConfig,
    SigningConfig,
    TopicsConfig,
    WorkerConfig,
    WorkerSettings,
)
from worker.main import GuardProcess
from worker.monitor import monitor_stream
from worker.signing import generate_audit_secret, generate_keys
from worker.topics import create_topics, topic_specs

log = get_logger(__name__)
# A guard such as Llama Guard 3 8B beside a 1B monitored model: the production cost ratio the demo projects.
PRODUCTION_GUARD_PARAMS = 8.0e9
PRODUCTION_MONITOR_PARAMS = 1.24e9


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    events: int = 300
    # ε and α: the README ("What it shows") gives the sweep they were chosen from.
    alpha: float = 0.3
    delta: float = 0.1
    epsilon: float = 0.08
    per_source: int = 40
    expert_train: int | None = None  # None: the whole probe-train split
    expert_epochs: float = 2.0
    rate: float | None = None
    timeout_s: float = 900.0
    seed: int = 0


def demo_settings(settings: Settings, options: DemoOptions) -> Settings:
    """The configured settings on a small slice of the data, so a fresh machine trains in minutes."""
    data = settings.data.model_copy(update={"max_per_source": options.per_source})
    head = settings.expert.encoder_head.model_copy(update={"max_train": options.expert_train,
                                                           "epochs": options.expert_epochs})
    expert = settings.expert.model_copy(update={"encoder_head": head})
    return settings.model_copy(update={"data": data, "expert": expert})


def reusable(manifest: BundleManifest, options: DemoOptions, content_hash: str, settings: Settings) -> bool:
    """A bundle with an expert, calibrated at these ε, α and δ, on this data (a changed default or file retrains);
    where ``settings`` certify long cuts, also for long conversations, the probe's and the expert's, each read as
    ``settings`` read them (a bundle from before either long cut or reading is calibrated again)."""
    cal, cut = manifest.calibration, manifest.unsafe_cut
    long, probe_long, expert_long = settings.long_calibration, manifest.long_unsafe_cut, manifest.expert_long_unsafe_cut
    long_cuts = long.max_conversations == 0 or (
        probe_long is not None and probe_long.windows == settings.model.windows.model_dump(mode="json")
        and expert_long is not None and expert_long.expert_read == long.expert_read)
    return (manifest.expert is not None and cal is not None and cal.alpha == options.alpha
            and cal.delta == options.delta and cut is not None and cut.epsilon == options.epsilon
            and manifest.data.content_hash == content_hash and long_cuts)


def ensure_bundle(settings: Settings, bundle_dir: Path, options: DemoOptions,
                  progress: ProgressFactory = no_progress) -> BundleManifest:
    """Reuse a bundle calibrated at this budget; otherwise train probe, expert and DV head, then calibrate."""
    prepared = prepare_data(settings)
    if (bundle_dir / "manifest.json").is_file():
        manifest = read_manifest(bundle_dir)
        if reusable(manifest, options, prepared.dataset.content_hash(), settings):
            log.info("demo.bundle_reused", bundle=str(bundle_dir))
            return manifest
    train_bundle(settings, bundle_dir, progress, prepared)
    ctx = CascadeContext(settings, bundle_dir, progress)
    # Cuts first, so the DV head learns where the expert fixes the decisions the cascade will actually take.
    write_cuts(ctx, *calibrate_cuts(ctx, ctx.split("calibration"), epsilon=options.epsilon, delta=options.delta),
               calibrate_long(ctx, epsilon=options.epsilon, delta=options.delta))
    train_dv(ctx, epsilon=options.epsilon, delta=options.delta)
    result = calibrate_signal(ctx, ctx.split("calibration"), Signal.DV, alpha=options.alpha, delta=options.delta,
                              variant="pareto", seed=options.seed)
    write_calibration(ctx, result)
    return read_manifest(bundle_dir)


def held_out_records(settings: Settings, n: int, seed: int) -> list[Record]:
    """``n`` labelled rows of the configured sources the bundle never saw: half unsafe, half safe (the training
    mix is balanced the same way), each half spread evenly over its sources rather than drawn from the largest."""
    seen = {r.id for r in prepare_data(settings).dataset.records}
    pools: dict[int, dict[str, list[Record]]] = {0: {}, 1: {}}
    for path in resolve_paths(settings.data.datasets_dir, settings.data.files):
        for record in read_file(path):
            if record.id not in seen:
                pools[record.label].setdefault(record.source, []).append(record)
    rng = random.Random(seed)
    out: list[Record] = []
    for label, want in ((1, n - n // 2), (0, n // 2)):
        queues = [rows for _, rows in sorted(pools[label].items())]
        for rows in queues:
            rng.shuffle(rows)
        taken: list[Record] = []
        while len(taken) < want and any(queues):
            for rows in queues:
                if rows and len(taken) < want:
                    taken.append(rows.pop())
        out.extend(taken)
    rng.shuffle(out)
    return out


def _service_settings(settings: Settings, bootstrap: str, topics: TopicsConfig, bundle_dir: Path,
                      run_id: str, keys_dir: Path) -> tuple[WorkerSettings, GuardSettings]:
    base = {name: getattr(settings, name) for name in Settings.model_fields}
    kafka = KafkaConfig(bootstrap_servers=bootstrap, group_id=f"ctd-monitor-demo-{run_id}",
                        session_timeout_ms=10_000, heartbeat_interval_ms=1_000)
    # Real per-role keys, as production runs: the demo is secure by default too (ctd-monitor keys).
    generate_keys(keys_dir)
    generate_audit_secret(keys_dir)
    signing = SigningConfig(keys_dir=keys_dir)
    # The replay spreads each class evenly over its sources, not in the training mix's proportions: a drift the
    # offline threshold does not cover. Production's answer is the label-free window; sized for a short replay
    # here, so it re-certifies within the first hundred events rather than after the default 500.
    budget = BudgetConfig(window=200, min_window=60, recertify_every=20)
    ws = WorkerSettings(**base, kafka=kafka, topics=topics, signing=signing, budget=budget,
                        worker=WorkerConfig(bundle=bundle_dir, http_host="127.0.0.1", http_port=0))
    gs = GuardSettings(**base, kafka=kafka, topics=topics, signing=signing,
                       guard=GuardConfig(group_id=f"ctd-guard-demo-{run_id}", bundle=bundle_dir,
                                         http_host="127.0.0.1", http_port=0),
                       alerts=AlertsConfig(group_id=f"ctd-alerter-demo-{run_id}"))
    return ws, gs


async def _collect(bootstrap: str, topics: TopicsConfig, event_ids: set[str], timeout_s: float,
                   advance: Callable[[int], None]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Read verdicts until every event has its final one (the expert's when delegated)."""
    consumer = AIOKafkaConsumer(topics.verdicts, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, isolation_level="read_committed")
    await consumer.start()
    probe: dict[str, dict[str, Any]] = {}
    expert: dict[str, dict[str, Any]] = {}
    final: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(final) < len(event_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(event_ids) - len(final)} events without a final verdict after {timeout_s}s")
            batch = await consumer.getmany(timeout_ms=200)
            for record in (r for rs in batch.values() for r in rs):
                verdict = orjson.loads(record.value)
                event_id = verdict["event_id"]
                if event_id not in event_ids or (verdict["source"] != "probe" and not verdict["delegated"]):
                    continue  # not ours, or the guard's label of an audited event (the probe's verdict stands)
                verdict["_received"] = time.monotonic()
                (expert if verdict["source"] == "expert" else probe)[event_id] = verdict
                done = event_id in probe and (not probe[event_id]["delegated"] or event_id in expert)
                if done and event_id not in final:
                    final.add(event_id)
                    advance(1)
    finally:
        await consumer.stop()
    return probe, expert


async def _count_alerts(bootstrap: str, topic: str, conversations: set[str]) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, isolation_level="read_committed")
    await consumer.start()
    alerts: list[dict[str, Any]] = []
    try:
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            batch = await consumer.getmany(timeout_ms=200)
            for record in (r for rs in batch.values() for r in rs):
                alert = orjson.loads(record.value)
                if alert["conversation_id"] in conversations:
                    alerts.append(alert)
                    quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return alerts


async def _stream(ws: WorkerSettings, gs: GuardSettings, monitor: Monitor, expert: Expert, records: list[Record],
                  options: DemoOptions, progress: ProgressFactory) -> dict[str, Any]:
    worker = monitor_stream(ws, monitor)
    guard = GuardProcess(gs, expert)
    tasks = [asyncio.create_task(worker.run(), name="worker"), asyncio.create_task(guard.run(), name="guard")]
    try:
        deadline = time.monotonic() + 120
        while not (worker.ready() and guard.ready()):
            crashed = [t for t in tasks if t.done()]
            if crashed:
                crashed[0].result()
            if time.monotonic() > deadline:
                raise TimeoutError("worker and guard service did not get their partitions within 120 s")
            await asyncio.sleep(0.1)
        started = time.monotonic()
        sent = await replay_records(ws, records, rate=options.rate, progress=progress("replay", len(records)))
        ids = sent["event_ids"]
        probe, expert_verdicts = await _collect(ws.kafka.bootstrap_servers, ws.topics, set(ids), options.timeout_s,
                                                progress("final verdicts", len(ids)))
        harmful = {v["conversation_id"] for v in [*expert_verdicts.values(), *probe.values()]
                   if v["decision"] == "unsafe" and (v["source"] == "expert" or not v["delegated"])}
        alerts = await _count_alerts(ws.kafka.bootstrap_servers, ws.topics.alerts, harmful)
        last_probe = max(v["_received"] for v in probe.values())
        return {
            "ids": ids, "probe": probe, "expert": expert_verdicts, "alerts": alerts, "harmful": harmful,
            "probe_seconds": last_probe - started, "total_seconds": time.monotonic() - started,
            "inference_s": _histogram_sum(worker.handler.metrics.inference_latency),
            "expert_s": _histogram_sum(guard.guard_metrics.expert_latency),
            "degraded_episodes": guard.guard_metrics.degraded_total._value.get(),
            "dead_letters": sum(s.value for m in worker.metrics.dead_letters.collect() for s in m.samples
                                if s.name.endswith("_total")),
        }
    finally:
        worker.stop()
        guard.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def _histogram_sum(histogram: Any) -> float:
    return float(sum(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_sum")))


def run_demo(settings: Settings, options: DemoOptions, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    started = time.monotonic()
    options.out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(settings, options)
    bundle_dir = options.out / "bundle"
    manifest = ensure_bundle(settings, bundle_dir, options, progress)
    setup_s = time.monotonic() - started
    records = held_out_records(settings, options.events, options.seed)
    monitor = Monitor(bundle_dir, settings.model, cache_dir=settings.cache_dir)
    expert = build_expert(settings, bundle_manifest=manifest)
    run_id = uuid.uuid4().hex[:8]
    topics = TopicsConfig().suffixed(f"demo-{run_id}")
    broker = LocalBroker(cache_dir=resolve_cache_dir(), data_dir=options.out / "kafka" / run_id)
    broker.start(timeout_s=120)
    try:
        ws, gs = _service_settings(settings, broker.bootstrap, topics, bundle_dir, run_id, options.out / "keys")
        # The same topics, configs included, as `ctd-monitor topics create` makes (worker/topics.py).
        asyncio.run(create_topics(ws.kafka, topic_specs(ws.topics, ws.worker, input_partitions=3)))
        stream = asyncio.run(_stream(ws, gs, monitor, expert, records, options, progress))
    finally:
        broker.stop()
        shutil.rmtree(options.out / "kafka" / run_id, ignore_errors=True)
    # Expert-only baseline on the same replayed events, timed: what escalating everything would cost.
    t0 = time.monotonic()
    expert_all = score_in_chunks(expert, records, progress("expert-only baseline", len(records)))
    expert_all_s = time.monotonic() - t0
    summary = summarize(records, stream, expert_all, expert_all_s, monitor, expert, options, manifest)
    summary["setup_seconds"] = round(setup_s, 1)
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    write_outputs(summary, options.out)
    return summary


def summarize(records: list[Record], stream: dict[str, Any], expert_all: np.ndarray, expert_all_s: float,
              monitor: Monitor, expert: Expert, options: DemoOptions, manifest: BundleManifest) -> dict[str, Any]:
    ids: list[str] = stream["ids"]
    probe, expert_v = stream["probe"], stream["expert"]
    labels = np.array([r.label for r in records])
    p = np.array([probe[i]["p_unsafe"] for i in ids])
    delegated = np.array([probe[i]["delegated"] for i in ids])
    b = np.array([expert_v[i]["p_unsafe"] if probe[i]["delegated"] else np.nan for i in ids])
    cascade = cascade_scores(delegated, p, b)
    # The stream's own final decisions: the expert verdict's where delegated, else the probe verdict's (each at the
    # cut its service applied), so the figures are those of the verdicts people get.
    flagged = np.array([(expert_v[i] if probe[i]["delegated"] else probe[i])["decision"] == "unsafe" for i in ids])
    calibrated_expert = manifest.expert_cut(expert.name)
    expert_cut = calibrated_expert.cut if calibrated_expert is not None else DEFAULT_UNSAFE_CUT
    n = len(ids)
    rate = float(delegated.mean())
    tokens = np.array([len(monitor.tokenize(r.messages)) for r in records])
    monitor_params = monitor.loaded.parameters_run()
    expert_params = expert.parameters_per_token()
    probe_pt = per_1k(float(monitor_params * tokens.sum()), n)
    expert_pt = per_1k(float(expert_params * tokens.sum()), n)
    probe_s = per_1k(stream["inference_s"], n)
    expert_s = per_1k(expert_all_s, n)
    production = {
        "guard_params": PRODUCTION_GUARD_PARAMS, "monitor_params": PRODUCTION_MONITOR_PARAMS,
        "cascade_vs_expert_only": round((PRODUCTION_MONITOR_PARAMS + rate * PRODUCTION_GUARD_PARAMS)
                                        / PRODUCTION_GUARD_PARAMS, 3),
    }
    return {
        "events": n, "positives": int(labels.sum()),
        "sources": sorted({r.source for r in records}),
        "throughput_eps": round(n / stream["probe_seconds"], 2),
        "seconds_to_all_final_verdicts": round(stream["total_seconds"], 1),
        "budget": {"alpha": options.alpha, "delta": options.delta, "signal": monitor.rule.signal.value,
                   "threshold": monitor.rule.threshold, "realized_rate": round(rate, 4),
                   "delegated": int(delegated.sum()), "within_budget": rate <= options.alpha},
        "unsafe_cuts": {"epsilon": options.epsilon, "probe": monitor.unsafe_cut, "expert": expert_cut,
                        "calibrated": manifest.unsafe_cut is not None and manifest.unsafe_cut.valid
                        and calibrated_expert is not None and calibrated_expert.valid},
        "probe_only": _rounded(classification_metrics(labels, p, threshold=monitor.unsafe_cut)),
        "cascade": _rounded(decision_metrics(labels, cascade, flagged)),
        "expert_only": _rounded(classification_metrics(labels, expert_all, threshold=expert_cut)),
        "alerts": {"raised": len(stream["alerts"]), "harmful_conversations": len(stream["harmful"]),
                   "critical": sum(a["severity"] == "critical" for a in stream["alerts"])},
        "dead_letters": int(stream["dead_letters"]),
        "cost_per_1k_events": {
            "seconds": {"probe": round(probe_s, 2),
                        "cascade": round(probe_s + rate * expert_s, 2),
                        "expert_only": round(expert_s, 2),
                        "expert_in_stream_per_delegated": round(per_1k(stream["expert_s"],
                                                                       max(1, int(delegated.sum()))), 2)},
            "params_x_tokens": {"probe": probe_pt, "cascade": probe_pt + rate * expert_pt,
                                "expert_only": expert_pt},
            "parameters": {"monitored_model_run": monitor_params, "expert": expert_params},
            "tokens": "counted with the monitored model's tokenizer for both models",
            "mean_tokens_per_event": round(float(tokens.mean()), 1),
            "production_projection": production,
        },
    }


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    # fpr: the benign flag rate, what the unsafe cuts are certified on (ε), beside the recall it buys.
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k in
            ("auroc", "accuracy", "f1", "precision", "recall", "fpr")}


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    (out / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["probe_only", "cascade", "expert_only"]
    x = np.arange(len(names))
    for offset, metric in ((-0.2, "accuracy"), (0.0, "f1"), (0.2, "auroc")):
        left.bar(x + offset, [summary[n][metric] for n in names], width=0.2, label=metric)
    left.set_xticks(x, ["probe only", f"cascade ({summary['budget']['realized_rate']:.0%} delegated)",
                        "expert only"])
    left.set_ylim(0, 1)
    left.set_title(f"{summary['events']} replayed events")
    left.legend(loc="lower right")
    cost = summary["cost_per_1k_events"]["params_x_tokens"]
    right.bar(x, [cost[n] for n in ("probe", "cascade", "expert_only")], color=["tab:blue", "tab:orange", "tab:red"])
    right.set_xticks(x, ["probe only", "cascade", "expert only"])
    right.set_ylabel("parameters x tokens per 1k events")
    right.set_title(f"budget α={summary['budget']['alpha']}, realised {summary['budget']['realized_rate']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
